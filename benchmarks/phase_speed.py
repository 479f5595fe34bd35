"""Speed of DG2PF at scale: one mask update, and each phase of `run()` against dense `fit`.

Prints two tables and writes JSON (default benchmarks/results/phase_speed.json):
- one mask update on ResNet-50, ResNet-152 and EfficientNetV2L, for each
  scope and floor (or, with `--structure 2:4`, the N:M masks for each scope),
  the model pruned with them: median seconds of `dg2pf_tf.update_masks`
  a training step apart (weights nudged, the level moved by 1e-4: what the
  fused step of `run()` does), then at each epoch of a 10-epoch linear
  schedule (weights moved as by an epoch: a jump of the level) by
  `update_masks` and by `UpdateMasks.on_epoch_begin` (the first of each
  series left out); the first call's time (tracing and XLA compilation); peak
  resident memory during the step updates above what the process held
  before, as a multiple of the prunable weights' float32 bytes (Linux VmHWM,
  reset through /proc/self/clear_refs);
- time per training step of each phase of `run()` (gradual with masks
  recomputed every step, with run()'s default learning rate and with the
  paper's 1e-4, distill, detached, finetune), each step paired with a step of
  the dense model's own `fit` train function with the phase's optimizer
  (AdamW + clipping; SGD for finetune): the median of the pairs' ratios over
  `--steps` steps, for ResNet-50 (32x32, batch 64) and MobileNetV2 (alpha
  0.35); tfmot's `prune_low_magnitude` with masks updated every step and
  every 100 steps beside it, paired the same way with its dense model (tf_keras,
  own process, Adam for both).

Run: python benchmarks/phase_speed.py [--steps 8] [--models resnet50,mobilenet_v2]
         [--update_models resnet50,resnet152,efficientnetv2l] [--structure 2:4]
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
from core_speed import median, run_tf_keras  # noqa: E402  (benchmarks/ is on the path)
from results_file import write_json  # noqa: E402

SETTINGS = [("global", 0.0), ("global", 1.0), ("global", 0.5), ("layer", 0.0)]
NM_SETTINGS = [("global", 0.0), ("layer", 0.0)]  # an N:M pattern has no floor
UPDATE_MODELS = {"resnet50": "ResNet50", "resnet152": "ResNet152", "efficientnetv2l": "EfficientNetV2L"}
STEP_MODELS = {"resnet50": ("ResNet50", {}), "mobilenet_v2": ("MobileNetV2", {"alpha": 0.35})}
BATCH = 64

# tf_keras process: prune_low_magnitude with frequency 1 and 100, each fit step
# paired with a step of the dense model's own fit train function (both Adam).
TFMOT_CODE = r"""
import json, sys, time
import numpy as np, tensorflow as tf, tf_keras as keras
import tensorflow_model_optimization as tfmot
name, kwargs, steps, batch = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
x = rng.normal(size=(batch * (steps + 3), 32, 32, 3)).astype("float32")
y = rng.integers(0, 10, len(x))
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
build = lambda: getattr(keras.applications, name)(input_shape=(32, 32, 3), weights=None, classes=10, **kwargs)
dense = build()
dense.compile(optimizer="adam", loss=loss)
dense.make_train_function()
batches = iter(tf.data.Dataset.from_tensors((x[:batch], y[:batch])).repeat())
class Paired(keras.callbacks.Callback):
    pairs = []
    def on_train_batch_begin(self, b, logs=None):
        self.start = time.perf_counter()
    def on_train_batch_end(self, b, logs=None):
        pruned = time.perf_counter() - self.start
        start = time.perf_counter()
        dense.train_function(batches)
        self.pairs.append((pruned, time.perf_counter() - start))
