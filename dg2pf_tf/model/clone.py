"""The one way dg2pf_tf copies a model: `copy`, which `prune`, `strip`, `shrink` and `export` use.

Sequential and Functional models are rebuilt layer by layer through
`keras.models.clone_model` (nested ones too), each layer from its config, and
its weights set once the copy is built; a caller may put another layer in any
layer's place (`Rebuilt`: a stripped model, a layer with fewer channels).
Subclassed models are rebuilt from `get_config()`, as `.keras` loading does.
"""

import dataclasses

import keras
import numpy as np

from dg2pf_tf import _compat


@dataclasses.dataclass(frozen=True)
class Rebuilt:
    """What `copy` puts in a layer's place: `layer`, and the `weights` (arrays)
    to give it once the copy is built; None when it has its own already.
    `inputs_only`: call it on the first input alone, without the keyword
    arguments the original took (an `Identity` standing for a folded layer);
    `only_input`: call it on that one of the tensors the original merged (an
    `Add` whose other input is gone)."""

    layer: object
    weights: list = None
    inputs_only: bool = False
    only_input: int = None


def resized(entry, size):
    """A size entry of a layer config with its channel count set to `size`:
    a count, or a shape (EinsumDense's `output_shape`) whose last entry it is."""
    return size if entry is None or isinstance(entry, int) else (*entry[:-1], size)


def copy(model, rebuild=None, *, inputs=None):
    """A copy of built `model`: same class, config and weights, no shared state
    (but plain Lambda layers, which hold none of their own).

    `rebuild(layer)` may return a `Rebuilt` for any layer of a model that is a
    layer graph (None: a copy of it); `inputs` are new `keras.Input`s (another
    input size). A subclass of Functional (a KerasHub backbone) given either
    comes back as a Functional model of the same graph; without them, and any
    other subclassed model, is rebuilt from `get_config()`.

    Raises:
        TypeError: a subclassed model without a usable `get_config()`.
        ValueError: a subclassed model that cannot be rebuilt from its build
            config, or `rebuild`/`inputs` for one.
        RuntimeError: a rebuilt layer whose weights do not fit it.
    """
    layered = rebuild is not None or inputs is not None
    if _compat.is_graph_model(model) or (layered and _compat.graph_nodes(model) is not None):
        clone = _copy_graph(model, rebuild or (lambda layer: None), inputs)
        if rebuild is None and [tuple(v.shape) for v in model.weights] != [tuple(v.shape) for v in clone.weights]:
            raise RuntimeError(f"The copy of model '{model.name}' holds its weights in another order.")
        return clone
    if layered:
        raise ValueError(
            f"Model '{model.name}' ({type(model).__name__}) is subclassed: it can be copied "
            f"whole, not layer by layer.")
    try:
        clone = model.__class__.from_config(model.get_config())
    except NotImplementedError:
        raise TypeError(
            f"Model '{model.name}' ({type(model).__name__}) is subclassed and has no "
            f"get_config(), so dg2pf_tf cannot copy it. Give it get_config() (and "
            f"from_config() if its __init__ takes objects), as `.keras` saving needs too."
        ) from None
    build_like(clone, model.get_build_config())
    theirs, ours = model.weights, clone.weights
    if not clone.built or [tuple(v.shape) for v in theirs] != [tuple(v.shape) for v in ours]:
        raise ValueError(
            f"Model '{model.name}' ({type(model).__name__}) rebuilt from its config has other "
            f"weights than the original ({len(ours)} against {len(theirs)}). Build it by "
            f"calling it on a batch or with `model.build(input_shape)`.")
    for source, target in zip(theirs, ours):
        target.assign(source)
    return clone


def fresh_layer(layer):
    """A new `layer` (or graph operation) from its config, unbuilt. A plain
    Lambda is shared instead: it holds no weights of its own, and Keras' safe
    mode refuses to rebuild a Python lambda from its config."""
    if type(layer) is keras.layers.Lambda and not layer.weights:
        return layer
    return layer.__class__.from_config(layer.get_config())


def _copy_graph(model, rebuild, inputs):
    """`keras.models.clone_model`, recursive, keeping input names; weights set after."""
    pending = []  # (new layer, weights, the layer it stands for)
    inputs_only = set()  # ids of the new layers called on their first input alone
    only_input = {}  # id of a new layer: which of the merged inputs it is called on

    def clone_function(layer):
        rebuilt = rebuild(layer)
        if rebuilt is None:
            new = fresh_layer(layer)
            if new is not layer and isinstance(layer, keras.layers.Layer):  # not an op (`x + 1`)
                pending.append((new, layer, layer))
            return new
        if rebuilt.weights is not None:
            pending.append((rebuilt.layer, rebuilt.weights, layer))
        if rebuilt.inputs_only:
            inputs_only.add(id(rebuilt.layer))
        if rebuilt.only_input is not None:
            only_input[id(rebuilt.layer)] = rebuilt.only_input
        return rebuilt.layer

    def call_function(layer, *args, **kwargs):
        if id(layer) in only_input:
            return layer(args[0][only_input[id(layer)]])
        return layer(args[0]) if id(layer) in inputs_only else layer(*args, **kwargs)

    sequential = isinstance(model, keras.Sequential)  # which calls each layer with what it takes
    if inputs is None and not sequential:
        inputs = keras.tree.map_structure(
            lambda x: keras.Input(batch_shape=x.shape, dtype=x.dtype, name=_compat.producer(x).name),
            model.input)
    clone = keras.models.clone_model(model, input_tensors=inputs, clone_function=clone_function,
                                     call_function=None if sequential else call_function, recursive=True)
    # After the copy is built: also covers layers that make their weights in `call`.
    for new, weights, old in pending:
        values = weights.get_weights() if isinstance(weights, keras.layers.Layer) else list(weights)
        wanted = [tuple(w.shape) for w in new.weights]
        if [tuple(np.shape(v)) for v in values] != wanted:
            raise RuntimeError(
                f"Layer '{old.name}' of model '{model.name}' would get weights shaped "
                f"{[tuple(np.shape(v)) for v in values]}, its copy has {wanted}. Please report this model.")
        new.set_weights(values)
    return clone


def build_like(model, build_config):
    """Builds subclassed `model` as a call did when `build_config` was recorded:
    by calling it on zeros of that shape, so its weights come out as they did
    then (`Model.build` alone may create them elsewhere and leave it unbuilt)."""
    if model.built:  # a Functional subclass is built by its constructor
        return
    shape = (build_config or {}).get("input_shape")
    if shape is None:
        model.build_from_config(build_config)
        return
    zeros = keras.tree.map_shape_structure(
        lambda s: np.zeros([1 if d is None else d for d in s], "float32"), shape)
    model(zeros, training=False)
