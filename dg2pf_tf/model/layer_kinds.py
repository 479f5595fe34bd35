"""What dg2pf_tf knows of each kind of Keras layer: one `LayerKind` a kind, in `KINDS`.

A kind says which of a layer's weights `prune()` offers (and the axis along
which each reads its inputs, for N:M patterns), how channels flow through a
call of the layer (`Flow`, which `channels.graph` follows) and how often its
kernels multiply per example (`Uses`, which `channels.costs` counts). Adding a
layer kind is one entry here, in the spirit of tfmot's `prune_registry` and
Torch-Pruning's op registry. Subclasses of a listed class are the same kind,
except where `exact` says a subclass may compute anything else.

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
import enum
import typing

import keras

from dg2pf_tf import _compat


class Flow(enum.Enum):
    """How channels flow through a call of a layer (see `channels.graph`)."""

    PROJECTS = "projects"          # a kernel consumes the input's channels and makes new ones
    PASSES = "passes"              # the output has the input's channels; per-channel weights go with them
    MERGES = "merges"              # elementwise over its inputs: their channels are tied one to one
    CONCATENATES = "concatenates"  # lays its inputs' channels side by side
    FLATTENS = "flattens"          # spreads each channel over one input per position
    RESHAPES = "reshapes"          # adds or drops axes of size 1
    ATTENDS = "attends"            # MultiHeadAttention: its heads are a group inside it
    FEEDFORWARD = "feedforward"    # a transformer block: its feed-forward units are a group inside it


class Uses(enum.Enum):
    """How often each entry of a layer's kernels multiplies, per example (see `channels.costs`)."""

    OUTPUT_POSITIONS = "output"    # once per position it writes (convolutions)
    INPUT_POSITIONS = "input"      # once per position of its input (Dense, recurrent layers per step)
    ATTENTION = "attention"        # query and output projections per query, key and value ones per key
    NONE = "none"                  # a lookup: no multiplication (Embedding)


@dataclasses.dataclass(frozen=True)
class Projection:
    """How a projecting layer's kernel makes channels: the `kernel` attribute, its axes
    that `read` the input's channels and that make (`made`) the output's, the `bias`
    attribute of the made channels (or None), and the config entry that counts them."""

    kernel: str
    read: int
    made: int
    bias: str | None
    size_key: str


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """One kind of layer.

    Attributes:
        types: the Keras classes of the kind (subclasses match too).
        match: instead of `types`, a test of a layer (kinds from optional packages).
        prunable: attribute names of the weights `prune()` offers.
        input_axes: weight attribute -> the axis its inputs run along (N:M
            blocks), or a function of the layer giving that dict.
        flow: how channels flow through a call; None: not known by type (a
            weightless operation is probed, anything else keeps them dense).
        projection: for `Flow.PROJECTS`, a function of the layer giving its
            `Projection`, or None where its channels cannot be followed.
        per_channel: `(attribute, axis)` of weights holding one entry per
            channel that flows through (BatchNorm, a depthwise step).
        makes_channels: `(attribute, n)`: the kernel whose last n axes,
            flattened, are the output's channels (a BatchNormalization after
            the layer folds into it and the bias, see `model.fold`); () if none.
        uses: where its kernels multiply, for MACs.
        spatial: MACs need its positions to be of a known size.
        exact: a subclass may compute anything: its channels are not followed
            and its MACs are counted as those of a layer made of others.
    """

    types: tuple = ()
    match: typing.Callable | None = None
    prunable: tuple = ()
    input_axes: typing.Any = dataclasses.field(default_factory=dict)
    flow: Flow | None = None
    projection: typing.Callable | None = None
    per_channel: tuple = ()
    makes_channels: tuple = ()
    uses: Uses = Uses.INPUT_POSITIONS
    spatial: bool = False
    exact: bool = False

    def is_kind_of(self, layer):
        return self.match(layer) if self.match is not None else isinstance(layer, self.types)

    def follows(self, layer):
        """Whether `layer` is this kind in the sense `flow` and `uses` describe (see `exact`)."""
        return not self.exact or type(layer) in self.types


