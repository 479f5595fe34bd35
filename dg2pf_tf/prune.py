"""Rebuilding a model with pruning wrappers (`prune`) and without them (`strip`)."""

import warnings

import keras
from keras.src.models.functional import Functional

from dg2pf_tf import masking, schedules
from dg2pf_tf.criteria import check_floor, check_scope, check_sparsity
from dg2pf_tf.wrapper import PruneWrapper, copy_layer, prunable_kernel_names


def _check_rebuildable(model, what, advice):
    if not isinstance(model, keras.Model):
        raise TypeError(f"{what} takes a Keras model, got {type(model).__name__}.")
    if not isinstance(model, (keras.Sequential, Functional)):
        raise TypeError(
            f"{what} rebuilds Sequential and Functional models; "
            f"'{model.name}' is a subclassed model ({type(model).__name__}), "
            f"whose layer graph it cannot see. {advice}"
        )
    if not model.built:
        raise ValueError(
            f"{what}: model '{model.name}' is not built. Build it first "
            f"(give it an Input, or call `model.build(input_shape)`)."
        )


def _all_layers(model):
    return list(model._flatten_layers(include_self=False, recursive=True))


def _is_graph(layer):
    return isinstance(layer, (keras.Sequential, Functional))


def _exclusion(model, exclude):
    """A predicate telling which layers `exclude` keeps dense."""
    if exclude is None:
        return lambda layer: False
    if callable(exclude):
        return exclude
    names = [exclude] if isinstance(exclude, str) else list(exclude)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"`exclude` takes layer names or a predicate `fn(layer) -> bool`, "
            f"got {exclude!r}."
        )
    known = {layer.name for layer in _all_layers(model)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(
            f"`exclude` names layers that are not in model '{model.name}': "
            f"{unknown}. Layer names are listed by `model.summary()`; known "
            f"prunable ones: {sorted(_prunable_names(model))}."
        )
    names = set(names)
    return lambda layer: layer.name in names


def _prunable_names(model):
    return [l.name for l in _all_layers(model) if prunable_kernel_names(l)]


def _warn_hidden_layers(model):
    """Warns about prunable layers inside layers `prune` cannot rebuild."""
    hidden = []
    for layer in model._flatten_layers(include_self=False, recursive=False):
        if _is_graph(layer):
            _warn_hidden_layers(layer)
        elif not prunable_kernel_names(layer):
            inner = [
                l.name for l in layer._flatten_layers(include_self=False)
                if prunable_kernel_names(l)
            ]
            if inner:
                hidden.append(f"{layer.name} ({type(layer).__name__}): {inner}")
    if hidden:
        warnings.warn(
            "These custom layers contain prunable layers that prune() cannot "
            "reach and leaves dense: " + "; ".join(hidden) + ". Wrap their "
            "sublayers with dg2pf_tf.PruneWrapper in the layer's own code.",
            stacklevel=3,
        )


def _clone(model, replace):
    """`keras.models.clone_model`, recursive, keeping input names and weights.

    `replace(layer)` returns a ready replacement (weights set) or None; other
    layers are re-created from their config and get their weights once the
    clone has built them, which also covers layers that build in `call`.
    """
    copied = []

    def clone_function(layer):
        new = replace(layer)
        if new is None:
            new = layer.__class__.from_config(layer.get_config())
            copied.append((layer, new))
        return new

    inputs = None
    if isinstance(model, Functional):
        inputs = keras.tree.map_structure(
            lambda x: keras.Input(
                batch_shape=x.shape,
                dtype=x.dtype,
                name=x._keras_history.operation.name,
            ),
            model.input,
        )
    clone = keras.models.clone_model(
        model, input_tensors=inputs, clone_function=clone_function, recursive=True
    )
    for layer, new in copied:
        new.set_weights(layer.get_weights())
    return clone


def prune(
    model,
    sparsity=0.9,
    pruning_epochs=10,
    *,
    schedule=None,
    scope="global",
    exclude=None,
    recovery=True,
    floor=0.0,
):
    """Returns a copy of `model` whose prunable kernels carry pruning masks.

    The copy has the same inputs, outputs, layer names and weights; all masks
    start at 1, so its outputs equal the original's until `UpdateMasks` (or
    `update_masks`) sets a level. `model` itself is not modified.

    Args:
        model: a built Sequential or Functional Keras model (nested models
            inside it are rebuilt too).
        sparsity: final fraction of zeros over all prunable weights, in [0, 1).
        pruning_epochs: epochs of the linear schedule (`s_e` in DG2PF).
        schedule: a `dg2pf_tf.schedules` object, used instead of the linear
            schedule that `sparsity` and `pruning_epochs` describe.
        scope: 'global' (one magnitude threshold over every prunable weight)
            or 'layer' (each kernel pruned to the same level).
        exclude: layer names, or a predicate `fn(layer) -> bool`, to keep dense.
        floor: with scope 'global', each kernel keeps at least this share of
            what an Erdos-Renyi-kernel allocation would give it (guards small
            layers against being pruned away at extreme sparsity; 0 is pure
            global magnitude).
        recovery: simulated pruning with weight recovery (DG2PF's gradual
            phase) if True, hard pruning if False.

    Raises:
        TypeError: subclassed model, or `exclude` of the wrong type.
        ValueError: bad `sparsity`, `pruning_epochs`, `scope` or `exclude`
            name, a model already pruned, or one with nothing to prune.
    """
    advice = (
        "Wrap its prunable layers yourself with dg2pf_tf.PruneWrapper(layer) "
        "where you create them, then train with dg2pf_tf.UpdateMasks(schedule)."
    )
    _check_rebuildable(model, "prune()", advice)
    if schedule is None:
        schedule = schedules.Linear(check_sparsity(sparsity), pruning_epochs)
    elif not isinstance(schedule, schedules.Schedule):
        raise TypeError(
            f"`schedule` must be a dg2pf_tf.schedules object (Linear, "
            f"Polynomial, Constant), got {schedule!r}."
        )
    check_scope(scope)
    check_floor(floor)
    if masking.find_wrappers(model):
        raise ValueError(
            f"Model '{model.name}' is already pruned. Prune the original model "
            f"again, or call dg2pf_tf.strip(model) first to start from this one."
        )
    excluded = _exclusion(model, exclude)
    targets = {
        id(l) for l in _all_layers(model)
        if prunable_kernel_names(l) and not excluded(l)
    }
    if not targets:
        raise ValueError(
            f"Model '{model.name}' has no prunable layer left to prune "
            f"(prunable: Dense, EinsumDense, Conv*, Conv*Transpose, "
            f"DepthwiseConv*, SeparableConv*; excluded: {exclude!r})."
        )
    _warn_hidden_layers(model)

    def wrap(layer):
        if id(layer) not in targets:
            return None
        return PruneWrapper(
            copy_layer(layer), recovery=recovery, schedule=schedule, scope=scope,
            floor=floor,
        )

    return _clone(model, wrap)


def strip(model):
    """Returns a plain Keras copy of `model` with every pruning wrapper removed.

    Each wrapper becomes its original layer (same name) with `kernel * mask`
    as kernel, so the copy computes what the pruned model computes in
    inference and loads where dg2pf_tf is not installed. A model without
    wrappers is copied as is.

    Raises:
        TypeError: `model` is subclassed (call `PruneWrapper.strip()` on its
            wrappers instead).
    """
    advice = (
        "Replace each dg2pf_tf.PruneWrapper in your model's code with "
        "wrapper.strip(), which returns the plain layer with pruned kernels."
    )
    _check_rebuildable(model, "strip()", advice)

    return _clone(model, lambda l: l.strip() if isinstance(l, PruneWrapper) else None)


def finalize(model):
    """Makes the masks of a pruned model final: masked weights become exactly 0
    and stay 0 through any optimizer step (DG2PF after the gradual phase).

    Works in place (also on a model that is already compiled or inside a
    `Distiller`) and returns `model`.

    Raises:
        ValueError: `model` has no pruning wrappers.
    """
    masking.set_hard(masking.require_wrappers(model, "finalize()"), True)
    return model
