"""Prunes a trained network with DG2PF from the command line.

    python train.py                      # embedded default: digits, small CNN, offline, ~2 min
    python train.py --model=resnet50 --dataset=imagenet2012 --weights=imagenet --data_dir=...

Writes into --output_dir: report.json, dense.keras, pruned.keras, export/
(saved_model/ with a serving_default signature, model.tflite with sparse
weights, export.json), history.csv, tensorboard/, plots/*.png.
"""

import csv
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

from absl import app, flags

# quiet_tensorflow first: TensorFlow loads without its start-up chatter.
from flags import quiet_tensorflow, train_flags  # noqa: F401

train_flags.define_flags()
flags.adopt_module_key_flags(train_flags)  # so --help lists them
FLAGS = flags.FLAGS


def _fail(message):
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def _log(message):
    print(f"[train] {message}", flush=True)


@dataclasses.dataclass(frozen=True)
class Place:
    """Where a run writes: `out` (this process's outputs), `backup` (the checkpoints,
    shared by every worker) and `dense` (the chief's dense model)."""

    out: str
    backup: str
    dense: str


def _strategy(kind):
    import tensorflow as tf

    if kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "mirrored" or (kind == "auto" and len(gpus) > 1):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _place(strategy):
    """Where this process writes: the chief into --output_dir; another worker reads
    the chief's checkpoints (shared storage) and writes its copies elsewhere."""
    out = FLAGS.output_dir
    place = Place(out, os.path.join(out, "backup"), os.path.join(out, "dense.keras"))
    if getattr(strategy.extended, "should_checkpoint", True):
        return place
    own = tempfile.mkdtemp(prefix="dg2pf-worker-")
    _log(f"non-chief worker: outputs go to {own}")
    return dataclasses.replace(place, out=own)


def _load_data():
    """The data set of --dataset, preprocessed for --model and --weights (exits if unavailable)."""
    from zoo.data import DataUnavailable, load
    from zoo.models import preprocessing_for

    preprocessing = preprocessing_for(FLAGS.model, FLAGS.weights, FLAGS.preprocessing)
    if FLAGS.dataset != "digits":
        why = (f" (what --model={FLAGS.model}'s ImageNet weights expect)"
               if FLAGS.preprocessing == "auto" and FLAGS.weights == "imagenet" else "")
        _log(f"Inputs: {preprocessing} preprocessing{why}")
    try:
        return load(FLAGS.dataset, FLAGS.batch_size, data_dir=FLAGS.data_dir, image_size=FLAGS.image_size,
                    seed=FLAGS.seed, preprocessing=preprocessing, log=_log)
    except DataUnavailable as error:
        _fail(str(error))


def _load_keras(flag, path, data):
    """The .keras model of --`flag`, checked against the data set's inputs and classes (exits on failure)."""
    import keras

    try:
        model = keras.models.load_model(path)
    except Exception as error:
        _fail(f"--{flag}={path}: cannot load it ({type(error).__name__}: {error}).")
    if tuple(model.input_shape[1:]) != tuple(data.input_shape):
        _fail(f"--{flag}={path}: the model takes {model.input_shape[1:]} inputs, "
              f"--dataset={FLAGS.dataset} gives {data.input_shape}.")
    if tuple(model.output_shape[1:]) != (data.classes,):
        _fail(f"--{flag}={path}: the model gives {model.output_shape[1:]} outputs, "
              f"--dataset={FLAGS.dataset} has {data.classes} classes.")
    return model


