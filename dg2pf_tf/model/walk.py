"""The one walk through a model's layers: its prunable weights, and its layers of a kind.

Everything else receives what these found; `_compat.sublayers` is called here only.
"""

import dataclasses

import keras

from dg2pf_tf import _compat
from dg2pf_tf.model import layer_kinds


@dataclasses.dataclass(frozen=True)
class Prunable:
    """The prunable weights of a model: `chosen` to prune, `excluded` (dense by
    choice), and `unknown`: weight matrices no layer offers for pruning."""

    chosen: tuple
    excluded: tuple
    unknown: tuple


def layers(model):
    """Every layer inside `model` (not itself), nested models and sublayers included, each once."""
    return _compat.sublayers(model, recursive=True)


def layers_of(model, kind):
    """The layers of class `kind` in `model`, itself included, each once, in layer order."""
    found = [model] if isinstance(model, kind) else []
    found += [layer for layer in layers(model) if isinstance(layer, kind)]
    return list({id(layer): layer for layer in found}.values())


def find_prunable(model, excluded=lambda layer: False):
    """Walks `model` (and every layer inside it) for prunable weights.

    A layer for which `excluded(layer)` holds keeps its whole subtree dense; a
    layer with `get_prunable_weights()` answers for its subtree. Returns a
    `Prunable` of `layer_kinds.PrunableWeight`s, each variable once.
    """
    chosen, dense, seen = [], [], set()

    def visit(layer, skip):
        skip = skip or (layer is not model and excluded(layer))
        for weight in layer_kinds.prunable_weights(layer):
            if id(weight.variable) not in seen:
                seen.add(id(weight.variable))
                (dense if skip else chosen).append(weight)
        if not layer_kinds.declares_prunable_weights(layer):
            for sub in _compat.sublayers(layer):
                visit(sub, skip)

    visit(model, False)
    # Biases are never pruned, even 2-D ones (EinsumDense, GRU).
    biases = {id(l.bias) for l in layers(model) if isinstance(getattr(l, "bias", None), keras.Variable)}
    unknown = tuple(v for v in model.trainable_weights if len(v.shape) >= 2 and layer_kinds.is_float_variable(v)
                    and id(v) not in seen and id(v) not in biases)
    return Prunable(tuple(chosen), tuple(dense), unknown)


def multiplying_kernels(layer):
    """The weights of `layer` and every layer inside it that multiply inputs: the
    kernels they offer for pruning, lookup tables (Embedding) aside."""
    found = {}
    for inner in [layer, *layers(layer)]:
        kind = layer_kinds.kind_of(inner)
        if kind is not None and kind.uses is layer_kinds.Uses.NONE:
            continue
        found.update((id(w.variable), w.variable) for w in layer_kinds.prunable_weights(inner))
    return list(found.values())


def input_axes(model, variables):
    """`layer_kinds.input_axis` of each of `variables`, weights that layers inside `model` offer.

    Raises ValueError for a variable no layer offers, or one without an input axis.
    """
    offered = {id(w.variable): w for layer in [model, *layers(model)]
               for w in layer_kinds.prunable_weights(layer)}
    axes = []
    for variable in variables:
        weight = offered.get(id(variable))
        axis = None if weight is None else layer_kinds.input_axis(weight)
        if axis is None:
            raise ValueError(
                f"'{variable.path}' has no input axis an N:M pattern can run along (only the "
                f"kernels of Dense, EinsumDense, convolution and recurrent layers have one).")
        axes.append(axis)
    return axes
