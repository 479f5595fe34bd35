"""Sparse constants in LiteRT files: decode them, encode CSR, store them another way.

A LiteRT file stores a sparse constant as values plus, per dimension, either a
dense extent or CSR segments and indices (the schema's `SparsityParameters`);
a DENSIFY operator expands it at load time. The converter sparse-encodes every
kernel with >= 30% zeros, sometimes in 1x4 blocks, even where that takes more
bytes than the dense tensor, and some runtimes (XNNPACK with int8 weights)
refuse sparse quantized kernels. This module lets `export` store each one
dense, in the converter's encoding or in plain CSR.
"""

import dataclasses

import numpy as np

from dg2pf_tf.counting import zero_fraction
from dg2pf_tf.deploy import litert
from dg2pf_tf.deploy.litert import schema


def _index_array(vector):
    return np.asarray(vector.values if vector is not None else [], dtype=np.int64)


def _level(meta, positions):
    """One traversal level: the positions below `positions`, how many each
    parent has, and the coordinate of each along this level's dimension."""
    if meta.format == schema.DimensionType.DENSE:
        size = int(meta.denseSize)
        below = (positions[:, None] * size + np.arange(size)).reshape(-1)
        return below, np.full(positions.size, size), np.tile(np.arange(size), positions.size)
    segments = _index_array(meta.arraySegments)
    starts, counts = segments[positions], segments[positions + 1] - segments[positions]
    below = np.arange(counts.sum()) + np.repeat(starts - np.cumsum(counts) + counts, counts)
    return below, counts, _index_array(meta.arrayIndices)[below]


def _dense_index(params, coords, rank):
    """The index into the dense array of each value, blocks folded into their dimensions."""
    order = [int(d) for d in params.traversalOrder]
    block_map = [int(d) for d in (params.blockMap if params.blockMap is not None else [])]
    index = []
    for dim in range(rank):
        outer = coords[dim]
        if dim in block_map:
            block = rank + block_map.index(dim)
            size = int(params.dimMetadata[order.index(block)].denseSize)
            outer = outer * size + coords[block]
        index.append(outer)
    return tuple(index)


def decode(tensor, data):
    """The dense numpy array of a sparse-encoded `tensor` whose buffer holds `data`."""
    params = tensor.sparsity
    shape = [int(d) for d in tensor.shape]
    values = np.frombuffer(bytes(data), dtype=litert.numpy_dtype(tensor.type))
    positions, coords = np.zeros(1, np.int64), {}
    for dim, meta in zip(params.traversalOrder, params.dimMetadata):
        positions, counts, coordinate = _level(meta, positions)
        coords = {d: np.repeat(c, counts) for d, c in coords.items()}
        coords[int(dim)] = coordinate
    dense = np.zeros(shape, values.dtype)
    dense[_dense_index(params, coords, len(shape))] = values[positions]
    return dense


def _index_vector(values):
    """`(SparseIndexVector type, vector)`: `values` in the narrowest index type that holds them.

    Raises ValueError when even int32 does not.
    """
    values = np.asarray(values)
    top = int(values.max()) if values.size else 0
    kinds = ((np.uint8, schema.SparseIndexVector.Uint8Vector, schema.Uint8VectorT),
             (np.uint16, schema.SparseIndexVector.Uint16Vector, schema.Uint16VectorT),
             (np.int32, schema.SparseIndexVector.Int32Vector, schema.Int32VectorT))
    for dtype, kind, vector_class in kinds:
        if top <= np.iinfo(dtype).max:
            vector = vector_class()
            vector.values = values.astype(dtype)
            return kind, vector
    raise ValueError("index too large for a LiteRT sparse tensor")


def _dimension(dimension_type, dense_size=0):
    meta = schema.DimensionMetadataT()
    meta.format, meta.denseSize = dimension_type, int(dense_size)
    return meta


