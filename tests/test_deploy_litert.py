"""The LiteRT file layer: sparse encodings held against TFLite's own format converter, the operator index."""

import keras
import numpy as np
import pytest
import tensorflow as tf

pytest.importorskip("ai_edge_litert")

from ai_edge_litert import format_converter_wrapper_pybind11 as format_converter  # noqa: E402

import dg2pf_tf  # noqa: E402
from dg2pf_tf.deploy import convert, litert, sparse_tensors  # noqa: E402
from dg2pf_tf.deploy.litert import schema  # noqa: E402

_DENSE = format_converter.TfLiteDimensionType.TF_LITE_DIM_DENSE
_CSR = format_converter.TfLiteDimensionType.TF_LITE_DIM_SPARSE_CSR
SHAPES = [(7,), (5, 300), (4, 3, 3, 9), (1, 1), (6, 8)]


def _sparse_array(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * (rng.random(shape) > 0.8)).astype(np.float32)


def _tensor(params, shape):
    tensor = schema.TensorT()
    tensor.sparsity, tensor.shape = params, np.asarray(shape, np.int32)
    tensor.type = schema.TensorType.FLOAT32
    return tensor


def _tflite_encoding(array, formats, block_size=(), block_map=()):
    """TFLite's FormatConverter encoding of float32 `array`: (values, per-level metadata)."""
    levels = array.ndim + len(block_size)
    converter = format_converter.FormatConverterFp32(
        list(array.shape), list(range(levels)), formats, list(block_size), list(block_map))
    assert converter.DenseToSparse(array) == format_converter.TfLiteStatus.TF_LITE_OK
    metadata = converter.GetDimMetadata()
    return np.asarray(converter.GetData(), np.float32), [metadata[2 * i : 2 * i + 2] for i in range(levels)]


def test_csr_encoding_decodes_back_to_the_array():
    for shape in SHAPES:
        array = _sparse_array(shape)
        params, values = sparse_tensors.encode_csr(array)
        decoded = sparse_tensors.decode(_tensor(params, shape), values.tobytes())
        np.testing.assert_array_equal(decoded, array)


def test_csr_encoding_equals_tflites_format_converter():
    for shape in SHAPES:
        array = _sparse_array(shape, seed=1)
        params, values = sparse_tensors.encode_csr(array)
        theirs, levels = _tflite_encoding(array, [_DENSE] * (array.ndim - 1) + [_CSR])
        np.testing.assert_array_equal(values, theirs)
        assert list(params.traversalOrder) == list(range(array.ndim))
        for meta, (first, second) in zip(params.dimMetadata, levels):
            if meta.format == schema.DimensionType.DENSE:
                assert [meta.denseSize] == first and second == []
            else:
                assert list(meta.arraySegments.values) == first
                assert list(meta.arrayIndices.values) == second


def test_decode_reads_tflites_blocked_encoding():
    # The converter's layout at high sparsity: CSR over 1x4 blocks of the last dimension.
    array = _sparse_array((6, 16), seed=2)
    values, levels = _tflite_encoding(array, [_DENSE, _CSR, _DENSE], block_size=[4], block_map=[1])
    params = schema.SparsityParametersT()
    params.traversalOrder, params.blockMap, params.dimMetadata = [0, 1, 2], [1], []
    for fmt, (first, second) in zip([_DENSE, _CSR, _DENSE], levels):
        meta = schema.DimensionMetadataT()
        if fmt == _DENSE:
            meta.format, meta.denseSize = schema.DimensionType.DENSE, first[0]
        else:
            meta.format = schema.DimensionType.SPARSE_CSR
            meta.arraySegments, meta.arrayIndices = schema.Int32VectorT(), schema.Int32VectorT()
            meta.arraySegments.values, meta.arrayIndices.values = first, second
        params.dimMetadata.append(meta)
    decoded = sparse_tensors.decode(_tensor(params, array.shape), values.tobytes())
    np.testing.assert_array_equal(decoded, array)


def _sparse_file():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(4)])
    for layer in model.layers:
        kernel = layer.kernel.numpy()
        layer.kernel.assign(kernel * (np.random.default_rng(0).random(kernel.shape) > 0.9))
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    return model, converter.convert()


def test_operator_index_and_dense_storage_keep_the_file_computing_the_same():
    model, content = _sparse_file()
    index = litert.OperatorIndex.of(litert.read(content))
    assert "DENSIFY" in index.names and "FULLY_CONNECTED" in index.names
    for n, op in enumerate(index.operators):
        assert all(index.producer[int(t)] == n for t in op.outputs)
        assert all(n in index.readers(t) for t in op.inputs if t >= 0)
    sparse = sparse_tensors.sparse_tensors(index)
    assert sparse and all(s.consumers == ["DENSIFY"] and s.kernels == ["FULLY_CONNECTED"] for s in sparse)
    dense = sparse_tensors.all_dense(content)
    assert "DENSIFY" not in litert.OperatorIndex.of(litert.read(dense)).names
    x = np.random.default_rng(1).normal(size=(5, 32)).astype(np.float32)
    expected = model.predict(x, verbose=0)
    for file in (content, dense):
        np.testing.assert_allclose(litert.predict(file, x), expected, atol=1e-5)


def test_deploy_report_reads_the_file_export_writes_with_the_same_padding(tmp_path):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same")(inputs)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    for explicit in (True, False):
        dg2pf_tf.export(model, tmp_path / f"e{explicit}", explicit_padding=explicit, verbose=0)
        written = (tmp_path / f"e{explicit}" / "model.tflite").read_bytes()
        assert convert.float_file(model, explicit_padding=explicit) == written
    assert (dg2pf_tf.deploy_report(model).rows
            == dg2pf_tf.deploy_report((tmp_path / "eTrue" / "model.tflite").read_bytes()).rows)
