"""Speed of DG2PF at scale: one mask update, and each phase of `run()` against dense `fit`.

Prints two tables and writes JSON (default benchmarks/results/phase_speed.json):
- one mask update (`dg2pf_tf.update_masks`) on ResNet-50, ResNet-152 and
  EfficientNetV2L, for each scope and floor: median seconds over updates whose
  weights moved in between (as in training), compiled and warm; the first
  call's time (tracing and XLA compilation); peak resident memory during the
  updates above what the process held before, as a multiple of the prunable
  weights' float32 bytes (Linux VmHWM, reset through /proc/self/clear_refs);
- time per training step of each phase of `run()` (gradual with masks
  recomputed every step, with run()'s default learning rate and with the
  paper's 1e-4, distill, detached, finetune) over a Keras `fit` step
  of the dense model with the phase's own optimizer (AdamW + clipping; SGD
  for finetune), both in this process, median of `--steps` steps each,
  for ResNet-50 (32x32, batch 64) and MobileNetV2 (alpha 0.35); tfmot's
  `prune_low_magnitude` with masks updated every step and every 100 steps
  beside it (tf_keras, own process, its own dense `fit` step as reference).

Run: python benchmarks/phase_speed.py [--steps 8] [--models resnet50,mobilenet_v2]
         [--update_models resnet50,resnet152,efficientnetv2l]
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import keras  # noqa: E402
from core_speed import median, run_tf_keras, write_json  # noqa: E402  (benchmarks/ is on the path)

SETTINGS = [("global", 0.0), ("global", 1.0), ("global", 0.5), ("layer", 0.0)]
UPDATE_MODELS = {"resnet50": "ResNet50", "resnet152": "ResNet152", "efficientnetv2l": "EfficientNetV2L"}
STEP_MODELS = {"resnet50": ("ResNet50", {}), "mobilenet_v2": ("MobileNetV2", {"alpha": 0.35})}
BATCH = 64

# tf_keras process: dense fit steps, then prune_low_magnitude with frequency 1 and 100.
TFMOT_CODE = r"""
import json, sys, time
import numpy as np, tensorflow as tf, tf_keras as keras
import tensorflow_model_optimization as tfmot
name, kwargs, steps, batch = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
x = rng.normal(size=(batch * (steps + 3), 32, 32, 3)).astype("float32")
y = rng.integers(0, 10, len(x))
class Times(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())
    def on_epoch_begin(self, epoch, logs=None):
        self.ends = [time.perf_counter()]
def step_seconds(model, callbacks=()):
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    times = Times()
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[times, *callbacks])
    gaps = np.diff(times.ends)[3:]  # the first steps trace
    return float(np.median(gaps))
build = lambda: getattr(keras.applications, name)(input_shape=(32, 32, 3), weights=None, classes=10, **kwargs)
out = {"dense": step_seconds(build())}
for frequency in (1, 100):
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.9, 0, 100 * steps, frequency=frequency)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(build(), pruning_schedule=schedule)
    out[f"frequency_{frequency}"] = step_seconds(pruned, [tfmot.sparsity.keras.UpdatePruningStep()])
