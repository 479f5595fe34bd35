"""LiteRT (.tflite) flatbuffers: read and re-encode sparse weight tensors, run a file.

No Keras here. A LiteRT file stores a sparse constant as values plus, per
dimension, either a dense extent or CSR segments and indices (the schema's
`SparsityParameters`); a DENSIFY operator expands it at load time. The
converter sparse-encodes every kernel with >= 30% zeros, sometimes in 1x4
blocks, even where that takes more bytes than the dense tensor, and some
runtimes (XNNPACK with int8 weights) refuse sparse quantized kernels. This
module lets `export` choose per tensor: dense, the converter's encoding, or a
plain CSR encoding, whichever is smallest and runs.
"""

import dataclasses

import numpy as np

try:
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema
except ImportError:  # ai-edge-litert is needed for LiteRT export only
    schema = None

NUMPY_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64,
                7: np.int16, 9: np.int8, 10: np.float64}
_DENSE, _CSR = 0, 1
FLOAT_TYPES = (0, 1)  # float32, float16
_INDEX_VECTORS = ((np.uint8, 3, "Uint8VectorT"), (np.uint16, 2, "Uint16VectorT"),
                  (np.int32, 1, "Int32VectorT"))


def require_litert():
    """Raises ImportError with the fix when ai-edge-litert is not installed."""
    if schema is None:
        raise ImportError(
            "LiteRT export needs the `ai-edge-litert` package (the LiteRT "
            "interpreter and flatbuffer schema): pip install ai-edge-litert"
        )


def read(content):
    """The object tree (`schema.ModelT`) of a .tflite file's bytes."""
    require_litert()
    return schema.ModelT.InitFromPackedBuf(bytearray(content), 0)


def write(model):
    """The bytes of a `schema.ModelT`."""
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _opcode(model, operator):
    code = model.operatorCodes[operator.opcodeIndex]
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def op_name(model, operator):
    """Builtin operator name of `operator` (e.g. 'CONV_2D')."""
    number = _opcode(model, operator)
    for name, value in vars(schema.BuiltinOperator).items():
        if value == number and not name.startswith("_"):
            return name
    return f"OP_{number}"


def _index_array(vector):
    return np.asarray(vector.values if vector is not None else [], dtype=np.int64)


def decode(tensor, data):
    """The dense numpy array of a sparse-encoded `tensor` whose buffer holds `data`."""
    params = tensor.sparsity
    shape = [int(d) for d in tensor.shape]
    values = np.frombuffer(bytes(data), dtype=NUMPY_TYPES[tensor.type])
    order = [int(d) for d in params.traversalOrder]
    block_map = [int(d) for d in (params.blockMap if params.blockMap is not None else [])]
    rank = len(shape)
    positions = np.zeros(1, np.int64)
    coords = {}
    for level, meta in enumerate(params.dimMetadata):
        if meta.format == _DENSE:
            size = int(meta.denseSize)
            new = (positions[:, None] * size + np.arange(size)).reshape(-1)
            counts = np.full(positions.size, size)
            coordinate = np.tile(np.arange(size), positions.size)
        else:
            segments = _index_array(meta.arraySegments)
            starts, counts = segments[positions], segments[positions + 1] - segments[positions]
            new = np.arange(counts.sum()) + np.repeat(starts - np.cumsum(counts) + counts, counts)
            coordinate = _index_array(meta.arrayIndices)[new]
        coords = {d: np.repeat(c, counts) for d, c in coords.items()}
        coords[order[level]] = coordinate
        positions = new
    index = []
    for dim in range(rank):
        outer = coords[dim]
        if dim in block_map:
            block = rank + block_map.index(dim)
            size = int(params.dimMetadata[order.index(block)].denseSize)
            outer = outer * size + coords[block]
        index.append(outer)
    dense = np.zeros(shape, values.dtype)
    dense[tuple(index)] = values[positions]
    return dense


def _index_vector(values):
    values = np.asarray(values)
    top = int(values.max()) if values.size else 0
    for dtype, kind, cls in _INDEX_VECTORS:
        if top <= np.iinfo(dtype).max:
            vector = getattr(schema, cls)()
            vector.values = values.astype(dtype)
            return kind, vector
    raise ValueError("index too large for a LiteRT sparse tensor")


