"""The one road from a Keras model to the LiteRT bytes `export` ships and `deploy_report` reads.

A stripped model is saved as a SavedModel and converted with
`tf.lite.Optimize.EXPERIMENTAL_SPARSITY`; each sparse-encoded weight is then
stored the way that is smallest and runs (see `sparse_tensors`), and the file
is loaded in the default LiteRT interpreter (XNNPACK on) and checked against
the Keras model: a file is never larger than its dense form.
"""

import contextlib
import dataclasses
import logging
import os
import re
import tempfile

import keras
import numpy as np
import tensorflow as tf

from dg2pf_tf import _compat
from dg2pf_tf.core import masking
from dg2pf_tf.core.strip import strip
from dg2pf_tf.deploy import litert, padding, sparse_tensors
from dg2pf_tf.model import clone

# A float file must compute what Keras computes: float32 sums in another order (XNNPACK's,
# not oneDNN's) differ by up to ~2e-5 of the largest output on a trained ResNet-50 at
# 224x224, a wrongly stored weight by orders of magnitude more.
FLOAT_ATOL = 1e-4


@contextlib.contextmanager
def named_errors(caller):
    """Re-raises the ValueError/RuntimeError of this module's checks with `caller`
    ('export()', 'deploy_report()') in front, so a user sees which call refused."""
    try:
        yield
    except (ValueError, RuntimeError) as error:
        message = str(error)
        if message.startswith(caller):
            raise
        raise type(error)(f"{caller}: {message}") from None


@dataclasses.dataclass(frozen=True)
class LiteRTFile:
    """A checked LiteRT file: its bytes, how each sparse weight is stored (rows
    of export.json's `tensors`), and its check score (max |difference| for
    float, top-1 agreement for quantized)."""

    content: bytes
    tensors: list
    score: float


def plain_model(model, input_shape=None):
    """`model` without masks (stripped if pruned), rebuilt for inputs of
    `input_shape` (without the batch axis) if given.

    Raises ValueError: `input_shape` for a model that is not a single-input
    Sequential/Functional one.
    """
    plain = strip(model) if masking.pruned_models(model) else model
    if input_shape is None:
        return plain
    if not _compat.is_graph_model(plain) or len(plain.inputs) != 1:
        raise ValueError(
            f"`input_shape` applies to single-input Sequential/Functional models; "
            f"build '{plain.name}' at the size to export instead.")
    inputs = keras.Input(shape=tuple(input_shape), dtype=plain.inputs[0].dtype,
                         name=_compat.producer(plain.inputs[0]).name)
    return clone.copy(plain, inputs=inputs)


def input_shapes(model):
    """The input shapes of built `model` (batch axis first), Functional or subclassed.

    Raises ValueError when the model records none.
    """
    if getattr(model, "inputs", None):
        return [tuple(x.shape) for x in model.inputs]
    shape = (model.get_build_config() or {}).get("input_shape")
    if shape is None:
        raise ValueError(
            f"model '{model.name}' records no input shape. Build it with "
            f"`model.build(input_shape)` or call it on a batch first.")
    nested = isinstance(shape, (list, tuple)) and shape and isinstance(shape[0], (list, tuple))
    return [tuple(s) for s in shape] if nested else [tuple(shape)]


def check_single_input(model, shapes):
    """Raises ValueError unless `model` takes one input of a fixed size (`shapes`: its input shapes)."""
    if len(shapes) != 1:
        raise ValueError(
            f"model '{model.name}' has {len(shapes)} inputs; LiteRT files are made and "
            f"checked for single-input models (export it with tflite=False).")
    if any(d is None for d in shapes[0][1:]):
        raise ValueError(
            f"model '{model.name}' takes inputs of shape {shapes[0]}, with sizes left "
            f"open; a LiteRT file needs fixed ones. Pass input_shape=(...) to export (e.g. "
            f"{tuple(8 if d is None else d for d in shapes[0][1:])}), or tflite=False.")


