"""Symmetric SAME padding of LiteRT convolutions rewritten as PAD + VALID.

The same numbers, in the form XNNPACK's sparse (NCHW) path accepts: it folds a
PAD into the next convolution but refuses TensorFlow's SAME flag. The
TensorFlow converter turns ZeroPadding2D + 'valid' back into SAME, so the
rewrite is done on the file.
"""

import numpy as np

from dg2pf_tf.deploy import litert
from dg2pf_tf.deploy.litert import flatbuffer_utils, schema


def _same_padding(size, kernel, stride, dilation):
    """(before, after) padding TensorFlow's SAME adds along one spatial axis."""
    extent = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + extent - size, 0)
    return total // 2, total - total // 2


def _symmetric_same(graph, n):
    """((top, bottom), (left, right)) of float convolution n if its SAME
    padding is symmetric and not zero, else None."""
    op, B = graph.operators[n], schema.BuiltinOperator
    if graph.codes[n] not in (B.CONV_2D, B.DEPTHWISE_CONV_2D):
        return None
    options, x = op.builtinOptions, graph.tensor(op.inputs[0])
    shape = graph.shape(op.inputs[0])
    if options.padding != schema.Padding.SAME or not litert.is_float(x.type) or len(shape) != 4:
        return None
    _, kh, kw, _ = graph.shape(op.inputs[1])
    pads = (_same_padding(shape[1], kh, options.strideH, options.dilationHFactor),
            _same_padding(shape[2], kw, options.strideW, options.dilationWFactor))
    return pads if all(a == b > 0 for a, b in pads) else None


def _opcode_index(model, builtin):
    """The position of `builtin`'s operator code in `model`, added if missing."""
    for i, code in enumerate(model.operatorCodes):
        if flatbuffer_utils.get_builtin_code_from_operator_code(code) == builtin:
            return i
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = builtin
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _new_tensor(model, graph, name, shape, dtype, data=None, like=None):
    """Appends a tensor (with its own buffer, holding `data` if given) to
    subgraph `graph`, quantized and batch-sized like tensor `like`; returns its index."""
    tensor = schema.TensorT()
    tensor.name = name.encode()
    tensor.shape = np.asarray(shape, np.int32)
    tensor.type = dtype
    if like is not None:
        tensor.shapeSignature = np.asarray(
            [-1 if s < 0 else d for s, d in zip(like.shapeSignature, shape)], np.int32
        ) if like.shapeSignature is not None else None
        tensor.quantization = like.quantization
    buffer = schema.BufferT()
    if data is not None:
        buffer.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
    model.buffers.append(buffer)
    tensor.buffer = len(model.buffers) - 1
    graph.tensors.append(tensor)
    return len(graph.tensors) - 1


def _pad_before(graph, n, pads):
    """A PAD operator computing convolution n's input padded by `pads`; n
    reads it, with VALID padding."""
    model, op = graph.model, graph.operators[n]
    x = graph.tensor(op.inputs[0])
    shape = graph.shape(op.inputs[0])
    base = x.name.decode(errors="replace")
    paddings = np.array([[0, 0], list(pads[0]), list(pads[1]), [0, 0]], np.int32)
    p = _new_tensor(model, graph.graph, base + "/explicit_paddings", [4, 2],
                    schema.TensorType.INT32, paddings)
    padded = [shape[0], shape[1] + sum(pads[0]), shape[2] + sum(pads[1]), shape[3]]
    y = _new_tensor(model, graph.graph, base + "/explicit_pad", padded, x.type, like=x)
    pad = schema.OperatorT()
    pad.opcodeIndex = _opcode_index(model, schema.BuiltinOperator.PAD)
    pad.inputs = np.array([int(op.inputs[0]), p], np.int32)
    pad.outputs = np.array([y], np.int32)
    pad.builtinOptionsType = schema.BuiltinOptions.PadOptions
    pad.builtinOptions = schema.PadOptionsT()
    op.inputs = np.array([y, *[int(i) for i in op.inputs[1:]]], np.int32)
    op.builtinOptions.padding = schema.Padding.VALID
    return pad


def explicit_padding(model):
    """Rewrites each float CONV_2D / DEPTHWISE_CONV_2D of `model` (a `ModelT`)
    whose SAME padding is symmetric as PAD + VALID; returns how many."""
    rewritten = 0
    for graph in litert.indexes(model):
        operators = []
        for n, op in enumerate(graph.operators):
            pads = _symmetric_same(graph, n)
            if pads is not None:
                operators.append(_pad_before(graph, n, pads))
                rewritten += 1
            operators.append(op)
        graph.graph.operators = operators
    return rewritten