def encode_csr(array):
    """`(SparsityParametersT, values)`: `array` in CSR over its last dimension
    (all other dimensions dense), the converter's unblocked layout."""
    array = np.asarray(array)
    rows = array.reshape(-1, array.shape[-1]) if array.ndim else array.reshape(1, 1)
    nonzero = rows != 0
    metas = []
    for size in array.shape[:-1]:
        meta = schema.DimensionMetadataT()
        meta.format, meta.denseSize = _DENSE, int(size)
        metas.append(meta)
    meta = schema.DimensionMetadataT()
    meta.format = _CSR
    meta.arraySegmentsType, meta.arraySegments = _index_vector(
        np.concatenate([[0], np.cumsum(nonzero.sum(axis=1))]))
    meta.arrayIndicesType, meta.arrayIndices = _index_vector(np.nonzero(nonzero)[1])
    metas.append(meta)
    params = schema.SparsityParametersT()
    params.traversalOrder = np.arange(array.ndim, dtype=np.int32)
    params.blockMap = None
    params.dimMetadata = metas
    return params, rows[nonzero]


def _vector_bytes(vector):
    return 0 if vector is None else np.asarray(vector.values).nbytes


def _encoded_bytes(params, data):
    total = 0 if data is None else len(data)
    if params is not None:
        for meta in params.dimMetadata:
            total += _vector_bytes(meta.arraySegments) + _vector_bytes(meta.arrayIndices)
    return total


def stored_bytes(tensor, data):
    """Bytes a tensor takes in the file: values plus any sparse index arrays."""
    return _encoded_bytes(tensor.sparsity, data)


def csr_bytes(array):
    """Bytes `array` would take stored by `encode_csr`."""
    params, values = encode_csr(array)
    return _encoded_bytes(params, values.tobytes())


@dataclasses.dataclass
class SparseTensor:
    """A sparse-encoded constant: where it is, the dense array it stands for,
    the operators reading it (`consumers`) and the ones computing with it,
    past any DENSIFY (`kernels`)."""

    subgraph: int
    index: int
    name: str
    type: int
    dense: np.ndarray
    consumers: list
    kernels: list

    @property
    def sparsity(self):
        return 1.0 - np.count_nonzero(self.dense) / max(1, self.dense.size)

    @property
    def quantized(self):
        return self.type not in FLOAT_TYPES


def _readers(model, graph, index):
    return [op for op in graph.operators if index in list(op.inputs)]


def sparse_tensors(model):
    """Every sparse-encoded constant tensor of `model` (a `ModelT`)."""
    found = []
    for g, graph in enumerate(model.subgraphs):
        for t, tensor in enumerate(graph.tensors):
            if tensor.sparsity is None:
                continue
            readers = _readers(model, graph, t)
            kernels = []
            for op in readers:
                if op_name(model, op) == "DENSIFY":
                    kernels += [op_name(model, k) for k in _readers(model, graph, int(op.outputs[0]))]
                else:
                    kernels.append(op_name(model, op))
            found.append(SparseTensor(
                g, t, tensor.name.decode(errors="replace"), tensor.type,
                decode(tensor, model.buffers[tensor.buffer].data),
                [op_name(model, op) for op in readers], kernels,
            ))
    return found


def set_encoding(model, sparse, encoding):
    """Stores `sparse` (a `SparseTensor` of `model`) as 'dense' or 'csr'.

    'dense' also removes the DENSIFY operator that read it, so its consumers
    read the constant directly. Returns the tensor's new stored bytes.
    """
    graph = model.subgraphs[sparse.subgraph]
    tensor = graph.tensors[sparse.index]
    if _buffer_users(model, tensor.buffer) > 1:
        # The converter shares one buffer among equal constants (all-zero ones).
        model.buffers.append(schema.BufferT())
        tensor.buffer = len(model.buffers) - 1
    buffer = model.buffers[tensor.buffer]
    if encoding == "csr":
        tensor.sparsity, values = encode_csr(sparse.dense)
    elif encoding == "dense":
        tensor.sparsity, values = None, sparse.dense
        _bypass_densify(model, graph, sparse.index)
    else:
        raise ValueError(f"unknown encoding {encoding!r}")
    buffer.data = np.frombuffer(np.ascontiguousarray(values).tobytes(), np.uint8)
    return stored_bytes(tensor, buffer.data)


def _buffer_users(model, buffer):
    return sum(t.buffer == buffer for g in model.subgraphs for t in g.tensors)


def _bypass_densify(model, graph, index):
    kept = []
    for op in graph.operators:
        if op_name(model, op) == "DENSIFY" and list(op.inputs) == [index]:
            out = int(op.outputs[0])
            for other in graph.operators:
                other.inputs = np.asarray([index if i == out else i for i in other.inputs], np.int32)
            graph.outputs = np.asarray([index if i == out else i for i in graph.outputs], np.int32)
        else:
            kept.append(op)
    graph.operators = kept