out = {}
for frequency in (1, 100):
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.9, 0, 100 * steps, frequency=frequency)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(build(), pruning_schedule=schedule)
    pruned.compile(optimizer="adam", loss=loss)
    timer = Paired()
    timer.pairs = []
    pruned.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[timer, tfmot.sparsity.keras.UpdatePruningStep()])
    pairs = timer.pairs[3:]  # the first steps trace
    out[f"frequency_{frequency}"] = {"pruned": float(np.median([p for p, _ in pairs])),
                                     "dense": float(np.median([d for _, d in pairs])),
                                     "ratio": float(np.median([p / d for p, d in pairs]))}
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


def mask_updates(name, updates=6, structure="unstructured"):
    """Rows of mask-update measurements for one `keras.applications` model, one per
    scope and floor (see `_update_row`)."""
    dense = getattr(keras.applications, UPDATE_MODELS[name])(input_shape=(32, 32, 3), weights=None, classes=1000)
    rows = []
    for scope, floor in NM_SETTINGS if ":" in structure else SETTINGS:
        rows.append(_update_row(dense, name, structure, scope, floor, updates))
        print(json.dumps(rows[-1]), flush=True)
        keras.backend.clear_session(free_memory=False)
    return rows


def _update_row(dense, name, structure, scope, floor, updates):
    """`dense` pruned with `scope` and `floor`: its updates a training step apart
    (weights nudged, level moved by 1e-4), and what users call at each epoch of a
    10-epoch linear schedule (weights moved as by an epoch of training):
    `update_masks`, and `UpdateMasks.on_epoch_begin` of a callback on the model."""
    import numpy as np
    import tensorflow as tf

    import dg2pf_tf
    from dg2pf_tf.core import masking

    nm = ":" in structure
    target = 0.5 if nm else 0.9
    pruned = dg2pf_tf.prune(dense, sparsity=None if nm else target, pruning_epochs=1, structure=structure,
                            scope=scope, floor=None if nm else floor)
    masks = masking.mask_set(pruned)
    kernels = [kernel for kernel, _ in masks.entries]
    prunable = sum(int(np.prod(k.shape)) for k in kernels)

    @tf.function
    def nudge(seed, scale):
        # What training does to the weights between two updates: a step (1e-3), an epoch (1e-2).
        for i, kernel in enumerate(kernels):
            noise = tf.random.stateless_normal(kernel.shape, [seed, i], stddev=1.0)
            kernel.assign_add(scale * noise * tf.abs(kernel))

    def timed(call, *args):
        start = time.perf_counter()
        call(*args)
        _ = masks.entries[0][1][..., :1].numpy()  # waits for the device
        return time.perf_counter() - start

    base = target * 2 / 3
    nudge(tf.constant(0), 1e-3)
    first = timed(dg2pf_tf.update_masks, pruned, base - 0.1)
    dg2pf_tf.update_masks(pruned, base - 1e-4)
    steps, memory = [], _Memory()
    memory.reset()
    for i in range(updates):
        nudge(tf.constant(i + 1), 1e-3)
        level = base + 1e-4 * i  # a step of a 10-epoch schedule of ~1,000 steps an epoch
        steps.append(timed(dg2pf_tf.update_masks, pruned, level))
    peak = memory.extra_peak()
    exact = _zeros(masks) == round(masks.realised(level) * prunable)
    schedule = dg2pf_tf.schedules.Linear(target, 10)
    epochs = []
    for epoch in range(10):
        nudge(tf.constant(100 + epoch), 1e-2)
        epochs.append(timed(dg2pf_tf.update_masks, pruned, schedule(epoch)))
    callback = dg2pf_tf.UpdateMasks(schedule)
    callback.set_model(pruned)
    callback.on_train_begin()
    calls = []
    for epoch in range(10):
        nudge(tf.constant(200 + epoch), 1e-2)
        calls.append(timed(callback.on_epoch_begin, epoch))
    exact &= _zeros(masks) == round(masks.realised(target) * prunable)
    return {"model": name, "structure": structure, "prunable_weights": prunable, "scope": scope, "floor": floor,
            "seconds": median(steps), "epoch_update_seconds": median(epochs[1:]),
            "callback_seconds": median(calls[1:]), "first_call_seconds": first,
            "peak_extra_over_weight_bytes": peak / (4 * prunable), "exact": bool(exact)}


