"""Core-library speed and memory: wrapped vs dense training step, mask update.

Prints a table and writes JSON (default benchmarks/results/core_speed.json):
- train-step time of MobileNetV2 (alpha 0.35, 32x32, batch 64) pruned with
  recovery on, of its stripped copy, and of DG2PF's distillation step (pruned
  student + dense teacher), each as a ratio to the dense model, with steps of
  the four models interleaved in one process (median of `--steps` steps each);
- the same ratio for tfmot's `prune_low_magnitude` (tf_keras, own process).
Mask updates and the phases of `run()` at scale: benchmarks/phase_speed.py.

Run: python benchmarks/core_speed.py [--steps 40] [--out FILE]
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from results_file import write_json  # noqa: E402  (benchmarks/ is on the path)

# Runs in a tf_keras process: tfmot does not import under Keras 3.
TFMOT_CODE = r"""
import json, sys, time
import numpy as np
import tensorflow as tf
import tf_keras as keras
import tensorflow_model_optimization as tfmot
steps = int(sys.argv[1])
tf.random.set_seed(0)
x = np.random.default_rng(0).normal(size=(64, 32, 32, 3)).astype("float32")
y = np.random.default_rng(1).integers(0, 10, 64)
def build():
    return keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10,
                                          classifier_activation=None)
dense = build()
sched = tfmot.sparsity.keras.ConstantSparsity(0.9, begin_step=0, frequency=1)
pruned = tfmot.sparsity.keras.prune_low_magnitude(build(), pruning_schedule=sched)
step_vars = [l.pruning_step for l in pruned.layers if hasattr(l, "pruning_step")]
times = {"dense": [], "tfmot": []}
models = {"dense": dense, "tfmot": pruned}
for m in models.values():
    m.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
for v in step_vars:
    v.assign(0)
for name, m in models.items():
    for _ in range(3):
        m.train_on_batch(x, y)
for i in range(steps):
    for name, m in models.items():
        t = time.perf_counter(); m.train_on_batch(x, y); times[name].append(time.perf_counter() - t)
    for v in step_vars:
        v.assign_add(1)  # what UpdatePruningStep does each batch
print(json.dumps({k: float(np.median(v)) for k, v in times.items()}))
"""


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def step_ratios(steps):
    import keras
    import numpy as np

    import dg2pf_tf

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 32, 32, 3)).astype("float32")
    y = np.random.default_rng(1).integers(0, 10, 64)
    dense = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10, classifier_activation=None
    )
    pruned = dg2pf_tf.prune(dense, sparsity=0.9, pruning_epochs=1)
    dg2pf_tf.update_masks(pruned, 0.9)
    stripped = dg2pf_tf.strip(pruned)
    # DG2PF's training step: a second pruned student, distilled from the dense teacher.
    student = dg2pf_tf.prune(dense, sparsity=0.9, pruning_epochs=1)
    dg2pf_tf.update_masks(student, 0.9)
    distiller = dg2pf_tf.Distiller(student, dg2pf_tf.strip(dense))
    distiller.compile(optimizer="adam")
    models = {"dense": dense, "dg2pf_tf": pruned, "stripped": stripped, "distiller": distiller}
    for name, m in models.items():
        if name != "distiller":
            m.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        for _ in range(3):
            m.train_on_batch(x, y)
    times = {name: [] for name in models}
    for _ in range(steps):
        for name, m in models.items():
            start = time.perf_counter()
            m.train_on_batch(x, y)
            times[name].append(time.perf_counter() - start)
    return {name: median(v) for name, v in times.items()}


def run_tf_keras(code, *args, timeout=3600):
    """The JSON that `code` prints last, run in a tf_keras process (tfmot does
    not import under Keras 3); None, with its error printed, if it failed."""
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True, text=True, env={**os.environ, "TF_USE_LEGACY_KERAS": "1"}, timeout=timeout,
    )
    if done.returncode != 0:
        print(f"tfmot baseline failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def tfmot_ratio(steps):
    return run_tf_keras(TFMOT_CODE, steps, timeout=1800)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "core_speed.json"))
    args = parser.parse_args()

    print(f"Timing {args.steps} interleaved train steps (dense / dg2pf_tf / stripped / distiller)...", flush=True)
    ours = step_ratios(args.steps)
    print("Timing tfmot's prune_low_magnitude in a tf_keras process...", flush=True)
    theirs = tfmot_ratio(args.steps)

    rows = [
        ("dg2pf_tf wrapped step / dense step (MobileNetV2 a0.35, 32x32, b64)", ours["dg2pf_tf"] / ours["dense"],
         "<= 1.10"),
        ("stripped step / dense step", ours["stripped"] / ours["dense"], "~ 1.00"),
        ("distillation step (teacher + pruned student) / dense step", ours["distiller"] / ours["dense"],
         "<= 1.40"),
    ]
    if theirs:
        rows.append(("tfmot wrapped step / dense step (tf_keras)", theirs["tfmot"] / theirs["dense"], "comparison"))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{width}}  {'value':>8}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>8.3f}  {target}")

    result = {
        "step_seconds": ours,
        "tfmot_step_seconds": theirs,
        "wrapped_over_dense": ours["dg2pf_tf"] / ours["dense"],
        "stripped_over_dense": ours["stripped"] / ours["dense"],
        "distill_over_dense": ours["distiller"] / ours["dense"],
        "tfmot_over_dense": theirs and theirs["tfmot"] / theirs["dense"],
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