def interpreter(content, num_threads=None):
    """A LiteRT interpreter with its default delegates (XNNPACK on CPU), allocated.

    Raises RuntimeError with the runtime's message when it refuses the file.
    """
    require_litert()
    from ai_edge_litert.interpreter import Interpreter

    try:
        runner = Interpreter(model_content=bytes(content), num_threads=num_threads)
        runner.allocate_tensors()
    except (RuntimeError, ValueError) as error:
        raise RuntimeError(str(error).strip()) from None
    return runner


def predict(content, inputs, runner=None):
    """Runs a single-input, single-output file on `inputs` (a batch); returns outputs."""
    runner = runner or interpreter(content)
    detail = runner.get_input_details()[0]
    inputs = np.asarray(inputs)
    if tuple(detail["shape"]) != inputs.shape:
        runner.resize_tensor_input(detail["index"], inputs.shape)
        runner.allocate_tensors()
        detail = runner.get_input_details()[0]
    scale, zero = detail["quantization"]
    if detail["dtype"] != np.float32 and scale:
        inputs = np.round(inputs / scale + zero)
    runner.set_tensor(detail["index"], inputs.astype(detail["dtype"]))
    runner.invoke()
    out = runner.get_output_details()[0]
    result = runner.get_tensor(out["index"])
    scale, zero = out["quantization"]
    if out["dtype"] != np.float32 and scale:
        result = (result.astype(np.float32) - zero) * scale
    return result


def _same_padding(size, kernel, stride, dilation):
    """(before, after) padding TensorFlow's SAME adds along one spatial axis."""
    extent = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + extent - size, 0)
    return total // 2, total - total // 2


def _opcode_index(model, builtin):
    for i, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            return i
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = builtin
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _new_tensor(model, graph, name, shape, dtype, data=None, like=None):
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


def explicit_padding(model):
    """Rewrites each float CONV_2D / DEPTHWISE_CONV_2D whose TensorFlow SAME
    padding is symmetric as PAD + VALID: the same numbers, but the form
    XNNPACK's sparse (NCHW) path accepts (it folds the PAD back into the
    convolution, refuses the SAME flag). The TensorFlow converter turns
    ZeroPadding2D + 'valid' into SAME, so this is done on the file. Returns
    the number of operators rewritten.
    """
    rewritten = 0
    pad_code = None
    for graph in model.subgraphs:
        operators = []
        for op in graph.operators:
            name = op_name(model, op)
            options = op.builtinOptions
            if name in ("CONV_2D", "DEPTHWISE_CONV_2D") and options.padding == schema.Padding.SAME:
                x = graph.tensors[int(op.inputs[0])]
                kernel = [int(d) for d in graph.tensors[int(op.inputs[1])].shape]
                shape = [int(d) for d in x.shape]
                pads = [_same_padding(shape[1], kernel[1], options.strideH, options.dilationHFactor),
                        _same_padding(shape[2], kernel[2], options.strideW, options.dilationWFactor)]
                if x.type in FLOAT_TYPES and len(shape) == 4 and all(a == b > 0 for a, b in pads):
                    pad_code = _opcode_index(model, schema.BuiltinOperator.PAD) if pad_code is None else pad_code
                    paddings = np.array([[0, 0], list(pads[0]), list(pads[1]), [0, 0]], np.int32)
                    base = x.name.decode(errors="replace")
                    p = _new_tensor(model, graph, base + "/explicit_paddings", [4, 2], 2, paddings)
                    padded_shape = [shape[0], shape[1] + 2 * pads[0][0], shape[2] + 2 * pads[1][0], shape[3]]
                    y = _new_tensor(model, graph, base + "/explicit_pad", padded_shape, x.type, like=x)
                    pad = schema.OperatorT()
                    pad.opcodeIndex = pad_code
                    pad.inputs = np.array([int(op.inputs[0]), p], np.int32)
                    pad.outputs = np.array([y], np.int32)
                    pad.builtinOptionsType = schema.BuiltinOptions.PadOptions
                    pad.builtinOptions = schema.PadOptionsT()
                    operators.append(pad)
                    op.inputs = np.array([y, *[int(i) for i in op.inputs[1:]]], np.int32)
                    options.padding = schema.Padding.VALID
                    rewritten += 1
            operators.append(op)
        graph.operators = operators
    return rewritten
