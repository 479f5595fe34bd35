"""`deploy_report`: can XNNPACK's sparse inference path take this model, and if not, why.

XNNPACK (LiteRT's CPU engine) runs a float model sparse when it finds a
cluster of operators it can compute in NCHW layout: entered through a 3x3
stride-2 convolution over 3 channels with padding 1 on each side, made of 1x1
stride-1 convolutions, 3x3/5x5 depthwise convolutions with explicit padding,
adds, multiplies and activations, and left through a global mean; and only
when more than 2/3 of the cluster's 1x1 convolution weights are zero. The
checkers below mirror `xnn_check_nchw_compatibility` and
`xnn_subgraph_rewrite_for_nchw` in XNNPACK's src/subgraph.c. The runtime
takes that path on ARM (phones, Raspberry Pi) and x86 without AVX only, and
only when the file stores some weights sparse.
"""

import dataclasses
import functools
import os

import keras
import numpy as np

from dg2pf_tf import counting
from dg2pf_tf.deploy import convert, litert, sparse_tensors
from dg2pf_tf.deploy.litert import schema

_UNARY = ("RELU", "RELU6", "RELU_N1_TO_1", "RELU_0_TO_1", "LOGISTIC", "TANH", "HARD_SWISH",
          "ELU", "LEAKY_RELU", "ABS", "NEG", "SQUARE", "SQRT", "RSQRT", "GELU", "FLOOR",
          "CEIL", "ROUND", "EXP")
_BINARY = ("ADD", "MUL")
_PADS = ("PAD", "PADV2")
_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")  # input 1 is the weight

# What an operator is to the sparse path: where it enters or leaves, a member
# computed in NCHW, a PAD folded into the next convolution, or (None) a stop.
ENTRY, NCHW, EXIT, FUSED = "entry", "nchw", "exit", "fused"


@dataclasses.dataclass(frozen=True)
class DeployRow:
    """One operator: its layer, weight sparsity, and whether the sparse path takes it."""

    index: int
    op: str
    layer: str
    weight_shape: tuple
    weight_sparsity: float
    sparse_path: bool
    reason: str


@dataclasses.dataclass(frozen=True)
class DeployReport:
    """What `deploy_report` found; `str(report)` is a table, `to_dict()` is JSON-friendly."""

    rows: tuple
    sparse_path: bool
    verdict: str
    pointwise_sparsity: float

    def to_dict(self):
        return {"sparse_path": self.sparse_path, "verdict": self.verdict,
                "pointwise_sparsity": self.pointwise_sparsity,
                "operators": [dict(dataclasses.asdict(r), weight_shape=list(r.weight_shape))
                              for r in self.rows]}

    def __str__(self):
        lines = [f"XNNPACK sparse inference: {'yes' if self.sparse_path else 'no'} - {self.verdict}"]
        width = max([len(r.layer) for r in self.rows] + [5])
        for r in self.rows:
            shape = "x".join(map(str, r.weight_shape)) if r.weight_shape else ""
            sparsity = f"{r.weight_sparsity:6.1%}" if r.weight_shape else ""
            lines.append(f"{r.index:>4} {r.op:<18} {r.layer:<{width}} {shape:>14} {sparsity:>7} "
                         f"{'sparse' if r.sparse_path else 'dense':<6}  {r.reason}")
        return "\n".join(lines)


def _layer(name):
    """A readable layer name from a converter tensor name ('model/layer_1/op;...')."""
    first = name.split(";")[0]
    parts = first.split("/")
    layer = parts[1] if len(parts) > 2 else parts[0]
    return layer[:-2] if layer.endswith("_1") else layer


@functools.cache
def _codes(names):
    """The builtin operator codes the schema gives `names`."""
    return frozenset(getattr(schema.BuiltinOperator, name) for name in names)


def _is(index, n, names):
    """Whether operator n of `index` (an `OperatorIndex`) is one of the builtin operators `names`."""
    return index.codes[n] in _codes(names)


