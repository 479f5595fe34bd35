"""`deploy_report`: can XNNPACK's sparse inference path take this model, and if not, why.

XNNPACK (LiteRT's CPU engine) runs a float model sparse when it finds a
cluster of operators it can compute in NCHW layout: entered through a 3x3
stride-2 convolution over 3 channels with padding 1 on each side, made of 1x1
stride-1 convolutions, 3x3/5x5 depthwise convolutions with explicit padding,
adds, multiplies and activations, and left through a global mean; and only
when more than 2/3 of the cluster's 1x1 convolution weights are zero. The
rules below mirror `xnn_check_nchw_compatibility` and
`xnn_subgraph_rewrite_for_nchw` in XNNPACK's src/subgraph.c. The runtime
takes that path on ARM (phones, Raspberry Pi) and x86 without AVX only, and
only when the file stores some weights sparse.
"""

import dataclasses
import os

import keras
import numpy as np

from dg2pf_tf import litert

_UNARY = {"RELU", "RELU6", "RELU_N1_TO_1", "RELU_0_TO_1", "LOGISTIC", "TANH", "HARD_SWISH",
          "ELU", "LEAKY_RELU", "ABS", "NEG", "SQUARE", "SQRT", "RSQRT", "GELU", "FLOOR",
          "CEIL", "ROUND", "EXP"}
_BINARY = {"ADD", "MUL"}
_SKIPPED = {"DENSIFY"}  # static weights, expanded when the model is loaded


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


class _Graph:
    def __init__(self, model):
        self.model = model
        self.graph = model.subgraphs[0]
        self.ops = list(self.graph.operators)
        self.names = [litert.op_name(model, op) for op in self.ops]
        self.producer, self.consumers = {}, {}
        for n, op in enumerate(self.ops):
            for t in op.outputs:
                self.producer[int(t)] = n
            for t in op.inputs:
                if t >= 0:
                    self.consumers.setdefault(int(t), []).append(n)
        self.sparse = {s.index: s.dense for s in litert.sparse_tensors(model) if s.subgraph == 0}
        self.outputs = {int(t) for t in self.graph.outputs}

    def tensor(self, index):
        return self.graph.tensors[int(index)]

    def shape(self, index):
        return [int(d) for d in self.tensor(index).shape]

    def constant(self, index):
        """The value of a constant tensor (through DENSIFY), or None."""
        index = int(index)
        if index in self.producer and self.names[self.producer[index]] == "DENSIFY":
            index = int(self.ops[self.producer[index]].inputs[0])
        if index in self.sparse:
            return self.sparse[index]
        tensor = self.tensor(index)
        data = self.model.buffers[tensor.buffer].data
        if index in self.producer or data is None or len(data) == 0:
            return None
        return np.frombuffer(bytes(data), litert.NUMPY_TYPES.get(tensor.type, np.uint8)).reshape(
            self.shape(index))

    def activation_inputs(self, n):
        return [int(t) for t in self.ops[n].inputs if t >= 0 and self.constant(t) is None]

    def padding_from(self, n):
        """Explicit padding (top, bottom, left, right) of convolution n, with the
        PAD producing its input (XNNPACK fuses it) if any, and that PAD's index."""
        op = self.ops[n]
        if op.builtinOptions.padding == 0:  # SAME: XNNPACK keeps TensorFlow's flag
            return None, None
        source = int(op.inputs[0])
        pad = self.producer.get(source)
        if pad is not None and self.names[pad] in ("PAD", "PADV2"):
            values = self.constant(self.ops[pad].inputs[1])
            if values is not None and not values[0].any() and not values[3].any():
                return (int(values[1][0]), int(values[1][1]), int(values[2][0]), int(values[2][1])), pad
        return (0, 0, 0, 0), None