def _einsum_input_axes(layer):
    """`{'kernel': the last kernel axis the equation sums over}` ('abc,cd->abd': 0), or {}."""
    inputs, output = layer.equation.replace(" ", "").split("->")
    kernel = inputs.split(",")[-1]
    summed = [i for i, letter in enumerate(kernel) if letter not in output]
    return {"kernel": summed[-1]} if summed and "." not in kernel else {}


def einsum_axes(layer):
    """`(read, made, bias)`: the kernel axes of EinsumDense `layer` that read
    its input's last axis and make its output's last axis, and whether its
    bias runs along the output's last axis; None if the equation does not
    work that way (an ellipsis there, or channels carried past the kernel)."""
    inputs, out = layer.equation.replace(" ", "").split("->")
    source, kernel = inputs.split(",")
    read, made = source[-1:], out[-1:]
    if "." in kernel + read + made or read not in kernel or read in out or made not in kernel \
            or made in source:
        return None
    return kernel.index(read), kernel.index(made), made in (layer.bias_axes or "")


def _einsum_projection(layer):
    axes = einsum_axes(layer)
    if axes is None:
        return None
    read, made, biased = axes
    return Projection("kernel", read, made, "bias" if biased else None, "output_shape")


def _projection(kernel, size_key):
    """A `projection` function: `kernel` reads along its second-last axis and makes along its last."""
    return lambda layer: Projection(kernel, -2, -1, "bias", size_key)


_RECURRENT = ("kernel", "recurrent_kernel")


def _kinds():
    L = keras.layers
    passes = (L.ReLU, L.LeakyReLU, L.ELU, L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D,
              L.SpatialDropout3D, L.GaussianNoise, L.GaussianDropout, L.AlphaDropout,
              L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D, L.Cropping1D, L.Cropping2D,
              L.Cropping3D, L.UpSampling1D, L.UpSampling2D, L.UpSampling3D,
              L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D, L.AveragePooling1D,
              L.AveragePooling2D, L.AveragePooling3D, L.GlobalAveragePooling1D,
              L.GlobalAveragePooling2D, L.GlobalAveragePooling3D, L.GlobalMaxPooling1D,
              L.GlobalMaxPooling2D, L.GlobalMaxPooling3D, L.Identity, L.ActivityRegularization,
              L.Activation)
    return (
        LayerKind(match=lambda layer: _compat.kerashub_feedforward(layer) is not None, flow=Flow.FEEDFORWARD),
        LayerKind((L.SeparableConv1D, L.SeparableConv2D), prunable=("depthwise_kernel", "pointwise_kernel"),
                  input_axes={"pointwise_kernel": -2}, flow=Flow.PROJECTS,
                  projection=_projection("pointwise_kernel", "filters"), per_channel=(("depthwise_kernel", -2),),
                  makes_channels=("pointwise_kernel", 1), uses=Uses.OUTPUT_POSITIONS, spatial=True, exact=True),
        LayerKind((L.Dense,), prunable=("kernel",), input_axes={"kernel": 0}, flow=Flow.PROJECTS,
                  projection=_projection("kernel", "units"), makes_channels=("kernel", 1), exact=True),
        LayerKind((L.EinsumDense,), prunable=("kernel",), input_axes=_einsum_input_axes, flow=Flow.PROJECTS,
                  projection=_einsum_projection, exact=True),
        LayerKind((L.Conv1D, L.Conv2D, L.Conv3D), prunable=("kernel",), input_axes={"kernel": -2},
                  flow=Flow.PROJECTS, projection=_projection("kernel", "filters"), makes_channels=("kernel", 1),
                  uses=Uses.OUTPUT_POSITIONS, spatial=True, exact=True),
        # Transposed convolutions multiply at the positions they read.
        LayerKind((L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose), prunable=("kernel",), spatial=True),
        # Output channel c of a depthwise layer is input channel c // multiplier: kernel (..., in, multiplier).
        LayerKind((L.DepthwiseConv1D, L.DepthwiseConv2D), prunable=("kernel",), flow=Flow.PASSES,
                  per_channel=(("kernel", -2), ("bias", 0)), makes_channels=("kernel", 2),
                  uses=Uses.OUTPUT_POSITIONS, spatial=True),
        LayerKind((L.Embedding,), prunable=("embeddings",), uses=Uses.NONE),
        LayerKind((L.SimpleRNNCell, L.LSTMCell, L.GRUCell), prunable=_RECURRENT,
                  input_axes={"kernel": 0, "recurrent_kernel": 0}),
        LayerKind((_compat.conv_lstm_cell_class(),), prunable=_RECURRENT,
                  input_axes={"kernel": -2, "recurrent_kernel": -2}),
        LayerKind((L.BatchNormalization,), flow=Flow.PASSES, per_channel=tuple(
            (name, 0) for name in ("gamma", "beta", "moving_mean", "moving_variance"))),
        LayerKind((L.MultiHeadAttention,), flow=Flow.ATTENDS, uses=Uses.ATTENTION, exact=True),
        LayerKind(passes, flow=Flow.PASSES),
        LayerKind((L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum), flow=Flow.MERGES),
        LayerKind((L.Concatenate,), flow=Flow.CONCATENATES),
        LayerKind((L.Flatten,), flow=Flow.FLATTENS),
        LayerKind((L.Reshape,), flow=Flow.RESHAPES),
        LayerKind((L.TimeDistributed,), uses=Uses.OUTPUT_POSITIONS),
    )