@dataclasses.dataclass(frozen=True)
class _Graph:
    """Subgraph 0 of a file as the checkers read it: the operator index and
    the dense value of every sparse-encoded constant."""

    index: litert.OperatorIndex
    sparse: dict

    @classmethod
    def of(cls, model):
        index = litert.OperatorIndex.of(model)
        return cls(index, {s.index: s.dense for s in sparse_tensors.sparse_tensors(index)})

    def constant(self, t):
        """The value of a constant tensor (through DENSIFY), or None."""
        g, t = self.index, int(t)
        if t in g.producer and g.codes[g.producer[t]] == schema.BuiltinOperator.DENSIFY:
            t = int(g.operators[g.producer[t]].inputs[0])
        if t in self.sparse:
            return self.sparse[t]
        tensor = g.tensor(t)
        data = g.model.buffers[tensor.buffer].data
        if t in g.producer or data is None or len(data) == 0:
            return None
        try:
            dtype = litert.numpy_dtype(tensor.type)
        except TypeError:  # a type numpy lacks: its bytes
            dtype = np.uint8
        return np.frombuffer(bytes(data), dtype).reshape(g.shape(t))

    def activation_inputs(self, n):
        return [int(t) for t in self.index.operators[n].inputs if t >= 0 and self.constant(t) is None]

    def padding_from(self, n):
        """Explicit padding (top, bottom, left, right) of convolution n, with the
        PAD producing its input (XNNPACK fuses it) if any, and that PAD's index."""
        g, op = self.index, self.index.operators[n]
        if op.builtinOptions.padding == schema.Padding.SAME:  # XNNPACK keeps TensorFlow's flag
            return None, None
        pad = g.producer.get(int(op.inputs[0]))
        if pad is not None and _is(g, pad, _PADS):
            values = self.constant(g.operators[pad].inputs[1])
            if values is not None and not values[0].any() and not values[3].any():
                return (int(values[1][0]), int(values[1][1]), int(values[2][0]), int(values[2][1])), pad
        return (0, 0, 0, 0), None


# Checkers: (graph, n) -> (kind, reason) for one operator type; kind None
# means the sparse path stops there.

def _pad(g, n):
    users = g.index.readers(g.index.operators[n].outputs[0])
    if users and all(_is(g.index, u, ("CONV_2D", "DEPTHWISE_CONV_2D"))
                     and g.index.operators[u].builtinOptions.padding == schema.Padding.VALID
                     for u in users):
        return FUSED, "zero padding folded into the next convolution"
    return None, "padding not followed by a 'valid' convolution"


def _conv(g, n):
    op = g.index.operators[n]
    o = op.builtinOptions
    _, kh, kw, in_c = g.index.shape(op.inputs[1])
    if g.index.shape(op.inputs[0])[-1] != in_c:
        return None, "grouped convolution"
    if (o.dilationHFactor, o.dilationWFactor) != (1, 1):
        return None, "dilated convolution"
    if (kh, kw) == (1, 1):
        if (o.strideH, o.strideW) != (1, 1):
            return None, f"1x1 convolution with stride {o.strideH}"
        return NCHW, "1x1 convolution: sparse kernel"
    if (kh, kw) == (3, 3):
        return _stem(g, n, in_c)
    return None, f"{kh}x{kw} convolution (only 1x1 and the 3x3 stride-2 stem)"


def _stem(g, n, in_c):
    o = g.index.operators[n].builtinOptions
    if (o.strideH, o.strideW) != (2, 2) or in_c != 3:
        return None, "3x3 convolution that is not the stride-2 stem over 3 channels"
    padding, _ = g.padding_from(n)
    if padding != (1, 1, 1, 1):
        why = "TensorFlow SAME padding" if padding is None else f"padding {padding}"
        return None, f"3x3 stride-2 stem with {why}; it needs 1 on each side"
    return ENTRY, "3x3 stride-2 stem over 3 channels: enters the sparse path"