def _zeros(masks):
    import numpy as np

    return sum(int(m.numpy().size - np.count_nonzero(m.numpy())) for _, m in masks.entries)


class PairedSteps(keras.callbacks.Callback):
    """Times each training step of run()'s phases and, right after it, one step of
    the dense model's own `fit` train function with the same optimizer: each pair
    shares the process's state of that moment, so drift within the process (the
    same dense step varies by 10-25% over a run of this benchmark) cancels in its
    ratio. The phase's step is timed from `on_train_batch_begin` to
    `on_train_batch_end` of run()'s loop, which fetches the batch just before."""

    def __init__(self, references, batch):
        super().__init__()
        self.references = references  # optimizer class -> (dense model, batch iterator)
        self.batch = batch
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append([])

    def on_train_batch_begin(self, batch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        phase = time.perf_counter() - self.start
        dense, batches = self.references[type(self.model.optimizer)]
        start = time.perf_counter()
        dense.train_function(batches)
        self.epochs[-1].append((phase, time.perf_counter() - start))


def _paired(pairs, skip=2):
    """Median seconds of the phase step and of the dense step, and the median of
    their ratios, without the first `skip` pairs (tracing)."""
    pairs = pairs[skip:]
    return {"phase": median([p for p, _ in pairs]), "dense": median([d for _, d in pairs]),
            "ratio": median([p / d for p, d in pairs])}


def _references(dense, x, y):
    """Copies of `dense` compiled with the optimizers of run()'s phases at its
    defaults (AdamW + clipping: gradual, distill, detached; SGD with momentum:
    finetune), each with an endless iterator over one batch."""
    import tensorflow as tf

    import dg2pf_tf

    d = dg2pf_tf.RunConfig()
    optimizers = [
        keras.optimizers.AdamW(d.learning_rate, weight_decay=d.weight_decay, clipnorm=d.clipnorm),
        keras.optimizers.SGD(d.finetune_learning_rate, momentum=0.9),
    ]
    batches = tf.data.Dataset.from_tensors((x[:BATCH], y[:BATCH])).repeat()
    out = {}
    for optimizer in optimizers:
        copy = keras.models.clone_model(dense)
        copy.set_weights(dense.get_weights())
        copy.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        copy.make_train_function()
        out[type(optimizer)] = (copy, iter(batches))
    return out


def phase_steps(name, steps):
    """Per phase of `run()`: median seconds per step, of the paired dense `fit`
    step, and the median ratio of the pairs (see `PairedSteps`), one process."""
    import numpy as np

    import dg2pf_tf

    app, kwargs = STEP_MODELS[name]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * (steps + 2), 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, len(x))
    keras.utils.set_random_seed(0)
    dense = getattr(keras.applications, app)(input_shape=(32, 32, 3), weights=None, classes=10,
                                              classifier_activation=None, **kwargs)
    references = _references(dense, x, y)
    common = {"sparsity": 0.9, "pruning_epochs": 1, "patience": 1, "max_epochs": 1, "batch_size": BATCH, "verbose": 0,
                  "recalibrate_bn": False}
    out = {}
    # One epoch per phase: patience and max_epochs of 1 end each phase after it.
    timer = PairedSteps(references, (x, y))
    result = dg2pf_tf.run(dense, (x, y), (x[:BATCH], y[:BATCH]), callbacks=[timer], **common)
    for row, pairs in zip(result.history, timer.epochs):
        out[row["phase"]] = _paired(pairs)
    # The paper's learning rate for trained ImageNet networks: the weights, and so
    # the mask threshold, move less between steps.
    timer = PairedSteps(references, (x, y))
    dg2pf_tf.run(dense, (x, y), (x[:BATCH], y[:BATCH]), callbacks=[timer], learning_rate=1e-4,
                 finetune=False, **common)
    out["gradual_lr_1e-4"] = _paired(timer.epochs[0])
    # One epoch of distillation never plateaus, so run() skips the detached phase
    # above; without distillation (alpha=0) it comes right after the gradual one.
    timer = PairedSteps(references, (x, y))
    result = dg2pf_tf.run(dense, (x, y), (x[:BATCH], y[:BATCH]), callbacks=[timer], alpha=0.0,
                          finetune=False, **common)
    out["detached"] = _paired(timer.epochs[[r["phase"] for r in result.history].index("detached")])
    keras.backend.clear_session()
    return out


