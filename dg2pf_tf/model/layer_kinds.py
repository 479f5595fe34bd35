"""Which weights of a layer can be pruned.

Keras layers are looked up in `PRUNABLE_WEIGHTS` (subclasses match too): the
kernels of dense, einsum (attention projections) and convolution layers,
embedding tables, and the input and recurrent kernels of recurrent cells
(found inside `LSTM`, `GRU`, `SimpleRNN`, `ConvLSTM*`, `Bidirectional`, ...).

Any layer, a user's own included, can say for itself which weights to prune
by a `get_prunable_weights()` method returning a list of its variables (the
`PrunableLayer` protocol of tensorflow-model-optimization):

    class Gate(keras.layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1], 8))
        def get_prunable_weights(self):
            return [self.w]
"""

import dataclasses

import keras

from dg2pf_tf import _compat

_KERNEL = ("kernel",)
_RECURRENT = ("kernel", "recurrent_kernel")
_SEPARABLE = ("depthwise_kernel", "pointwise_kernel")

# Layer class -> attribute names of its prunable weights. First match wins.
PRUNABLE_WEIGHTS = (
    (keras.layers.SeparableConv1D, _SEPARABLE),
    (keras.layers.SeparableConv2D, _SEPARABLE),
    (keras.layers.Dense, _KERNEL),
    (keras.layers.EinsumDense, _KERNEL),
    (keras.layers.Conv1D, _KERNEL),
    (keras.layers.Conv2D, _KERNEL),
    (keras.layers.Conv3D, _KERNEL),
    (keras.layers.Conv1DTranspose, _KERNEL),
    (keras.layers.Conv2DTranspose, _KERNEL),
    (keras.layers.Conv3DTranspose, _KERNEL),
    (keras.layers.DepthwiseConv1D, _KERNEL),
    (keras.layers.DepthwiseConv2D, _KERNEL),
    (keras.layers.Embedding, ("embeddings",)),
    (keras.layers.SimpleRNNCell, _RECURRENT),
    (keras.layers.LSTMCell, _RECURRENT),
    (keras.layers.GRUCell, _RECURRENT),
    (_compat.conv_lstm_cell_class(), _RECURRENT),
)


# Layer class -> {weight attribute: the axis its inputs run along}, for N:M
# patterns (blocks of M consecutive weights along that axis, the reduction
# axis that sparse tensor cores read). First match wins; weights not listed
# (depthwise and transposed convolutions, embedding tables) have none.
# EinsumDense's axis comes from its equation (`_einsum_input_axis`).
INPUT_AXES = (
    (keras.layers.SeparableConv1D, {"pointwise_kernel": -2}),
    (keras.layers.SeparableConv2D, {"pointwise_kernel": -2}),
    (keras.layers.Dense, {"kernel": 0}),
    (keras.layers.Conv1D, {"kernel": -2}),
    (keras.layers.Conv2D, {"kernel": -2}),
    (keras.layers.Conv3D, {"kernel": -2}),
    (keras.layers.SimpleRNNCell, {"kernel": 0, "recurrent_kernel": 0}),
    (keras.layers.LSTMCell, {"kernel": 0, "recurrent_kernel": 0}),
    (keras.layers.GRUCell, {"kernel": 0, "recurrent_kernel": 0}),
    (_compat.conv_lstm_cell_class(), {"kernel": -2, "recurrent_kernel": -2}),
)


@dataclasses.dataclass(frozen=True)
class PrunableWeight:
    """One weight a layer offers for pruning: `layer`, the attribute `name`, the `variable`."""

    layer: keras.layers.Layer
    name: str
    variable: keras.Variable


def declares_prunable_weights(layer):
    """True if `layer` says itself which weights to prune (`get_prunable_weights`)."""
    return callable(getattr(layer, "get_prunable_weights", None))


def prunable_weights(layer):
    """The weights `layer` itself (not its sublayers) offers for pruning.

    Weights that are not plain float variables (LoRA-enabled or quantized
    kernels) are left out.

    Raises:
        TypeError: `get_prunable_weights()` returned something that is not a
            list of the layer's float variables.
    """
    if declares_prunable_weights(layer):
        return _declared(layer)
    for cls, names in PRUNABLE_WEIGHTS:
        if isinstance(layer, cls):
            found = [(name, getattr(layer, name, None)) for name in names]
            return [PrunableWeight(layer, name, v) for name, v in found if _is_float_variable(v)]
    return []


def _declared(layer):
    declared = layer.get_prunable_weights()
    if not isinstance(declared, (list, tuple)) or not all(_is_float_variable(v) for v in declared):
        raise TypeError(
            f"{type(layer).__name__}.get_prunable_weights() of layer '{layer.name}' must return a "
            f"list of the layer's float keras.Variables, got {declared!r}.")
    by_id = {id(v): n for n, v in vars(layer).items() if isinstance(v, keras.Variable)}
    return [PrunableWeight(layer, by_id.get(id(v), v.name), v) for v in declared]


def _is_float_variable(value):
    return isinstance(value, keras.Variable) and "float" in str(value.dtype)


def input_axis(weight):
    """The axis of `weight` (a `PrunableWeight`) along which its layer reads
    inputs, as a non-negative int, or None where the layer has none that an
    N:M pattern can run along."""
    layer, rank = weight.layer, len(weight.variable.shape)
    if isinstance(layer, keras.layers.EinsumDense) and weight.name == "kernel":
        axis = _einsum_input_axis(layer.equation)
    else:
        axis = next((axes.get(weight.name) for cls, axes in INPUT_AXES if isinstance(layer, cls)), None)
    return None if axis is None or rank < 2 else axis % rank


def pattern_axis(weight, m):
    """`(axis, None)` if `weight` (a `PrunableWeight`) can hold blocks of `m`
    along its `input_axis`, else `(None, why)`."""
    axis = input_axis(weight)
    if axis is None:
        return None, "no input axis"
    inputs = weight.variable.shape[axis]
    return (axis, None) if inputs % m == 0 else (None, f"{inputs} inputs")


def _einsum_input_axis(equation):
    """The last kernel axis an einsum `equation` sums over ('abc,cd->abd': 0)."""
    inputs, output = equation.replace(" ", "").split("->")
    kernel = inputs.split(",")[-1]
    if "." in kernel:
        return None
    summed = [i for i, letter in enumerate(kernel) if letter not in output]
    return summed[-1] if summed else None


def input_axes(model, variables):
    """`input_axis` of each of `variables`, weights that layers inside `model` offer.

    Raises ValueError for a variable no layer offers, or one without an input axis.
    """
    offered = {id(w.variable): w for layer in [model, *_compat.sublayers(model, recursive=True)]
               for w in prunable_weights(layer)}
    axes = []
    for variable in variables:
        weight = offered.get(id(variable))
        axis = None if weight is None else input_axis(weight)
        if axis is None:
            raise ValueError(
                f"'{variable.path}' has no input axis an N:M pattern can run along (only the "
                f"kernels of Dense, EinsumDense, convolution and recurrent layers have one).")
        axes.append(axis)
    return axes