def _depthwise(g, n):
    op = g.index.operators[n]
    o = op.builtinOptions
    kernel = g.index.shape(op.inputs[1])
    _, kh, kw, _ = kernel
    if (o.dilationHFactor, o.dilationWFactor) != (1, 1):
        return None, "dilated depthwise convolution"
    if o.depthMultiplier not in (0, 1) and kernel[-1] != g.index.shape(op.inputs[0])[-1]:
        return None, "depth multiplier > 1"
    if o.strideH != o.strideW or o.strideH not in (1, 2) or kh != kw or kh not in (3, 5):
        return None, f"{kh}x{kw} depthwise with stride {o.strideH}x{o.strideW} (3x3/5x5, stride 1 or 2)"
    padding, _ = g.padding_from(n)
    if padding != (kh // 2,) * 4:
        why = ("TensorFlow SAME padding (export(..., explicit_padding=True) stores "
               "symmetric SAME padding as PAD + VALID)") if padding is None else f"padding {padding}"
        return None, f"{why}; it needs {kh // 2} on each side"
    return NCHW, "depthwise convolution (runs dense inside the sparse path)"


def _elementwise(g, n):
    if any(len(g.index.shape(t)) != 4 for t in g.activation_inputs(n)):
        return None, "inputs are not 4-D"
    return NCHW, "elementwise"


def _activation(g, n):
    if len(g.index.shape(g.index.operators[n].inputs[0])) != 4:
        return None, "input is not 4-D"
    return NCHW, "activation"


def _mean(g, n):
    op = g.index.operators[n]
    axes = g.constant(op.inputs[1])
    if (len(g.index.shape(op.inputs[0])) == 4 and axes is not None
            and sorted(axes.reshape(-1).tolist()) == [1, 2]):
        return EXIT, "global mean: leaves the sparse path"
    return None, "mean that is not a global spatial mean"


@functools.cache
def _checkers():
    """Builtin operator code -> its checker (the schema is loaded on first use)."""
    table = {"CONV_2D": _conv, "DEPTHWISE_CONV_2D": _depthwise, "MEAN": _mean,
             **dict.fromkeys(_PADS, _pad), **dict.fromkeys(_BINARY, _elementwise),
             **dict.fromkeys(_UNARY, _activation)}
    return {getattr(schema.BuiltinOperator, name): check for name, check in table.items()}


def _compatibility(g, n):
    """(kind, reason) of operator n: ENTRY, NCHW, EXIT, FUSED or None (incompatible)."""
    op = g.index.operators[n]
    types = [g.index.tensor(t).type for t in [*op.outputs, *g.activation_inputs(n)]]
    if not all(litert.is_float(t) for t in types):
        return None, "quantized: the sparse path computes in float only"
    check = _checkers().get(g.index.codes[n])
    if check is None:
        return None, f"{g.index.names[n]} is not supported by the sparse path"
    return check(g, n)


@dataclasses.dataclass(frozen=True)
class _Cluster:
    """Operators XNNPACK would run together in NCHW, ending at one global mean;
    any `problems` make it refuse them all."""

    members: frozenset
    problems: tuple
    pointwise_sparsity: float


def _grow(g, kinds, reasons, exit_node):
    """(members, problems): the cluster grown backwards from `exit_node` through compatible producers."""
    members, problems, stack = set(), [], [exit_node]
    while stack:
        n = stack.pop()
        if n in members:
            continue
        members.add(n)
        if kinds[n] == ENTRY:
            _, pad = g.padding_from(n)
            if pad is not None:
                members.add(pad)
            continue
        for t in g.activation_inputs(n):
            p = g.index.producer.get(t)
            if p is None:
                problems.append(f"{g.index.names[n]} reads the model input directly "
                                f"(no 3x3 stride-2 stem before it)")
            elif kinds.get(p) is None:
                problems.append(f"fed by {g.index.names[p]} ({reasons[p]})")
            else:
                stack.append(p)
    return members, problems


def _leaks(g, members, exit_node):
    """Problems: outputs of cluster members (but the exit) read outside the cluster."""
    problems = []
    for n in members:
        if n == exit_node:
            continue
        for t in g.index.operators[n].outputs:
            outside = [u for u in g.index.readers(t) if u not in members]
            if outside or int(t) in g.index.graph.outputs:
                problems.append(f"{g.index.names[n]} output also used outside (by "
                                f"{', '.join(g.index.names[u] for u in outside) or 'the model output'})")
    return problems


def _pointwise(g, kinds, members):
    """Problems of the cluster's 1x1 convolution weights, and the share of them that is zero."""
    params = zeros = 0
    for n in members:
        if _is(g.index, n, ("CONV_2D",)) and kinds[n] == NCHW:
            w = g.constant(g.index.operators[n].inputs[1])
            params, zeros = params + w.size, zeros + counting.count_zeros(w)
    ratio = zeros / params if params else 0.0
    if not params:
        return ["no 1x1 convolution to run sparse"], ratio
    if zeros * 3 <= params * 2:
        return [f"1x1 convolutions are {ratio:.1%} zeros; XNNPACK needs more than 2/3"], ratio
    return [], ratio


def _clusters(g, kinds, reasons):
    """The cluster of every global mean, in operator order."""
    clusters = []
    for exit_node in [n for n, kind in kinds.items() if kind == EXIT]:
        members, problems = _grow(g, kinds, reasons, exit_node)
        problems += _leaks(g, members, exit_node)
        pointwise, ratio = _pointwise(g, kinds, members)
        clusters.append(_Cluster(frozenset(members), tuple(problems + pointwise), ratio))
    return clusters


def _content(model, explicit_padding):
    """The .tflite bytes `deploy_report` reads; raises ValueError for what is none."""
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    if isinstance(model, (str, os.PathLike)):
        with open(model, "rb") as f:
            return f.read()
    if isinstance(model, keras.Model):
        with convert.named_errors("deploy_report()"):
            return convert.float_file(model, explicit_padding=explicit_padding)
    raise ValueError(
        f"deploy_report() takes a Keras model, a .tflite path or .tflite bytes, "
        f"got {type(model).__name__}.")


def _row(g, n, kind, reason, cluster, has_sparse):
    """The `DeployRow` of operator n, member of `cluster` (a `_Cluster` or None)."""
    op = g.index.operators[n]
    weight = g.constant(op.inputs[1]) if _is(g.index, n, _WEIGHTED) else None
    on_path = kind is not None and cluster is not None and not cluster.problems and has_sparse
    if kind is not None and not on_path:
        if cluster is None:
            reason += ("; but incompatible operators cut it off from any path "
                       "between a 3x3 stride-2 stem and a global mean")
        elif cluster.problems:
            reason += "; but its cluster is refused: " + cluster.problems[0]
        else:
            reason += "; but the file stores no weight sparse"
    return DeployRow(
        n, g.index.names[n], _layer(g.index.tensor(op.outputs[0]).name.decode(errors="replace")),
        tuple(weight.shape) if weight is not None else (),
        counting.zero_fraction(weight) if weight is not None else 0.0,
        bool(on_path), reason)


def _verdict(rows, clusters, has_sparse):
    if not has_sparse:
        return "the file stores no weight sparse, so XNNPACK does not try the sparse path"
    if any(not c.problems for c in clusters):
        return (f"{sum(r.sparse_path for r in rows)} of {len(rows)} operators run sparse "
                f"(on ARM and on x86 without AVX)")
    if clusters:
        return "no sparse cluster: " + "; ".join(sorted({p for c in clusters for p in c.problems[:3]}))
    return "no global spatial mean ends the network, so there is no sparse cluster"


def deploy_report(model, *, explicit_padding=True):
    """Says, per operator, whether XNNPACK's sparse inference path can take it and why not.

    `model`: a .tflite path or bytes, or a Keras model (pruned or stripped),
    converted to the `model.tflite` that `export(model, ...,
    explicit_padding=explicit_padding)` writes. The default differs from
    export's (True here, False there): the report is about XNNPACK's sparse
    path, which needs the explicit form. Returns a `DeployReport`. Raises ValueError for anything else,
    and as `export` does for a Keras model it cannot convert.
    """
    litert.require_litert()
    g = _Graph.of(litert.read(_content(model, explicit_padding)))
    # DENSIFY expands static weights when the file is loaded; it runs no kernel.
    operators = [n for n in range(len(g.index.operators)) if not _is(g.index, n, ("DENSIFY",))]
    kinds, reasons = {}, {}
    for n in operators:
        kinds[n], reasons[n] = _compatibility(g, n)
    clusters = _clusters(g, kinds, reasons)
    cluster_of = {}
    for cluster in clusters:
        for n in cluster.members:
            cluster_of.setdefault(n, cluster)
    has_sparse = bool(g.sparse)
    rows = tuple(_row(g, n, kinds[n], reasons[n], cluster_of.get(n), has_sparse) for n in operators)
    return DeployReport(
        rows, has_sparse and any(not c.problems for c in clusters), _verdict(rows, clusters, has_sparse),
        float(max(c.pointwise_sparsity for c in clusters)) if clusters else 0.0)