PHASES = ("gradual", "gradual_lr_1e-4", "distill", "detached", "finetune")


def tfmot_steps(name, steps):
    app, kwargs = STEP_MODELS[name]
    return run_tf_keras(TFMOT_CODE, app, json.dumps(kwargs), steps, BATCH)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per phase")
    parser.add_argument("--models", default=",".join(STEP_MODELS))
    parser.add_argument("--update_models", default=",".join(UPDATE_MODELS))
    parser.add_argument("--no_tfmot", action="store_true")
    parser.add_argument("--structure", default="unstructured",
                        help="masks of the update rows: unstructured, or an N:M pattern such as 2:4")
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
        updates += mask_updates(name, structure=args.structure)
    phases, baseline = {}, {}
    for name in models:
        print(f"Training steps of {name}: dense fit, then each phase of run()...", flush=True)
        phases[name] = phase_steps(name, args.steps)
        print(json.dumps(phases[name]), flush=True)
        if not args.no_tfmot:
            print(f"tfmot on {name} (tf_keras process)...", flush=True)
            baseline[name] = tfmot_steps(name, args.steps)
            print(json.dumps(baseline[name]), flush=True)

    print(f"\n{'model':<16}{'masks':>13}{'weights':>12}{'scope':>8}{'floor':>7}{'step ms':>9}{'epoch ms':>10}"
          f"{'callback ms':>13}{'first s':>9}{'peak/weights':>14}{'exact':>7}")
    for r in updates:
        print(f"{r['model']:<16}{r['structure']:>13}{r['prunable_weights']:>12,}{r['scope']:>8}{r['floor']:>7.1f}"
              f"{1000 * r['seconds']:>9.1f}{1000 * r['epoch_update_seconds']:>10.1f}"
              f"{1000 * r['callback_seconds']:>13.1f}{r['first_call_seconds']:>9.1f}"
              f"{r['peak_extra_over_weight_bytes']:>14.2f}{str(r['exact']):>7}")
    print(f"\n{'model':<14}" + "".join(f"{p:>17}" for p in (*PHASES, "tfmot/1", "tfmot/100")))
    for name, t in phases.items():
        cells = [t[p]["ratio"] if p in t else None for p in PHASES]
        theirs = baseline.get(name)
        cells += [theirs and theirs[f"frequency_{f}"]["ratio"] for f in (1, 100)]
        print(f"{name:<14}" + "".join(f"{c:>16.2f}x" if c else f"{'-':>17}" for c in cells))
        print(f"{'  s per step':<14}" + "".join(
            f"{t[p]['phase']:>8.3f}/{t[p]['dense']:<8.3f}" if p in t else f"{'-':>17}" for p in PHASES))
    print("(each phase step over the dense fit step with the same optimizer, timed in pairs: AdamW + "
          "clipping, SGD for finetune; tfmot over its own dense fit, both Adam)")

    result = {"batch_size": BATCH, "mask_updates": updates,
              "step_seconds": phases, "tfmot_step_seconds": baseline}
    write_json(args.out, result)


if __name__ == "__main__":
    main()