def encode_csr(array):
    """`(SparsityParametersT, values)`: `array` in CSR over its last dimension
    (all other dimensions dense), the converter's unblocked layout."""
    array = np.asarray(array)
    rows = array.reshape(-1, array.shape[-1]) if array.ndim else array.reshape(1, 1)
    nonzero = rows != 0
    metas = [_dimension(schema.DimensionType.DENSE, size) for size in array.shape[:-1]]
    csr = _dimension(schema.DimensionType.SPARSE_CSR)
    csr.arraySegmentsType, csr.arraySegments = _index_vector(
        np.concatenate([[0], np.cumsum(nonzero.sum(axis=1))]))
    csr.arrayIndicesType, csr.arrayIndices = _index_vector(np.nonzero(nonzero)[1])
    params = schema.SparsityParametersT()
    params.traversalOrder = np.arange(array.ndim, dtype=np.int32)
    params.blockMap = None
    params.dimMetadata = [*metas, csr]
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
        return zero_fraction(self.dense)

    @property
    def quantized(self):
        return not litert.is_float(self.type)


def _kernels(graph, readers):
    """Names of the operators computing with a constant read by `readers`, past any DENSIFY."""
    kernels = []
    for n in readers:
        if graph.codes[n] == schema.BuiltinOperator.DENSIFY:
            kernels += [graph.names[k] for k in graph.readers(graph.operators[n].outputs[0])]
        else:
            kernels.append(graph.names[n])
    return kernels


def sparse_tensors(graph):
    """Every sparse-encoded constant tensor of `graph` (a `litert.OperatorIndex`)."""
    found = []
    for t, tensor in enumerate(graph.graph.tensors):
        if tensor.sparsity is None:
            continue
        readers = graph.readers(t)
        found.append(SparseTensor(
            graph.subgraph, t, tensor.name.decode(errors="replace"), tensor.type,
            decode(tensor, graph.model.buffers[tensor.buffer].data),
            [graph.names[n] for n in readers], _kernels(graph, readers),
        ))
    return found


def set_encoding(graph, sparse, encoding):
    """Stores `sparse` (a `SparseTensor` of `graph`, a `litert.OperatorIndex`)
    as 'dense' or 'csr'; returns its new stored bytes.

    'dense' also removes the DENSIFY operator that read it, so its consumers
    read the constant directly. Raises ValueError for another encoding.
    """
    model, tensor = graph.model, graph.tensor(sparse.index)
    if sum(t.buffer == tensor.buffer for g in model.subgraphs for t in g.tensors) > 1:
        # The converter shares one buffer among equal constants (all-zero ones).
        model.buffers.append(schema.BufferT())
        tensor.buffer = len(model.buffers) - 1
    buffer = model.buffers[tensor.buffer]
    if encoding == "csr":
        tensor.sparsity, values = encode_csr(sparse.dense)
    elif encoding == "dense":
        tensor.sparsity, values = None, sparse.dense
        _bypass_densify(graph, sparse.index)
    else:
        raise ValueError(f"unknown encoding {encoding!r}")
    buffer.data = np.frombuffer(np.ascontiguousarray(values).tobytes(), np.uint8)
    return stored_bytes(tensor, buffer.data)


def _bypass_densify(graph, index):
    """Points the readers of DENSIFY(`index`) at `index` and drops that DENSIFY."""
    densify = [n for n in graph.readers(index, schema.BuiltinOperator.DENSIFY)
               if list(graph.operators[n].inputs) == [index]]
    for n in densify:
        out = int(graph.operators[n].outputs[0])
        for reader in graph.readers(out):
            op = graph.operators[reader]
            op.inputs = np.asarray([index if i == out else i for i in op.inputs], np.int32)
        graph.graph.outputs = np.asarray(
            [index if i == out else i for i in graph.graph.outputs], np.int32)
    dropped = {id(graph.operators[n]) for n in densify}
    graph.graph.operators = [op for op in graph.graph.operators if id(op) not in dropped]


def all_dense(content):
    """The bytes of LiteRT file `content` with every sparse constant stored dense."""
    model = litert.read(content)
    for graph in litert.indexes(model):
        for sparse in sparse_tensors(graph):
            set_encoding(graph, sparse, "dense")
    return litert.write(model)