def _build_model(data, strategy):
    """The dense model: loaded from --weights, or --model built (with ImageNet weights
    for --weights=imagenet, else random ones to train). Returns `(model, ready)`:
    ready is False when it still needs dense training."""
    from zoo.models import build

    with strategy.scope():
        if FLAGS.weights and FLAGS.weights.endswith(".keras"):
            return _load_keras("weights", FLAGS.weights, data), True
        try:
            model = build(FLAGS.model, data.input_shape, data.classes,
                          weights="imagenet" if FLAGS.weights == "imagenet" else None)
        except ValueError as error:
            _fail(str(error))
        except Exception as error:  # keras.applications download failures
            _fail(f"--weights=imagenet: could not fetch the weights ({type(error).__name__}); "
                  f"this needs the internet.")
        if FLAGS.weights and FLAGS.weights != "imagenet":
            try:
                model.load_weights(FLAGS.weights)
            except Exception as error:
                _fail(f"--weights={FLAGS.weights} does not fit --model={FLAGS.model}: {error}")
    return model, bool(FLAGS.weights)


def _train_dense(model, data, strategy):
    """Trains `model` for --dense_epochs with Adam, then refreshes its BatchNorm statistics."""
    import keras

    import dg2pf_tf

    _log(f"Training {FLAGS.model} densely for {FLAGS.dense_epochs} epochs")
    with strategy.scope():
        model.compile(keras.optimizers.Adam(FLAGS.dense_learning_rate),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    # shuffle=False: the tf.data pipeline shuffles itself (Keras ignores the flag there, and says so).
    model.fit(data.train, epochs=FLAGS.dense_epochs, steps_per_epoch=FLAGS.steps_per_epoch,
              shuffle=False, verbose=1 if sys.stdout.isatty() else 2)
    # The moving BatchNorm statistics lag the last steps; the teacher needs true ones.
    dg2pf_tf.reestimate_batchnorm(model, data.train)


def _dense_model(data, strategy, place, times):
    """The dense model of the run: the chief's dense.keras when resuming, else built
    (and trained) and saved there."""
    import keras

    if os.path.isfile(place.dense) and os.path.isdir(place.backup):
        _log(f"Resuming the run in {place.out}: dense model from {place.dense}")
        with strategy.scope():
            return keras.models.load_model(place.dense)
    model, ready = _build_model(data, strategy)
    tick = time.perf_counter()
    if not ready:
        _train_dense(model, data, strategy)
    times["dense_training"] = time.perf_counter() - tick if not ready else 0.0
    os.makedirs(place.out, exist_ok=True)
    _save_keras(model, os.path.join(place.out, "dense.keras"))
    return model


def _prune(dense, data, config, strategy, place):
    """DG2PF on `dense`: `dg2pf_tf.run` with `config`, resumable from place.backup."""
    import keras

    import dg2pf_tf

    teacher = None
    if FLAGS.teacher:
        with strategy.scope():
            teacher = _load_keras("teacher", FLAGS.teacher, data)
    _log(f"DG2PF to {config.resolved().sparsity:.0%} sparsity ({config.structure}), "
         f"{config.pruning_epochs} pruning epochs")
    return dg2pf_tf.run(
        dense, data.train_for_epoch, data.val, config, teacher=teacher, strategy=strategy,
        backup_dir=place.backup, steps_per_execution=FLAGS.steps_per_execution,
        jit_compile=FLAGS.jit_compile, verbose="auto",
        callbacks=[keras.callbacks.TensorBoard(os.path.join(place.out, "tensorboard"))])


def _export(pruned, data, config, place):
    """The SavedModel and LiteRT files of `pruned` in place.out/export."""
    import dg2pf_tf

    _log("Exporting the SavedModel" + (" and LiteRT files" if FLAGS.tflite else ""))
    return dg2pf_tf.export(
        pruned, os.path.join(place.out, "export"), tflite=FLAGS.tflite,
        pattern=str(config.structure.pattern) if config.structure.pattern else None,
        quantize=None if FLAGS.quantize == "none" else FLAGS.quantize,
        representative_data=data.train.take(max(1, 128 // FLAGS.batch_size)), overwrite=True)


def _plots(history, model, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import dg2pf_tf

    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = [r["epoch"] for r in history]
    ax.plot(epochs, [r["val_accuracy"] for r in history], marker=".", label="val accuracy")
    ax.plot(epochs, [r["sparsity"] for r in history], marker=".", label="sparsity")
    start = 0
    for i, row in enumerate(history + [{"phase": None}]):
        if i and row["phase"] != history[i - 1]["phase"]:
            ax.axvspan(start + 0.5, history[i - 1]["epoch"] + 0.5, alpha=0.08 * (1 + len(ax.patches) % 2))
            ax.text(start + 1, 0.02, history[i - 1]["phase"], fontsize=8)
            start = history[i - 1]["epoch"]
    ax.set_xlabel("epoch"), ax.set_ylim(0, 1.02), ax.legend(loc="center right")
    fig.tight_layout(), fig.savefig(os.path.join(out, "plots", "accuracy_sparsity.png"), dpi=110)
    rows = dg2pf_tf.sparsity_summary(model).rows
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.25 * len(rows))))
    ax.barh([f"{r.layer}/{r.kernel}" for r in rows], [r.sparsity for r in rows])
    ax.set_xlim(0, 1), ax.set_xlabel("sparsity"), ax.invert_yaxis()
    fig.tight_layout(), fig.savefig(os.path.join(out, "plots", "layer_sparsity.png"), dpi=110)
    plt.close("all")


def _save_keras(model, path):
    """`model.save(path)` through a temporary file, so a kill never leaves half a file."""
    from dg2pf_tf import atomic

    with atomic.atomic_path(path) as tmp:
        model.save(tmp)


def _write_history(history, out):
    with open(os.path.join(out, "history.csv"), "w", newline="") as f:
        keys = sorted({k for row in history for k in row}, key=lambda k: (k not in ("epoch", "phase"), k))
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(history)


def _report(dense, result, exported, data, place, times, started):
    """report.json's content: the flags, run()'s report, test accuracies, sizes, throughput."""
    import dg2pf_tf

    # The test split never picked an epoch: it is what the pruned model is worth.
    test_accuracy = {name: dg2pf_tf.evaluate(m, data.test)[0] for name, m in (("dense", dense),
                                                                             ("pruned", result.model))}
    sizes = {name: os.path.getsize(os.path.join(place.out, name)) for name in ("dense.keras", "pruned.keras")}
    sizes.update({f"export/{name}": entry["bytes"] for name, entry in exported["files"].items()})
    # Throughput of each phase over whole epochs (validation and BatchNorm re-estimation included).
    steps = FLAGS.steps_per_epoch or -(-data.train_size // FLAGS.batch_size)
    seconds = result.report["seconds"]
    images_per_second = {phase: epochs * steps * FLAGS.batch_size / seconds[phase]
                         for phase, epochs in result.report["epochs"].items() if seconds.get(phase)}
    if times.get("dense_training"):
        images_per_second["dense_training"] = FLAGS.dense_epochs * steps * FLAGS.batch_size / times["dense_training"]
    return {
        "flags": {f.name: f.value for f in FLAGS.get_flags_for_module(train_flags)},
        **result.report,
        "test_split": data.test_split,
        "dense_test_accuracy": test_accuracy["dense"],
        "pruned_test_accuracy": test_accuracy["pruned"],
        "params_dense": dense.count_params(),
        "images_per_second": images_per_second,
        "file_bytes": sizes,
        "seconds": {**seconds, **times, "total": time.perf_counter() - started},
    }


def _print_summary(report, exported, place, started):
    rows = [("validation accuracy", f"{report['dense_val_accuracy']:.4f}", f"{report['pruned_val_accuracy']:.4f}", ""),
            # The run chose its epochs on the validation part; this split it never saw.
            (f"held-out {report['test_split']!r} acc.", f"{report['dense_test_accuracy']:.4f}",
             f"{report['pruned_test_accuracy']:.4f}", ""),
            ("sparsity (prunable)", f"{0.0:.2%}", f"{report['sparsity_prunable']:.2%}", ""),
            ("nonzero parameters", f"{report['params_dense']:,}", f"{report['params_nonzero']:,}", "")]
    if "channels_removed" in report:
        rows += [("channels (prunable groups)", f"{report['channels_total']:,}",
                  f"{report['channels_total'] - report['channels_removed']:,}", ""),
                 ("parameters (shrunk)", f"{report['params_dense']:,}", f"{report['params_shrunk']:,}", "")]
    if "budget_removed" in report:
        rows.append((f"{report['budget']} (the budget)", report["budget_dense"], report["budget_pruned"], ""))
    sizes = report["file_bytes"]
    rows.append((".keras file (bytes)", f"{sizes['dense.keras']:,}", f"{sizes['pruned.keras']:,}",
                 "Keras stores every weight dense, zeros too"))
    if "model.tflite" in exported["files"]:
        tfl = exported["files"]["model.tflite"]
        rows.append((".tflite file (bytes)", f"{tfl['dense_equivalent_bytes']:,}", f"{tfl['bytes']:,}",
                     "zeros stored sparse: the file that ships"))
    print(f"\n{'':<28}{'dense':>12}{'pruned':>12}")
    for name, dense, pruned, note in rows:
        print(f"{name:<28}{dense:>12}{pruned:>12}" + (f"  ({note})" if note else ""))
    print(f"prunable weights: {report['params_prunable']:,} ({report['params_pruned']:,} pruned, "
          f"{report['params_dense_by_choice']:,} dense by choice)")
    if report["entirely_zero"]:
        print(f"weights entirely zero: {', '.join(report['entirely_zero'])}")
    print("images/s (with validation): " + ", ".join(f"{k} {v:,.1f}" for k, v in report["images_per_second"].items()))
    files = ", ".join(f + "/" * (f == "saved_model") for f in exported["files"])
    print(f"outputs in {os.path.abspath(place.out)}: report.json, pruned.keras, export/ ({files}), "
          f"history.csv, tensorboard/, plots/ ({time.perf_counter() - started:.0f} s)")


def _finished():
    """True (said) when --output_dir holds a finished run; clears it first with --overwrite."""
    out = FLAGS.output_dir
    if FLAGS.overwrite and os.path.isdir(out):
        _log(f"--overwrite: clearing {out}")
        shutil.rmtree(out)
    if os.path.isfile(os.path.join(out, "report.json")):
        print(f"train.py: --output_dir={out} holds a finished run (report.json); nothing to do. "
              f"Pass --overwrite to run it again, or choose another --output_dir.")
        return True
    return False


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; all options are --flags (see --help).")
    started = time.perf_counter()
    try:
        config = train_flags.run_config()
    except ValueError as error:
        _fail(str(error))
    if _finished():
        return
    import keras

    from dg2pf_tf import atomic

    keras.utils.set_random_seed(FLAGS.seed)
    if FLAGS.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    strategy = _strategy(FLAGS.distribution)
    place = _place(strategy)
    data = _load_data()
    times = {}
    dense = _dense_model(data, strategy, place, times)
    result = _prune(dense, data, config, strategy, place)
    _save_keras(result.model, os.path.join(place.out, "pruned.keras"))
    tick = time.perf_counter()
    exported = _export(result.model, data, config, place)
    times["export"] = time.perf_counter() - tick
    _write_history(result.history, place.out)
    _plots(result.history, result.model, place.out)
    report = _report(dense, result, exported, data, place, times, started)
    # Written last and atomically: its presence means the run is complete.
    atomic.write_atomic(os.path.join(place.out, "report.json"),
                        lambda f: f.write(json.dumps(report, indent=2).encode()))
    _print_summary(report, exported, place, started)


if __name__ == "__main__":
    if any(arg in ("-h", "-?", "--help", "--helpshort") for arg in sys.argv[1:]):
        # absl's own --help exits with status 1; asking for help is not an error.
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
    app.run(main)