def _samples(data, limit=256):
    """Up to `limit` input examples from an array or a dataset of x or (x, y)."""
    if isinstance(data, tf.data.Dataset):
        batches, count = [], 0
        for element in data:
            x = np.asarray(element[0] if isinstance(element, (tuple, list)) else element)
            batches.append(x)
            count += len(x)
            if count >= limit:
                break
        if not batches:
            raise ValueError("`representative_data` yielded no example.")
        return np.concatenate(batches)[:limit].astype(np.float32)
    x = np.asarray(data, dtype=np.float32)
    if x.ndim == 0 or len(x) == 0:
        raise ValueError("`representative_data` holds no example.")
    return x[:limit]


def check_data(model, shape, representative_data=None):
    """`(inputs, reference)`: the inputs LiteRT files are checked on (up to 256
    of `representative_data`, else 8 random ones of `shape`, batch axis first)
    and `model`'s outputs on them.

    Raises ValueError: no example in `representative_data`, several outputs.
    """
    if representative_data is not None:
        inputs = _samples(representative_data)
    else:
        inputs = np.random.default_rng(0).normal(size=[8, *shape[1:]]).astype(np.float32)
    outputs = keras.tree.flatten(model(inputs, training=False))
    if len(outputs) != 1:
        raise ValueError(
            f"model '{model.name}' has {len(outputs)} outputs; LiteRT files are checked "
            f"for single-output models (export it with tflite=False).")
    return inputs, np.asarray(outputs[0], dtype=np.float32)


def _warnings_and_above(record):
    return record.levelno >= logging.WARNING


@contextlib.contextmanager
def _tensorflow_warnings_only():
    # Saving and converting log each renamed input, shard and asset at INFO
    # level: bookkeeping of TensorFlow's, not news for the user. A filter, not
    # a level: TensorFlow resets absl's level while it saves.
    loggers = [logging.getLogger(name) for name in ("tensorflow", "absl")]
    for logger in loggers:
        logger.addFilter(_warnings_and_above)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_warnings_and_above)


def save(model, path):
    """Writes `model` as a SavedModel with a `serving_default` signature."""
    with _tensorflow_warnings_only():
        model.export(path, format="tf_saved_model", verbose=False)


def _converted(saved_model, quantize, calibration, explicit_padding):
    with _tensorflow_warnings_only():
        return _convert(saved_model, quantize, calibration, explicit_padding)


