"""`export()`: what ships: a SavedModel and LiteRT files whose zeros take no space.

The LiteRT files are converted with `tf.lite.Optimize.EXPERIMENTAL_SPARSITY`,
then each sparse-encoded weight is stored the way that is smallest and runs
(see `litert`): an exported file is never larger than its dense form, and
every file is loaded and run in the default LiteRT interpreter (XNNPACK on)
and checked against the Keras model before it is written.
"""

import json
import os
import re
import shutil
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

from dg2pf_tf import _compat, litert, masking
from dg2pf_tf.prune import strip
from dg2pf_tf.summary import sparsity_summary

QUANTIZE = (None, "dynamic", "int8")
_FLOAT_ATOL = 1e-5
_INT8_AGREEMENT = 0.99


def _check_path(path, overwrite):
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(
            f"export(): the parent directory of {path!r} does not exist; create "
            f"{parent!r} first."
        )
    if os.path.isfile(path):
        raise FileExistsError(f"export(): {path!r} is a file; give a directory path.")
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            raise FileExistsError(
                f"export(): {path!r} is not empty. Choose a new directory or pass "
                f"overwrite=True to replace its contents."
            )
        shutil.rmtree(path)
    return path


def _samples(data, limit=256):
    """Up to `limit` input examples from an array or a dataset of x or (x, y)."""
    if isinstance(data, tf.data.Dataset):
        batches, count = [], 0
        for element in data:
            x = element[0] if isinstance(element, (tuple, list)) else element
            x = np.asarray(x)
            batches.append(x)
            count += len(x)
            if count >= limit:
                break
        if not batches:
            raise ValueError("export(): `representative_data` yielded no example.")
        return np.concatenate(batches)[:limit].astype(np.float32)
    x = np.asarray(data, dtype=np.float32)
    if x.ndim == 0 or len(x) == 0:
        raise ValueError("export(): `representative_data` holds no example.")
    return x[:limit]


def _converter(saved_model, quantize, calibration, explicit_padding):
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
        if litert.explicit_padding(tree):
            content = litert.write(tree)
    return content


def _agreement(outputs, reference, quantized):
    """What the check measures: max |difference| (float) or top-1 agreement (int8)."""
    if quantized:
        return float(np.mean(outputs.argmax(-1) == reference.argmax(-1)))
    return float(np.max(np.abs(outputs - reference)))


def _accepted(score, reference, quantized):
    # Quantization error is the price the user asked for (reported, warned
    # about below); a float file must compute what the Keras model computes.
    return quantized or score <= _FLOAT_ATOL * max(1.0, float(np.max(np.abs(reference))))


def _encode(content, inputs, reference, quantized):
    """Chooses each sparse tensor's encoding; returns `(bytes, tensors, score)`.

    First the smallest of dense, CSR and the converter's own encoding. When
    the default interpreter refuses the file ("failed to delegate CONV_2D"),
    the quantized sparse weights of that operator type are stored dense and
    the file is tried again; failing that, every weight is stored dense.
    Raises RuntimeError if even the dense file fails or is off.
    """
    refused, failures = set(), []
    while True:
        model = litert.read(content)
        rows = []
        for sparse in litert.sparse_tensors(model):
            tensor = model.subgraphs[sparse.subgraph].tensors[sparse.index]
            sizes = {"converter": litert.stored_bytes(tensor, model.buffers[tensor.buffer].data),
                     "dense": sparse.dense.nbytes}
            if all(name == "DENSIFY" for name in sparse.consumers):
                # DENSIFY reads any layout; kernels that take sparse weights
                # directly accept just the converter's.
                sizes["csr"] = litert.csr_bytes(sparse.dense)
            choice, reason = min(sizes, key=lambda k: (sizes[k], k != "dense")), "smallest"
            if "*" in refused or (sparse.quantized and refused & set(sparse.kernels)):
                choice, reason = "dense", "the default interpreter refused it sparse"
            if choice != "converter":
                litert.set_encoding(model, sparse, choice)
            rows.append({"name": sparse.name, "shape": list(sparse.dense.shape),
                         "sparsity": round(sparse.sparsity, 6), "kernels": sparse.kernels,
                         "encoding": choice, "bytes": sizes[choice],
                         "dense_bytes": sizes["dense"], "reason": reason})
        candidate = litert.write(model)
        try:
            score = _agreement(litert.predict(candidate, inputs), reference, quantized)
        except RuntimeError as error:
            failures.append(str(error))
            op = re.search(r"failed to delegate (\w+) node", str(error))
            if op and op.group(1) not in refused:
                refused.add(op.group(1))
                continue
        else:
            if _accepted(score, reference, quantized):
                return candidate, rows, score
            failures.append(f"outputs off by {score:.3g}")
        if "*" in refused:
            raise RuntimeError(
                "export(): the default LiteRT interpreter does not run this model "
                "correctly even with dense weights: " + "; ".join(failures))
        refused.add("*")


