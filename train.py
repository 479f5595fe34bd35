"""Prunes a trained network with DG2PF from the command line.

    python train.py                      # embedded default: digits, small CNN, offline, ~2 min
    python train.py --model=resnet50 --dataset=imagenet2012 --weights=imagenet --data_dir=...

Writes into --output_dir: report.json, dense.keras, pruned.keras, export/
(saved_model/ with a serving_default signature, model.tflite with sparse
weights, export.json), history.csv, tensorboard/, plots/*.png.
"""

import csv
import json
import os
import shutil
import sys
import tempfile
import time

from absl import app, flags

from flags import train_flags

train_flags.define_flags()
flags.adopt_module_key_flags(train_flags)  # so --help lists them
FLAGS = flags.FLAGS


def _fail(message):
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def _strategy(kind):
    import tensorflow as tf

    if kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "mirrored" or (kind == "auto" and len(gpus) > 1):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _dense_model(cfg, info, train, val, strategy, log):
    import keras

    from zoo.models import build

    with strategy.scope():
        if cfg.weights and cfg.weights.endswith(".keras"):
            return _load_keras("weights", cfg.weights, info), False
        try:
            model = build(cfg.model, info["input_shape"], info["classes"],
                          weights="imagenet" if cfg.weights == "imagenet" else None)
        except ValueError as error:
            _fail(str(error))
        except Exception as error:  # keras.applications download failures
            _fail(f"--weights=imagenet: could not fetch the weights ({type(error).__name__}); "
                  f"this needs the internet.")
        if cfg.weights:
            if cfg.weights != "imagenet":
                try:
                    model.load_weights(cfg.weights)
                except Exception as error:
                    _fail(f"--weights={cfg.weights} does not fit --model={cfg.model}: {error}")
            return model, False
        log(f"Training {cfg.model} densely for {cfg.dense_epochs} epochs")
        model.compile(keras.optimizers.Adam(cfg.dense_learning_rate),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
    model.fit(train, epochs=cfg.dense_epochs, steps_per_epoch=cfg.steps_per_epoch,
              verbose=2 if cfg.dataset == "digits" else 1)
    import dg2pf_tf

    # The moving BatchNorm statistics lag the last steps; the teacher needs true ones.
    dg2pf_tf.reestimate_batchnorm(model, train)
    return model, True


def _load_keras(flag, path, info):
    """The .keras model of --`flag`, checked against the dataset's inputs (exits on failure)."""
    import keras

    try:
        model = keras.models.load_model(path)
    except Exception as error:
        _fail(f"--{flag}={path}: cannot load it ({type(error).__name__}: {error}).")
    if tuple(model.input_shape[1:]) != tuple(info["input_shape"]):
        _fail(f"--{flag}={path}: the model takes {model.input_shape[1:]} inputs, "
              f"--dataset={FLAGS.dataset} gives {info['input_shape']}.")
    return model


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
    from dg2pf_tf.procedure import atomic

    with atomic.atomic_path(path) as tmp:
        model.save(tmp)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; all options are --flags (see --help).")
    cfg = FLAGS
    started = time.perf_counter()
    log = lambda message: print(f"[train] {message}", flush=True)  # noqa: E731
    out = cfg.output_dir
    if cfg.overwrite and os.path.isdir(out):
        log(f"--overwrite: clearing {out}")
        shutil.rmtree(out)
    if os.path.isfile(os.path.join(out, "report.json")):
        print(f"train.py: --output_dir={out} holds a finished run (report.json); nothing to do. "
              f"Pass --overwrite to run it again, or choose another --output_dir.")
        return
    import keras

    import dg2pf_tf
    from dg2pf_tf import checks
    from dg2pf_tf.procedure import atomic, loop
    from zoo.data import DataUnavailable, load
    from zoo.models import preprocessing_for

    try:
        sparsity = checks.sparsity_for(cfg.structure, cfg.sparsity, default=0.95)
    except ValueError as error:
        _fail(f"--structure={cfg.structure}, --sparsity={cfg.sparsity}: {error}")
    pattern = cfg.structure if checks.nm_pattern(cfg.structure) else None

    keras.utils.set_random_seed(cfg.seed)
    if cfg.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    strategy = _strategy(cfg.distribution)
    backup = os.path.join(out, "backup")
    if not loop.is_chief(strategy):
        # A non-chief worker: it reads the chief's checkpoints (shared storage),
        # and writes its own copies of the outputs where they do not collide.
        out = tempfile.mkdtemp(prefix="dg2pf-worker-")
        log(f"non-chief worker: outputs go to {out}")
    preprocessing = preprocessing_for(cfg.model, cfg.weights, cfg.preprocessing)
    if cfg.dataset != "digits":
        log(f"Inputs: {preprocessing} preprocessing" + (f" (what --model={cfg.model}'s ImageNet weights expect)"
                                                         if cfg.preprocessing == "auto" and cfg.weights == "imagenet"
                                                         else ""))
    try:
        train, val, test, info = load(cfg.dataset, cfg.batch_size, data_dir=cfg.data_dir,
                                      image_size=cfg.image_size, seed=cfg.seed, preprocessing=preprocessing,
                                      log=log)
    except DataUnavailable as error:
        _fail(str(error))
    teacher = None
    if cfg.teacher:
        with strategy.scope():
            teacher = _load_keras("teacher", cfg.teacher, info)
    times = {}
    t = time.perf_counter()
    saved_dense = os.path.join(cfg.output_dir, "dense.keras")  # the chief's, on every worker
    if os.path.isfile(saved_dense) and os.path.isdir(backup):
        log(f"Resuming the run in {out}: dense model from {saved_dense}")
        with strategy.scope():
            dense = keras.models.load_model(saved_dense)
    else:
        dense, trained = _dense_model(cfg, info, train, val, strategy, log)
        times["dense_training"] = time.perf_counter() - t if trained else 0.0
        os.makedirs(out, exist_ok=True)
        _save_keras(dense, os.path.join(out, "dense.keras"))

    if teacher is not None:
        try:
            checks.fitting_teacher(dense, teacher)
        except ValueError as error:
            _fail(f"--teacher={cfg.teacher}: {error}")
    log(f"DG2PF to {sparsity:.0%} sparsity, {cfg.pruning_epochs} pruning epochs")
    result = dg2pf_tf.run(
        dense, info["train_for_epoch"], val, sparsity=sparsity, pruning_epochs=cfg.pruning_epochs,
        teacher=teacher, temperature=cfg.temperature, alpha=cfg.alpha, patience=cfg.patience,
        max_epochs=cfg.max_epochs, seed=cfg.seed, strategy=strategy, scope=cfg.scope,
        backup_dir=backup,
        floor=cfg.floor, structure=cfg.structure, budget=cfg.budget, learning_rate=cfg.learning_rate,
        steps_per_epoch=cfg.steps_per_epoch,
        steps_per_execution=cfg.steps_per_execution, jit_compile=cfg.jit_compile,
        finetune_learning_rate=cfg.finetune_learning_rate, verbose=1,
        callbacks=[keras.callbacks.TensorBoard(os.path.join(out, "tensorboard"))],
    )
    pruned = result.model
    _save_keras(pruned, os.path.join(out, "pruned.keras"))
    t = time.perf_counter()
    log("Exporting the SavedModel" + (" and LiteRT files" if cfg.tflite else ""))
    exported = dg2pf_tf.export(
        pruned, os.path.join(out, "export"), tflite=cfg.tflite, pattern=pattern,
        quantize=None if cfg.quantize == "none" else cfg.quantize,
        representative_data=train.take(max(1, 128 // cfg.batch_size)), overwrite=True)
    times["export"] = time.perf_counter() - t
    with open(os.path.join(out, "history.csv"), "w", newline="") as f:
        keys = sorted({k for row in result.history for k in row}, key=lambda k: (k not in ("epoch", "phase"), k))
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(result.history)
    _plots(result.history, pruned, out)

    summary = dg2pf_tf.sparsity_summary(pruned)
    # The test split never picked an epoch: it is what the pruned model is worth.
    test_accuracy = {name: dg2pf_tf.evaluate(m, test)[0] for name, m in (("dense", dense), ("pruned", pruned))}
    sizes = {name: os.path.getsize(os.path.join(out, name)) for name in ("dense.keras", "pruned.keras")}
    sizes.update({f"export/{name}": entry["bytes"] for name, entry in exported["files"].items()})
    # Throughput of each phase over whole epochs (validation and BatchNorm re-estimation included).
    steps = cfg.steps_per_epoch or -(-info["train_size"] // cfg.batch_size)
    images_per_second = {
        phase: epochs * steps * cfg.batch_size / result.report["seconds"][phase]
        for phase, epochs in result.report["epochs"].items() if result.report["seconds"].get(phase)}
    if times.get("dense_training"):
        images_per_second["dense_training"] = cfg.dense_epochs * steps * cfg.batch_size / times["dense_training"]
    report = {
        "flags": {f.name: f.value for f in FLAGS.get_flags_for_module(train_flags)},
        **result.report,
        "test_split": info["test_split"],
        "dense_test_accuracy": test_accuracy["dense"],
        "pruned_test_accuracy": test_accuracy["pruned"],
        "params_dense": dense.count_params(),
        "images_per_second": images_per_second,
        "file_bytes": sizes,
        "seconds": {**result.report["seconds"], **times, "total": time.perf_counter() - started},
    }
    # Written last and atomically: its presence means the run is complete.
    atomic.write_atomic(os.path.join(out, "report.json"),
                        lambda f: f.write(json.dumps(report, indent=2).encode()))
    print()
    print(f"{'':<28}{'dense':>12}{'pruned':>12}")
    print(f"{'validation accuracy':<28}{report['dense_val_accuracy']:>12.4f}{report['pruned_val_accuracy']:>12.4f}")
    # The run chose its epochs on the validation part; this split it never saw.
    print(f"{'held-out ' + repr(info['test_split']) + ' acc.':<28}{test_accuracy['dense']:>12.4f}"
          f"{test_accuracy['pruned']:>12.4f}")
    print(f"{'sparsity (prunable)':<28}{0.0:>12.2%}{summary.prunable_sparsity:>12.2%}")
    print(f"{'prunable weights':<28}{report['params_prunable']:>12,}{'':>12}  ({report['params_pruned']:,} "
          f"pruned, {report['params_dense_by_choice']:,} dense by choice)")
    if report["entirely_zero"]:
        print(f"weights entirely zero: {', '.join(report['entirely_zero'])}")
    print(f"{'nonzero parameters':<28}{dense.count_params():>12,}{report['params_nonzero']:>12,}")
    if "channels_removed" in report:
        print(f"{'channels (prunable groups)':<28}{report['channels_total']:>12,}"
              f"{report['channels_total'] - report['channels_removed']:>12,}")
        print(f"{'parameters (shrunk)':<28}{dense.count_params():>12,}{report['params_shrunk']:>12,}")
    if "budget_removed" in report:
        unit = {"macs": "MACs", "params": "parameters (budget)"}[report["budget"]]
        print(f"{unit:<28}{report['budget_total']:>12,}"
              f"{round(report['budget_total'] * (1 - report['budget_removed'])):>12,}")
    print(f"{'.keras file (bytes)':<28}{sizes['dense.keras']:>12,}{sizes['pruned.keras']:>12,}")
    print("images/s (with validation): " + ", ".join(f"{k} {v:,.1f}" for k, v in images_per_second.items()))
    if "model.tflite" in exported["files"]:
        tfl = exported["files"]["model.tflite"]
        print(f"{'.tflite file (bytes)':<28}{tfl['dense_equivalent_bytes']:>12,}{tfl['bytes']:>12,}")
    files = ", ".join(f + "/" * (f == "saved_model") for f in exported["files"])
    print(f"outputs in {os.path.abspath(out)}: report.json, pruned.keras, export/ ({files}), "
          f"history.csv, tensorboard/, plots/ ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    if any(arg in ("-h", "-?", "--help", "--helpshort") for arg in sys.argv[1:]):
        # absl's own --help exits with status 1; asking for help is not an error.
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
    app.run(main)