# First match wins.
KINDS = _kinds()


def kind_of(layer):
    """The `LayerKind` of `layer` (or graph operation), or None for a kind not listed."""
    return next((kind for kind in KINDS if kind.is_kind_of(layer)), None)


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
    kind = kind_of(layer)
    found = [(name, getattr(layer, name, None)) for name in (kind.prunable if kind else ())]
    return [PrunableWeight(layer, name, v) for name, v in found if is_float_variable(v)]


def _declared(layer):
    declared = layer.get_prunable_weights()
    if not isinstance(declared, (list, tuple)) or not all(is_float_variable(v) for v in declared):
        raise TypeError(
            f"{type(layer).__name__}.get_prunable_weights() of layer '{layer.name}' must return a "
            f"list of the layer's float keras.Variables, got {declared!r}.")
    by_id = {id(v): n for n, v in vars(layer).items() if isinstance(v, keras.Variable)}
    return [PrunableWeight(layer, by_id.get(id(v), v.name), v) for v in declared]


def is_float_variable(value):
    """True for a `keras.Variable` of a float dtype."""
    return isinstance(value, keras.Variable) and "float" in str(value.dtype)


def input_axis(weight):
    """The axis of `weight` (a `PrunableWeight`) along which its layer reads
    inputs, as a non-negative int, or None where the layer has none that an
    N:M pattern can run along."""
    kind, rank = kind_of(weight.layer), len(weight.variable.shape)
    axes = {} if kind is None else kind.input_axes(weight.layer) if callable(kind.input_axes) else kind.input_axes
    axis = axes.get(weight.name)
    return None if axis is None or rank < 2 else axis % rank


def pattern_axis(weight, m):
    """`(axis, None)` if `weight` (a `PrunableWeight`) can hold blocks of `m`
    along its `input_axis`, else `(None, why)`."""
    axis = input_axis(weight)
    if axis is None:
        return None, "no input axis"
    inputs = weight.variable.shape[axis]
    return (axis, None) if inputs % m == 0 else (None, f"{inputs} inputs")