def _compatibility(g, n):
    """(kind, reason): kind is 'entry', 'nchw', 'exit', 'fused' or None (incompatible)."""
    name, op = g.names[n], g.ops[n]
    out_types = [g.tensor(t).type for t in op.outputs]
    in_types = [g.tensor(t).type for t in g.activation_inputs(n)]
    if any(t not in litert.FLOAT_TYPES for t in out_types + in_types):
        return None, "quantized: the sparse path computes in float only"
    if name in ("PAD", "PADV2"):
        users = g.consumers.get(int(op.outputs[0]), [])
        if users and all(g.names[u] in ("CONV_2D", "DEPTHWISE_CONV_2D")
                         and g.ops[u].builtinOptions.padding == 1 for u in users):
            return "fused", "zero padding folded into the next convolution"
        return None, "padding not followed by a 'valid' convolution"
    if name == "CONV_2D":
        o = op.builtinOptions
        out_c, kh, kw, in_c = g.shape(op.inputs[1])
        if g.shape(op.inputs[0])[-1] != in_c:
            return None, "grouped convolution"
        if (o.dilationHFactor, o.dilationWFactor) != (1, 1):
            return None, "dilated convolution"
        if (kh, kw) == (1, 1):
            if (o.strideH, o.strideW) != (1, 1):
                return None, f"1x1 convolution with stride {o.strideH}"
            return "nchw", "1x1 convolution: sparse kernel"
        if (kh, kw) == (3, 3):
            padding, _ = g.padding_from(n)
            if (o.strideH, o.strideW) != (2, 2) or in_c != 3:
                return None, "3x3 convolution that is not the stride-2 stem over 3 channels"
            if padding != (1, 1, 1, 1):
                why = "TensorFlow SAME padding" if padding is None else f"padding {padding}"
                return None, f"3x3 stride-2 stem with {why}; it needs 1 on each side"
            return "entry", "3x3 stride-2 stem over 3 channels: enters the sparse path"
        return None, f"{kh}x{kw} convolution (only 1x1 and the 3x3 stride-2 stem)"
    if name == "DEPTHWISE_CONV_2D":
        o = op.builtinOptions
        _, kh, kw, _ = g.shape(op.inputs[1])
        if (o.dilationHFactor, o.dilationWFactor) != (1, 1):
            return None, "dilated depthwise convolution"
        if o.depthMultiplier not in (0, 1) and g.shape(op.inputs[1])[-1] != g.shape(op.inputs[0])[-1]:
            return None, "depth multiplier > 1"
        if o.strideH != o.strideW or o.strideH not in (1, 2) or kh != kw or kh not in (3, 5):
            return None, f"{kh}x{kw} depthwise with stride {o.strideH}x{o.strideW} (3x3/5x5, stride 1 or 2)"
        padding, _ = g.padding_from(n)
        want = (kh // 2,) * 4
        if padding != want:
            why = ("TensorFlow SAME padding (export(..., explicit_padding=True) stores "
                   "symmetric SAME padding as PAD + VALID)") if padding is None else f"padding {padding}"
            return None, f"{why}; it needs {kh // 2} on each side"
        return "nchw", "depthwise convolution (runs dense inside the sparse path)"
    if name in _BINARY:
        if any(len(g.shape(t)) != 4 for t in g.activation_inputs(n)):
            return None, "inputs are not 4-D"
        return "nchw", "elementwise"
    if name in _UNARY:
        if len(g.shape(op.inputs[0])) != 4:
            return None, "input is not 4-D"
        return "nchw", "activation"
    if name == "MEAN":
        axes = g.constant(op.inputs[1])
        if len(g.shape(op.inputs[0])) == 4 and axes is not None and sorted(axes.reshape(-1).tolist()) == [1, 2]:
            return "exit", "global mean: leaves the sparse path"
        return None, "mean that is not a global spatial mean"
    return None, f"{name} is not supported by the sparse path"


def _analyse(model):
    g = _Graph(model)
    kinds, reasons = {}, {}
    for n, name in enumerate(g.names):
        if name not in _SKIPPED:
            kinds[n], reasons[n] = _compatibility(g, n)

    # Grow a cluster backwards from each exit through compatible producers.
    cluster_of, clusters = {}, []
    for exit_node in [n for n, k in kinds.items() if k == "exit"]:
        members, problems, stack = set(), [], [exit_node]
        while stack:
            n = stack.pop()
            if n in members:
                continue
            members.add(n)
            if kinds[n] == "entry":
                _, pad = g.padding_from(n)
                if pad is not None:
                    members.add(pad)
                continue
            for t in g.activation_inputs(n):
                p = g.producer.get(t)
                if p is None:
                    problems.append(f"{g.names[n]} reads the model input directly "
                                    f"(no 3x3 stride-2 stem before it)")
                elif kinds.get(p) is None:
                    problems.append(f"fed by {g.names[p]} ({reasons[p]})")
                else:
                    stack.append(p)
        for n in members:
            if n == exit_node:
                continue
            for t in g.ops[n].outputs:
                outside = [u for u in g.consumers.get(int(t), []) if u not in members]
                if outside or int(t) in g.outputs:
                    problems.append(f"{g.names[n]} output also used outside (by "
                                    f"{', '.join(g.names[u] for u in outside) or 'the model output'})")
        params = zeros = 0
        for n in members:
            if g.names[n] == "CONV_2D" and kinds[n] == "nchw":
                w = g.constant(g.ops[n].inputs[1])
                params, zeros = params + w.size, zeros + int(w.size - np.count_nonzero(w))
        ratio = zeros / params if params else 0.0
        if not params:
            problems.append("no 1x1 convolution to run sparse")
        elif zeros * 3 <= params * 2:
            problems.append(f"1x1 convolutions are {ratio:.1%} zeros; XNNPACK needs more than 2/3")
        index = len(clusters)
        clusters.append((members, problems, ratio))
        for n in members:
            cluster_of.setdefault(n, index)
    return g, kinds, reasons, cluster_of, clusters


def deploy_report(model, *, explicit_padding=True):
    """Says, per operator, whether XNNPACK's sparse inference path can take it and why not.

    `model`: a Keras model (pruned or stripped; converted here as `export`
    would, with `explicit_padding`), a .tflite path, or .tflite bytes.
    Returns a `DeployReport`. Raises ValueError for anything else.
    """
    litert.require_litert()
    if isinstance(model, (bytes, bytearray)):
        content = bytes(model)
    elif isinstance(model, (str, os.PathLike)):
        with open(model, "rb") as f:
            content = f.read()
    elif isinstance(model, keras.Model):
        content = _convert(model, explicit_padding)
    else:
        raise ValueError(
            f"deploy_report() takes a Keras model, a .tflite path or .tflite bytes, "
            f"got {type(model).__name__}.")
    g, kinds, reasons, cluster_of, clusters = _analyse(litert.read(content))
    has_sparse = bool(g.sparse)
    good = {i for i, (_, problems, _) in enumerate(clusters) if not problems}
    rows = []
    for n, name in enumerate(g.names):
        if name in _SKIPPED:
            continue
        weight = g.constant(g.ops[n].inputs[1]) if name in ("CONV_2D", "DEPTHWISE_CONV_2D",
                                                             "FULLY_CONNECTED") else None
        on_path = kinds[n] is not None and cluster_of.get(n) in good and has_sparse
        reason = reasons[n]
        if kinds[n] is not None and not on_path:
            if n not in cluster_of:
                reason += ("; but incompatible operators cut it off from any path "
                           "between a 3x3 stride-2 stem and a global mean")
            elif cluster_of[n] not in good:
                reason += "; but its cluster is refused: " + clusters[cluster_of[n]][1][0]
            else:
                reason += "; but the file stores no weight sparse"
        rows.append(DeployRow(
            n, name, _layer(g.tensor(g.ops[n].outputs[0]).name.decode(errors="replace")),
            tuple(weight.shape) if weight is not None else (),
            float(1 - np.count_nonzero(weight) / weight.size) if weight is not None else 0.0,
            bool(on_path), reason))
    ratios = [r for _, _, r in clusters]
    if not has_sparse:
        verdict = "the file stores no weight sparse, so XNNPACK does not try the sparse path"
    elif good:
        verdict = (f"{sum(r.sparse_path for r in rows)} of {len(rows)} operators run sparse "
                   f"(on ARM and on x86 without AVX)")
    elif clusters:
        verdict = "no sparse cluster: " + "; ".join(sorted({p for _, ps, _ in clusters for p in ps[:3]}))
    else:
        verdict = "no global spatial mean ends the network, so there is no sparse cluster"
    return DeployReport(tuple(rows), bool(good) and has_sparse, verdict,
                        float(max(ratios)) if ratios else 0.0)


def _convert(model, explicit_padding):
    import tensorflow as tf

    from dg2pf_tf.masking import pruned_models
    from dg2pf_tf.prune import strip

    plain = strip(model) if pruned_models(model) else model
    converter = tf.lite.TFLiteConverter.from_keras_model(plain)
    converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    tree = litert.read(converter.convert())
    if explicit_padding:
        litert.explicit_padding(tree)
    return litert.write(tree)
