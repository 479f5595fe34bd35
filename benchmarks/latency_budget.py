"""Pruning to a latency budget: measured speed-up, the latency model's prediction, its build time.

ResNet-50 and MobileNetV2 (alpha 1.0) at 224x224, random weights (1000
classes), pruned with `prune(structure="channel", budget=Latency(...),
sparsity=--level)`, masks made final, then `shrink(fold_batchnorm=True)`.
Against the dense model with its BatchNorm folded too (so folding is not
counted as pruning). `Latency(runtime="keras", batch_size=32)` is measured
with the compiled `predict_on_batch` at batch 32 (and 1);
`Latency(runtime="litert", threads=2)` with `export`'s float32 file in the
LiteRT interpreter at 2 (and 1) threads. Timings of the dense and shrunk model
are interleaved in one process, medians of --runs. Also: the latency model's
prediction of the shrunk model's share of the dense time against the share
measured (the absolute times drift by up to 25% over minutes here), the seconds it took
to build (its cache is a fresh directory), and how much of each residual
stream (a group of several tied producers) went. `--weights digits` uses the
weights each model learnt on scikit-learn's digits at 32x32 (see
benchmarks/shrink_latency.py) in place of random ones. `--int8` adds, in the
LiteRT rows, `export`'s full-integer file of the shrunk model (calibrated on
the held-out digits at 224x224, or noise for random weights): its speed-up
against the dense float file, and its top-1 agreement with the float shrunk
model on those inputs. Prints a table, writes JSON.

Run: python benchmarks/latency_budget.py [--models resnet50,mobilenet_v2]
         [--runtimes keras,litert] [--level 0.5] [--runs 10] [--weights random|digits]
         [--int8] [--out FILE]
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from results_file import write_json  # noqa: E402  (benchmarks/ is on the path)
from shrink_latency import dense_model, keras_latency, litert_latency  # noqa: E402


def pruned_to_latency(dense, budget, level):
    """`(shrunk, criterion, flags, build_seconds)` of `dense` pruned to `level` of `budget`."""
    import dg2pf_tf
    from dg2pf_tf.core import masking

    start = time.perf_counter()
    pruned = dg2pf_tf.prune(dense, structure="channel", budget=budget, sparsity=level)
    criterion = masking.mask_set(pruned).criterion()
    built = time.perf_counter() - start
    dg2pf_tf.update_masks(pruned, level)
    dg2pf_tf.finalize(pruned)
    flags = criterion.removed_flags([m.numpy() for m in pruned.masks])
    return dg2pf_tf.shrink(pruned, fold_batchnorm=True), criterion, flags, pruned, built


def stream_shares(pruned, flags):
    """{group name: share removed} of the residual streams (groups of several tied producers)."""
    from dg2pf_tf.channels import groups

    found = groups.prunable_groups(pruned.model, pruned.targets).groups
    shares, start = {}, 0
    for g in found:
        if "tied)" in g.name:
            shares[g.name] = float(flags[start:start + g.size].mean())
        start += g.size
    return shares


def images(weights, count=256):
    """Inputs at 224x224 for int8 calibration and agreement: the held-out digits
    (upsampled, RGB, 0-255, as the digits-trained weights saw them at 32x32), or
    uniform noise for random weights."""
    import numpy as np
    import tensorflow as tf

    if weights == "random":
        return np.random.default_rng(1).uniform(0, 255, (64, 224, 224, 3)).astype("float32")
    from zoo.data import digits_arrays

    _, (x, _) = digits_arrays()
    return tf.image.resize(np.repeat(x[:count], 3, axis=-1) * 255.0, (224, 224)).numpy()


def int8_file(model, data):
    """`(bytes, top-1 agreement with the float model on data)` of `export`'s int8 file of `model`."""
    import dg2pf_tf

    with tempfile.TemporaryDirectory() as out:
        report = dg2pf_tf.export(model, out, quantize="int8", representative_data=data, overwrite=True, verbose=0)
        with open(os.path.join(out, "model_int8.tflite"), "rb") as f:
            return f.read(), report["files"]["model_int8.tflite"]["top1_agreement"]


