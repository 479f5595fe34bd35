"""`export()`: what ships: a SavedModel and LiteRT files whose zeros take no space.

The LiteRT files come from `convert` (the conversion `deploy_report`
reads too): each sparse weight stored the way that is smallest and runs, never
larger than its dense form, loaded and run in the default LiteRT interpreter
(XNNPACK on) and checked against the Keras model before it is written.
"""

import json
import os
import shutil
import warnings

import tensorflow as tf

from dg2pf_tf import atomic
from dg2pf_tf.core.masking import pruned_models
from dg2pf_tf.core.summary import pattern_report, sparsity_summary
from dg2pf_tf.counting import count_zeros
from dg2pf_tf.deploy import convert, litert, sparse_tensors
from dg2pf_tf.model import fold

QUANTIZE = (None, "dynamic", "int8")
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


def export(model, path, *, tflite=True, quantize=None, representative_data=None,
           explicit_padding=False, input_shape=None, pattern=None, fold_batchnorm=False,
           overwrite=False, verbose=1):
    """Writes what ships of `model` (pruned or stripped) into directory `path`.

    Files: `saved_model/` (a `serving_default` signature that needs only
    TensorFlow), `model.tflite` (float32, zeros stored sparse), with
    `quantize='dynamic'` (int8 weights) or `'int8'` (full-integer, calibrated
    on `representative_data`, float input and output) also
    `model_int8.tflite`, and `export.json`. Each LiteRT file is checked in the
    default interpreter against the Keras outputs on `representative_data`
    (random inputs when None): float files must match within 1e-4 (relative
    to the largest output), int8 files are reported with their top-1
    agreement and warn below 99%. Returns the `export.json` dict: sizes, dense-equivalent
    sizes, sparsity, per-tensor encodings. `explicit_padding=True` stores
    symmetric SAME padding of float convolutions as PAD + VALID, the form
    XNNPACK's sparse path needs (see `deploy_report`). LiteRT files take
    inputs of a fixed size: `input_shape` (without the batch axis) fixes the
    size of a Sequential/Functional model built for any (`None` dimensions).
    `pattern` ('2:4'; default: the N:M structure of a pruned model given) is
    checked in every kernel with zeros before anything is written, and
    recorded in `export.json`. `fold_batchnorm=True` folds each
    BatchNormalization that follows a linear convolution or Dense layer into
    it in the SavedModel too (LiteRT's converter folds them in the .tflite
    files either way).

    Raises:
        FileNotFoundError: the parent of `path` does not exist.
        FileExistsError: `path` is a file, or a non-empty directory and not
            `overwrite`.
        ValueError: bad `quantize`, 'int8' without `representative_data`; a
            kernel that breaks `pattern` (named); with
            `tflite=True`, a model with several inputs or outputs, or with
            inputs of no fixed size (pass `input_shape`).
        RuntimeError: a LiteRT file that the interpreter refuses in every form.
        ImportError: `tflite=True` without the `ai-edge-litert` package.
    """
    _check_arguments(tflite, quantize, representative_data)
    patterns = _check_pattern(model, pattern)
    with convert.named_errors("export()"):
        return _export(model, path, tflite, quantize, representative_data, explicit_padding,
                       input_shape, fold_batchnorm, overwrite, verbose, patterns)


def _check_pattern(model, pattern):
    """export.json's `pattern` entry ({} without one); raises ValueError for a broken kernel."""
    if pattern is None:
        pattern = next((m.structure.pattern for m in pruned_models(model) if m.structure.pattern), None)
        if pattern is None:
            return {}
    report = pattern_report(model, pattern)
    if report.broken:
        names = ", ".join(f"{path} ({blocks} blocks)" for path, blocks in report.broken[:8])
        raise ValueError(
            f"export(): {len(report.broken)} kernels break the {report.pattern} pattern (blocks "
            f"of inputs keeping more than allowed): {names}. Finish the pruning schedule first: "
            f"at its final sparsity every block holds the pattern.")
    if not report.checked:
        raise ValueError(f"export(): no kernel of '{model.name}' holds zeros in a {report.pattern} pattern.")
    return {"pattern": report.to_dict()}