def _dense_equivalent(content):
    model = litert.read(content)
    for sparse in litert.sparse_tensors(model):
        litert.set_encoding(model, sparse, "dense")
    return len(litert.write(model))


def export(model, path, *, tflite=True, quantize=None, representative_data=None,
           explicit_padding=False, input_shape=None, overwrite=False, verbose=1):
    """Writes what ships of `model` (pruned or stripped) into directory `path`.

    Files: `saved_model/` (a `serving_default` signature that needs only
    TensorFlow), `model.tflite` (float32, zeros stored sparse), with
    `quantize='dynamic'` (int8 weights) or `'int8'` (full-integer, calibrated
    on `representative_data`, float input and output) also
    `model_int8.tflite`, and `export.json`. Each LiteRT file is checked in the
    default interpreter against the Keras outputs on `representative_data`
    (random inputs when None): float files must match within 1e-5 (relative
    to the largest output), int8 files are reported with their top-1
    agreement and warn below 99%. Returns the `export.json` dict: sizes, dense-equivalent
    sizes, sparsity, per-tensor encodings. `explicit_padding=True` stores
    symmetric SAME padding of float convolutions as PAD + VALID, the form
    XNNPACK's sparse path needs (see `deploy_report`). LiteRT files take
    inputs of a fixed size: `input_shape` (without the batch axis) fixes the
    size of a Sequential/Functional model built for any (`None` dimensions).

    Raises:
        FileNotFoundError: the parent of `path` does not exist.
        FileExistsError: `path` is a file, or a non-empty directory and not
            `overwrite`.
        ValueError: bad `quantize`, 'int8' without `representative_data`; with
            `tflite=True`, a model with several inputs or outputs, or with
            inputs of no fixed size (pass `input_shape`).
        RuntimeError: a LiteRT file that the interpreter refuses in every form.
        ImportError: `tflite=True` without the `ai-edge-litert` package.
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"export(): `quantize` must be one of {QUANTIZE}, got {quantize!r}.")
    if quantize and not tflite:
        raise ValueError("export(): `quantize` applies to the LiteRT file; set tflite=True.")
    if quantize == "int8" and representative_data is None:
        raise ValueError(
            "export(): quantize='int8' needs `representative_data` (about 100 "
            "typical inputs, an array or a dataset) to calibrate activation ranges."
        )
    if tflite:
        litert.require_litert()
    plain = strip(model) if masking.pruned_models(model) else model
    if input_shape is not None:
        plain = _fixed_size(plain, input_shape)
    shapes = _input_shapes(plain)
    if tflite:
        _check_litert_inputs(plain, shapes)
    path = _check_path(path, overwrite)
    summary = sparsity_summary(plain)
    say = print if verbose else (lambda *a, **k: None)

    staging = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        saved_model = os.path.join(staging, "saved_model")
        plain.export(saved_model, format="tf_saved_model", verbose=False)
        _check_saved_zeros(saved_model, summary.total_zeros)
        report = {
            "sparsity_prunable": summary.prunable_sparsity,
            "sparsity_all_params": summary.total_sparsity,
            "params_total": summary.total_params,
            "params_nonzero": summary.total_params - summary.total_zeros,
            "files": {"saved_model": {"bytes": _tree_bytes(saved_model)}},
        }
        if tflite:
            if representative_data is not None:
                inputs = _samples(representative_data)
            else:
                shape = [8, *shapes[0][1:]]
                inputs = np.random.default_rng(0).normal(size=shape).astype(np.float32)
            outputs = keras.tree.flatten(plain(inputs, training=False))
            if len(outputs) != 1:
                raise ValueError(
                    f"export(): model '{plain.name}' has {len(outputs)} outputs; LiteRT export "
                    f"checks single-output models. Export it with tflite=False.")
            reference = np.asarray(outputs[0], dtype=np.float32)
            jobs = [("model.tflite", None)] + ([("model_int8.tflite", quantize)] if quantize else [])
            for name, mode in jobs:
                say(f"[export] converting {name} ({mode or 'float32'}, sparse weights)")
                content, tensors, score = _encode(
                    _converter(saved_model, mode, inputs, explicit_padding), inputs, reference, bool(mode))
                with open(os.path.join(staging, name), "wb") as f:
                    f.write(content)
                if mode and score < _INT8_AGREEMENT:
                    warnings.warn(
                        f"export(): {name} agrees with the Keras model on the top-1 class "
                        f"for {score:.1%} of the check inputs (below {_INT8_AGREEMENT:.0%}); "
                        f"pass typical inputs as `representative_data` or use the float file.",
                        stacklevel=2)
                dense = _dense_equivalent(content)
                report["files"][name] = {
                    "bytes": len(content),
                    "dense_equivalent_bytes": dense,
                    "ratio_to_dense_equivalent": len(content) / dense,
                    "weights": "int8" if mode else "float32",
                    ("top1_agreement" if mode else "max_abs_difference"): score,
                    "tensors": tensors,
                }
            float_dense = report["files"]["model.tflite"]["dense_equivalent_bytes"]
            for entry in report["files"].values():
                if "dense_equivalent_bytes" in entry:
                    entry["ratio_to_dense_float32"] = entry["bytes"] / float_dense
        with open(os.path.join(staging, "export.json"), "w") as f:
            json.dump(report, f, indent=2)
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(path, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for name, entry in report["files"].items():
        extra = (f" ({entry['ratio_to_dense_float32']:.3f}x the dense float32 .tflite)"
                 if "ratio_to_dense_float32" in entry else "")
        say(f"[export] {os.path.join(path, name)}: {entry['bytes']:,} bytes{extra}")
    return report


def _input_shapes(model):
    """The input shapes of built `model` (batch axis first), Functional or subclassed."""
    if getattr(model, "inputs", None):
        return [tuple(x.shape) for x in model.inputs]
    shape = (model.get_build_config() or {}).get("input_shape")
    if shape is None:
        raise ValueError(
            f"export(): model '{model.name}' records no input shape. Build it with "
            f"`model.build(input_shape)` or call it on a batch first.")
    nested = isinstance(shape, (list, tuple)) and shape and isinstance(shape[0], (list, tuple))
    return [tuple(s) for s in shape] if nested else [tuple(shape)]


def _check_litert_inputs(model, shapes):
    if len(shapes) != 1:
        raise ValueError(
            f"export(): model '{model.name}' has {len(shapes)} inputs; LiteRT export checks "
            f"single-input models. Export it with tflite=False.")
    if any(d is None for d in shapes[0][1:]):
        raise ValueError(
            f"export(): model '{model.name}' takes inputs of shape {shapes[0]}, with sizes left "
            f"open; a LiteRT file needs fixed ones. Pass input_shape=(...) (e.g. "
            f"{tuple(8 if d is None else d for d in shapes[0][1:])}), or tflite=False.")


def _fixed_size(model, input_shape):
    """A copy of graph `model` taking inputs of `input_shape` (the same weights)."""
    if not _compat.is_graph_model(model) or len(model.inputs) != 1:
        raise ValueError(
            f"export(): `input_shape` applies to single-input Sequential/Functional models; "
            f"build '{model.name}' at the size to export instead.")
    inputs = keras.Input(shape=tuple(input_shape), dtype=model.inputs[0].dtype,
                         name=_compat.producer(model.inputs[0]).name)
    fixed = keras.models.clone_model(model, input_tensors=inputs)
    fixed.set_weights(model.get_weights())
    return fixed


def _check_saved_zeros(saved_model, expected):
    """Raises RuntimeError unless the SavedModel, loaded back, holds `expected` zeros."""
    loaded = tf.saved_model.load(saved_model)
    zeros = sum(int(np.size(v) - np.count_nonzero(v.numpy())) for v in loaded.variables)
    if zeros < expected:
        raise RuntimeError(
            f"export(): the SavedModel holds {zeros} zero weights, the model {expected}: "
            f"pruned weights did not survive the export.")


def _tree_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