def measure(models, runtime, runs, int8_data=None):
    """`({setting: {name: seconds}}, int8 agreement)` in the runtime the budget named and
    its other setting; with `int8_data`, also the shrunk model's int8 file in LiteRT."""
    from dg2pf_tf.deploy import convert

    if runtime == "keras":
        return {f"keras_batch{b}": keras_latency({k: (m, 0, 0) for k, m in models.items()}, b, runs)
                for b in (32, 1)}, None
    files = {name: convert.float_file(model) for name, model in models.items()}
    agreement = None
    if int8_data is not None:
        files["shrunk_int8"], agreement = int8_file(models["shrunk"], int8_data)
    return {f"litert_{t}_threads": litert_latency(files, t, runs) for t in (2, 1)}, agreement


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v2")
    parser.add_argument("--runtimes", default="keras,litert")
    parser.add_argument("--level", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--weights", default="random", choices=("random", "digits"))
    parser.add_argument("--train_epochs", type=int, default=10)
    parser.add_argument("--int8", action="store_true", help="also the shrunk model's int8 file (LiteRT rows)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "latency_budget.json"))
    args = parser.parse_args()
    import dg2pf_tf
    from dg2pf_tf.channels.costs import model_macs

    rows = []
    for family in args.models.split(","):
        dense, accuracy = dense_model(family, args.weights, args.train_epochs)
        folded = dg2pf_tf.shrink(dense, fold_batchnorm=True)
        for runtime in args.runtimes.split(","):
            with tempfile.TemporaryDirectory() as cache:
                budget = dg2pf_tf.Latency(runtime=runtime, threads=2 if runtime == "litert" else None,
                                          cache_dir=cache)
                small, criterion, flags, pruned, built = pruned_to_latency(dense, budget, args.level)
            measured, agreement = measure({"dense": folded, "shrunk": small}, runtime, args.runs,
                                          images(args.weights) if args.int8 else None)
            target = next(iter(measured))  # the setting the budget was measured in
            predicted = criterion.costs.seconds(flags)
            row = {"model": family, "weights": args.weights, "digits_accuracy": accuracy,
                   "budget": str(budget), "level": args.level, "build_s": built,
                   "predicted_s": predicted, "model_dense_s": criterion.costs.measured,
                   # The model predicts a share of the dense time it measured; this
                   # machine's speed drifts by up to 25% over minutes, so the share is
                   # compared with the share measured here, dense and shrunk interleaved.
                   "predicted_share": predicted / criterion.costs.measured,
                   "measured_share": measured[target]["shrunk"] / measured[target]["dense"],
                   "prediction_error": (predicted / criterion.costs.measured)
                   / (measured[target]["shrunk"] / measured[target]["dense"]) - 1,
                   "channels_removed": int(flags.sum()), "of": criterion.total,
                   "macs_ratio": model_macs(small) / model_macs(folded),
                   "streams_removed": stream_shares(pruned, flags)}
            for key, values in measured.items():
                row[f"{key}_dense_s"], row[f"{key}_s"] = values["dense"], values["shrunk"]
                row[f"{key}_speedup"] = values["dense"] / values["shrunk"]
                if "shrunk_int8" in values:  # against the dense float file
                    row[f"{key}_int8_s"] = values["shrunk_int8"]
                    row[f"{key}_int8_speedup"] = values["dense"] / values["shrunk_int8"]
            if agreement is not None:
                row["int8_top1_agreement"] = agreement
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n{'model':<13} {'budget':<30} {'build':>6} {'MACs':>6} {'predicted':>10} {'measured':>9} "
          f"{'error':>6}  speed-up (budget's setting, other)")
    for r in rows:
        keys = [k[:-8] for k in r if k.endswith("_speedup") and not k.endswith("_int8_speedup")]
        print(f"{r['model']:<13} {r['budget']:<30} {r['build_s']:>5.0f}s {r['macs_ratio']:>5.2f}x "
              f"{r['predicted_share']:>10.1%} {r['measured_share']:>9.1%} {r['prediction_error']:>+6.1%}  "
              + ", ".join(f"{k} {r[k + '_speedup']:.2f}x" for k in keys))
        if "int8_top1_agreement" in r:
            print(f"{'':<13}   + int8: " + ", ".join(f"{k} {r[k + '_int8_speedup']:.2f}x" for k in keys
                                                    if k + "_int8_speedup" in r)
                  + f" against the dense float file; top-1 agreement with the float model "
                    f"{r['int8_top1_agreement']:.1%}")
        for name, share in r["streams_removed"].items():
            print(f"{'':<13}   stream {name}: {share:.0%} of its channels removed")
    write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