def _export(model, path, tflite, quantize, representative_data, explicit_padding, input_shape,
            fold_batchnorm, overwrite, verbose, patterns):
    """`export()` once its arguments are checked."""
    plain = convert.plain_model(model, input_shape)
    if fold_batchnorm:
        plain, _ = fold.fold_batchnorm(plain)
    shapes = convert.input_shapes(plain)
    if tflite:
        convert.check_single_input(plain, shapes)
    path = _check_path(path, overwrite)
    summary = sparsity_summary(plain)
    say = print if verbose else (lambda *a, **k: None)

    with atomic.staged_directory(path) as staging:
        saved_model = os.path.join(staging, "saved_model")
        convert.save(plain, saved_model)
        _check_saved_zeros(saved_model, summary.total_zeros)
        report = {
            "sparsity_prunable": summary.prunable_sparsity,
            "sparsity_all_params": summary.total_sparsity,
            "params_total": summary.total_params,
            "params_nonzero": summary.total_params - summary.total_zeros,
            "files": {"saved_model": {"bytes": _tree_bytes(saved_model)}},
            **patterns,
        }
        if tflite:
            inputs, reference = convert.check_data(plain, shapes[0], representative_data)
            report["files"].update(_write_litert(staging, inputs, reference, quantize,
                                                 explicit_padding, say))
        with open(os.path.join(staging, "export.json"), "w") as f:
            json.dump(report, f, indent=2)
    for name, entry in report["files"].items():
        extra = (f" ({entry['ratio_to_dense_float32']:.3f}x the dense float32 .tflite)"
                 if "ratio_to_dense_float32" in entry else "")
        say(f"[export] {os.path.join(path, name)}: {entry['bytes']:,} bytes{extra}")
    return report


def _check_arguments(tflite, quantize, representative_data):
    """Raises ValueError for a bad `quantize` or 'int8' without data, ImportError
    for LiteRT files without ai-edge-litert."""
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


def _write_litert(staging, inputs, reference, quantize, explicit_padding, say):
    """Writes model.tflite (and model_int8.tflite with `quantize`) from
    `staging`/saved_model into `staging`; returns their export.json entries."""
    jobs = [("model.tflite", None)] + ([("model_int8.tflite", quantize)] if quantize else [])
    files = {}
    for name, mode in jobs:
        say(f"[export] converting {name} ({mode or 'float32'}, sparse weights)")
        shipped = convert.litert_file(os.path.join(staging, "saved_model"), inputs, reference,
                                             quantize=mode, explicit_padding=explicit_padding)
        with open(os.path.join(staging, name), "wb") as f:
            f.write(shipped.content)
        files[name] = _file_entry(name, mode, shipped)
    for entry in files.values():
        entry["ratio_to_dense_float32"] = entry["bytes"] / files["model.tflite"]["dense_equivalent_bytes"]
    return files


def _file_entry(name, mode, shipped):
    """export.json's entry for LiteRT file `name` (`mode`: its `quantize`); warns
    when a quantized file agrees with Keras on less than 99% of top-1 classes."""
    if mode and shipped.score < _INT8_AGREEMENT:
        warnings.warn(
            f"export(): {name} agrees with the Keras model on the top-1 class "
            f"for {shipped.score:.1%} of the check inputs (below {_INT8_AGREEMENT:.0%}); "
            f"pass typical inputs as `representative_data` or use the float file.",
            stacklevel=4)
    int8 = litert.stores_int8(litert.read(shipped.content))
    if mode and not int8:
        warnings.warn(
            f"export(): {name} holds no int8 weights: the converter quantizes only tensors of "
            f"1024 entries or more, and this model has none; it is the float file again.",
            stacklevel=4)
    dense = len(sparse_tensors.all_dense(shipped.content))
    return {
        "bytes": len(shipped.content),
        "dense_equivalent_bytes": dense,
        "ratio_to_dense_equivalent": len(shipped.content) / dense,
        "weights": "int8" if int8 else "float32",
        ("top1_agreement" if mode else "max_abs_difference"): shipped.score,
        "tensors": shipped.tensors,
    }


def _check_saved_zeros(saved_model, expected):
    """Raises RuntimeError unless the SavedModel, loaded back, holds `expected` zeros."""
    loaded = tf.saved_model.load(saved_model)
    zeros = sum(count_zeros(v.numpy()) for v in loaded.variables)
    if zeros < expected:
        raise RuntimeError(
            f"export(): the SavedModel holds {zeros} zero weights, the model {expected}: "
            f"pruned weights did not survive the export.")


def _tree_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