print(json.dumps(out))
"""


class _Memory:
    """Peak resident memory above a baseline, from /proc (Linux)."""

    @staticmethod
    def _read(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return None

    def reset(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        self.base = self._read("VmRSS")

    def extra_peak(self):
        return self._read("VmHWM") - self.base


def mask_updates(name, updates=6):
    """Rows of mask-update measurements for one `keras.applications` model."""
    import numpy as np
    import tensorflow as tf

    import dg2pf_tf
    from dg2pf_tf import masking

    model = getattr(keras.applications, UPDATE_MODELS[name])(input_shape=(32, 32, 3), weights=None, classes=1000)
    pruned = dg2pf_tf.prune(model, sparsity=0.9, pruning_epochs=1)
    del model
    masks = masking.mask_set(pruned)
    kernels = [kernel for kernel, _ in masks.entries]
    prunable = sum(masks.sizes)

    @tf.function
    def nudge(seed):
        # What a training step does to the weights between two updates.
        for i, kernel in enumerate(kernels):
            noise = tf.random.stateless_normal(kernel.shape, [seed, i], stddev=1e-3)
            kernel.assign_add(noise * tf.abs(kernel))

    rows, memory = [], _Memory()
    for scope, floor in SETTINGS:
        nudge(tf.constant(0))
        start = time.perf_counter()
        masks.update(0.5, scope, floor)
        first = time.perf_counter() - start
        masks.update(0.6 - 1e-4, scope, floor)
        seconds = []
        memory.reset()
        for i in range(updates):
            nudge(tf.constant(i + 1))
            level = 0.6 + 1e-4 * i  # a step of a 10-epoch schedule of ~1,000 steps an epoch
            start = time.perf_counter()
            masks.update(level, scope, floor)
            _ = masks.entries[0][1][..., :1].numpy()  # waits for the device
            seconds.append(time.perf_counter() - start)
        peak = memory.extra_peak()
        zeros = prunable - sum(int(np.count_nonzero(m.numpy())) for _, m in masks.entries)
        row = {"model": name, "prunable_weights": prunable, "scope": scope, "floor": floor,
               "seconds": median(seconds), "first_call_seconds": first,
               "peak_extra_over_weight_bytes": peak / (4 * prunable),
               "exact": zeros == round(masks.realised(level, scope) * prunable)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    keras.backend.clear_session()
    return rows


class StepTimes(keras.callbacks.Callback):
    """The end time of every training batch, per epoch."""

    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append([time.perf_counter()])

    def on_train_batch_end(self, batch, logs=None):
        self.epochs[-1].append(time.perf_counter())


def _gaps(ends, skip=2):
    """Step durations of one epoch, without the first `skip` (tracing)."""
    return [b - a for a, b in zip(ends[:-1], ends[1:])][skip:]


def _dense_optimizers():
    """Keras' default 'adam' (a user's dense training), and the optimizers of run()'s
    phases at its defaults: AdamW + clipping (gradual, distill, detached), SGD with
    momentum (finetune)."""
    import inspect

    import dg2pf_tf

    d = {k: v.default for k, v in inspect.signature(dg2pf_tf.run).parameters.items()}
    return {
        "dense_fit": lambda: "adam",
        "dense_fit_adamw": lambda: keras.optimizers.AdamW(
            d["learning_rate"], weight_decay=d["weight_decay"], clipnorm=d["clipnorm"]),
        "dense_fit_sgd": lambda: keras.optimizers.SGD(d["finetune_learning_rate"], momentum=0.9),
    }


def _dense_steps(dense, x, y):
    """Seconds per `fit` step of `dense` with each optimizer of `_dense_optimizers`."""
    out = {}
    for key, optimizer in _dense_optimizers().items():
        dense.compile(optimizer=optimizer(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        times = StepTimes()
        dense.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[times])
        out[key] = median(_gaps(times.epochs[0]))
    return out


def phase_steps(name, steps):
    """Seconds per step of dense `fit` and of each phase of `run()`, one process.

    The dense steps are measured before and after the phases and averaged: the
    same dense step drifts by up to 10% within a process here (cause not
    found), and the average keeps that drift out of the ratios."""
    import numpy as np

    import dg2pf_tf

    app, kwargs = STEP_MODELS[name]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * (steps + 2), 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, len(x))
    keras.utils.set_random_seed(0)
    dense = getattr(keras.applications, app)(input_shape=(32, 32, 3), weights=None, classes=10,
                                              classifier_activation=None, **kwargs)
    before = _dense_steps(dense, x, y)
    out = {}
    times = StepTimes()
    # One epoch per phase: patience and max_epochs of 1 end each phase after it.
    result = dg2pf_tf.run(dense, (x, y), (x[:BATCH], y[:BATCH]), sparsity=0.9, pruning_epochs=1,
                          patience=1, max_epochs=1, batch_size=BATCH, verbose=0, callbacks=[times],
                          recalibrate_bn=False)
    for row, ends in zip(result.history, times.epochs):
        out[row["phase"]] = median(_gaps(ends))
    # The paper's learning rate for trained ImageNet networks: the weights, and so
    # the mask threshold, move less between steps.
    times = StepTimes()
    dg2pf_tf.run(dense, (x, y), (x[:BATCH], y[:BATCH]), sparsity=0.9, pruning_epochs=1, patience=1,
                 max_epochs=1, batch_size=BATCH, verbose=0, callbacks=[times], recalibrate_bn=False,
                 learning_rate=1e-4, finetune=False)
    out["gradual_lr_1e-4"] = median(_gaps(times.epochs[0]))
    # One epoch of distillation never plateaus, so run() skips the detached phase
    # above; without distillation (alpha=0) it comes right after the gradual one.
    times = StepTimes()
    result = dg2pf_tf.run(dense, (x, y), (x[:BATCH], y[:BATCH]), sparsity=0.9, pruning_epochs=1, patience=1,
                          max_epochs=1, batch_size=BATCH, verbose=0, callbacks=[times], recalibrate_bn=False,
                          alpha=0.0, finetune=False)
    out["detached"] = median(_gaps(times.epochs[[r["phase"] for r in result.history].index("detached")]))
    after = _dense_steps(dense, x, y)
    for key in before:
        out[key] = (before[key] + after[key]) / 2
        out[key + "_before_after"] = [before[key], after[key]]
    keras.backend.clear_session()
    return out


# The dense step each phase is held against: dense training with the phase's own optimizer.
REFERENCE = {"gradual": "dense_fit_adamw", "gradual_lr_1e-4": "dense_fit_adamw", "distill": "dense_fit_adamw",
             "detached": "dense_fit_adamw", "finetune": "dense_fit_sgd"}


def tfmot_steps(name, steps):
    app, kwargs = STEP_MODELS[name]
    return run_tf_keras(TFMOT_CODE, app, json.dumps(kwargs), steps, BATCH)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per phase")
    parser.add_argument("--models", default=",".join(STEP_MODELS))
    parser.add_argument("--update_models", default=",".join(UPDATE_MODELS))
    parser.add_argument("--no_tfmot", action="store_true")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "phase_speed.json"))
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    update_models = [m for m in args.update_models.split(",") if m]
    for given, known, flag in ((models, STEP_MODELS, "--models"), (update_models, UPDATE_MODELS, "--update_models")):
        unknown = sorted(set(given) - set(known))
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; choose from {', '.join(known)}")

    updates = []
    for name in update_models:
        print(f"Mask updates on {name}...", flush=True)
        updates += mask_updates(name)
    phases, baseline = {}, {}
    for name in models:
        print(f"Training steps of {name}: dense fit, then each phase of run()...", flush=True)
        phases[name] = phase_steps(name, args.steps)
        print(json.dumps(phases[name]), flush=True)
        if not args.no_tfmot:
            print(f"tfmot on {name} (tf_keras process)...", flush=True)
            baseline[name] = tfmot_steps(name, args.steps)
            print(json.dumps(baseline[name]), flush=True)

    print(f"\n{'model':<16}{'weights':>12}{'scope':>8}{'floor':>7}{'update ms':>11}{'first s':>9}"
          f"{'peak/weights':>14}{'exact':>7}")
    for r in updates:
        print(f"{r['model']:<16}{r['prunable_weights']:>12,}{r['scope']:>8}{r['floor']:>7.1f}"
              f"{1000 * r['seconds']:>11.1f}{r['first_call_seconds']:>9.1f}"
              f"{r['peak_extra_over_weight_bytes']:>14.2f}{str(r['exact']):>7}")
    steps = tuple(REFERENCE)
    print(f"\n{'model':<14}{'adam s':>8}{'adamw s':>9}{'sgd s':>7}"
          + "".join(f"{p:>17}" for p in (*steps, "tfmot/1", "tfmot/100")))
    for name, t in phases.items():
        cells = [t.get(p) and t[p] / t[REFERENCE[p]] for p in steps]
        theirs = baseline.get(name)
        cells += [theirs and theirs[f"frequency_{f}"] / theirs["dense"] for f in (1, 100)]
        print(f"{name:<14}{t['dense_fit']:>8.3f}{t['dense_fit_adamw']:>9.3f}{t['dense_fit_sgd']:>7.3f}" + "".join(
            f"{c:>16.2f}x" if c else f"{'-':>17}" for c in cells))
    print("(each phase over dense fit with its own optimizer: AdamW + clipping, SGD for finetune; "
          "tfmot over its dense fit, both Adam)")

    result = {"command": "python " + " ".join(sys.argv), "batch_size": BATCH, "mask_updates": updates,
              "step_seconds": phases, "tfmot_step_seconds": baseline}
    write_json(args.out, result)


if __name__ == "__main__":
    main()