def _convert(saved_model, quantize, calibration, explicit_padding):
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    if quantize:
        converter.optimizations.append(tf.lite.Optimize.DEFAULT)
    if quantize == "int8":
        converter.representative_dataset = lambda: ([calibration[i : i + 1]] for i in range(len(calibration)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    content = converter.convert()
    if explicit_padding and not quantize:
        tree = litert.read(content)
        if padding.explicit_padding(tree):
            content = litert.write(tree)
    return content


def _agreement(outputs, reference, quantized):
    """What the check measures: max |difference| (float) or top-1 agreement (int8)."""
    if quantized:
        return float(np.mean(outputs.argmax(-1) == reference.argmax(-1)))
    return float(np.max(np.abs(outputs - reference)))


def _accepted(score, reference, quantized):
    # Quantization error is the price the user asked for (reported, warned
    # about by `export`); a float file must compute what the Keras model computes.
    return quantized or score <= FLOAT_ATOL * max(1.0, float(np.max(np.abs(reference))))


@dataclasses.dataclass
class _Refused:
    """What the default interpreter refused so far: the operator types whose
    quantized sparse weights it failed on, or (`everything`) any sparse weight."""

    kernels: set = dataclasses.field(default_factory=set)
    everything: bool = False

    def dense(self, sparse):
        return self.everything or (sparse.quantized and bool(self.kernels & set(sparse.kernels)))


def _choice(graph, sparse, refused):
    """`(encoding, reason, sizes)` for `sparse`: the smallest of dense, CSR and
    the converter's own encoding, unless the interpreter refused it sparse."""
    tensor = graph.tensor(sparse.index)
    sizes = {"converter": sparse_tensors.stored_bytes(tensor, graph.model.buffers[tensor.buffer].data),
             "dense": sparse.dense.nbytes}
    if all(name == "DENSIFY" for name in sparse.consumers):
        # DENSIFY reads any layout; kernels that take sparse weights
        # directly accept just the converter's.
        sizes["csr"] = sparse_tensors.csr_bytes(sparse.dense)
    if refused.dense(sparse):
        return "dense", "the default interpreter refused it sparse", sizes
    return min(sizes, key=lambda k: (sizes[k], k != "dense")), "smallest", sizes


def _reencoded(content, refused):
    """`(bytes, rows)`: `content` with each sparse weight stored as `_choice` says."""
    model, rows = litert.read(content), []
    for graph in litert.indexes(model):
        for sparse in sparse_tensors.sparse_tensors(graph):
            choice, reason, sizes = _choice(graph, sparse, refused)
            if choice != "converter":
                sparse_tensors.set_encoding(graph, sparse, choice)
            rows.append({"name": sparse.name, "shape": list(sparse.dense.shape),
                         "sparsity": round(sparse.sparsity, 6), "kernels": sparse.kernels,
                         "encoding": choice, "bytes": sizes[choice],
                         "dense_bytes": sizes["dense"], "reason": reason})
    return litert.write(model), rows


def _encoded(content, inputs, reference, quantized):
    """The checked `LiteRTFile` of converted `content`.

    When the default interpreter refuses the file ("failed to delegate
    CONV_2D"), the quantized sparse weights of that operator type are stored
    dense and the file is tried again; failing that, every weight is stored
    dense. Raises RuntimeError if even the dense file fails or is off.
    """
    refused, failures = _Refused(), []
    while True:
        candidate, rows = _reencoded(content, refused)
        try:
            score = _agreement(litert.predict(candidate, inputs), reference, quantized)
        except RuntimeError as error:
            failures.append(str(error))
            op = re.search(r"failed to delegate (\w+) node", str(error))
            if op and op.group(1) not in refused.kernels:
                refused.kernels.add(op.group(1))
                continue
        else:
            if _accepted(score, reference, quantized):
                return LiteRTFile(candidate, rows, score)
            failures.append(f"outputs off by {score:.3g}")
        if refused.everything:
            raise RuntimeError(
                "the default LiteRT interpreter does not run this model correctly "
                "even with dense weights: " + "; ".join(failures))
        refused.everything = True


def litert_file(saved_model, inputs, reference, *, quantize=None, explicit_padding=False):
    """The checked `LiteRTFile` of SavedModel directory `saved_model`.

    `quantize`: None (float32), 'dynamic' or 'int8' (calibrated on `inputs`);
    `reference`: the Keras outputs on `inputs`; `explicit_padding`: symmetric
    SAME padding of float convolutions stored as PAD + VALID. Raises
    RuntimeError for a file the interpreter refuses in every form.
    """
    content = _converted(saved_model, quantize, inputs, explicit_padding)
    return _encoded(content, inputs, reference, bool(quantize))


def float_file(model, *, explicit_padding=False):
    """The bytes of the `model.tflite` that `export(model, ..., explicit_padding=...)`
    writes without `representative_data`.

    Raises ValueError (see `check_single_input`, `check_data`) and RuntimeError
    (see `litert_file`).
    """
    plain = plain_model(model)
    shapes = input_shapes(plain)
    check_single_input(plain, shapes)
    inputs, reference = check_data(plain, shapes[0])
    with tempfile.TemporaryDirectory(prefix="dg2pf-litert-") as tmp:
        saved_model = os.path.join(tmp, "saved_model")
        save(plain, saved_model)
        return litert_file(saved_model, inputs, reference, explicit_padding=explicit_padding).content
