"""Latency, FLOPs and parameters of channel-pruned, shrunk models against the dense ones.

ResNet-50 and MobileNetV2 (alpha 1.0) at 224x224, 1000 classes, random
weights (the speed of a shape does not depend on its values), pruned with
`prune(structure="channel", floor=--floor)` to each share of channels (the
default floor 0.5 ranks channels over the whole network; 1.0 removes the same
share from every group), masks made final, then `shrink()`. For each model: multiply-accumulates of its convolutions and
Dense layers, parameters, Keras inference at batch 1 and 32 (the compiled
`predict_on_batch`), and the default LiteRT interpreter (`export`'s float32
file) at 1 and 2 threads. Timings of a model family are interleaved round by
round in one process and the median is taken; speed-up = dense / shrunk.
Prints a table, writes JSON.

Run: python benchmarks/shrink_latency.py [--levels 0.3,0.5,0.7] [--runs 10] [--floor 0.5] [--out FILE]
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def macs(model):
    """Multiply-accumulates of one forward pass (batch 1) in convolutions and Dense layers."""
    import keras
    import numpy as np

    total = 0
    for layer in model.layers:
        if not hasattr(layer, "kernel") or not isinstance(layer, (
                keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
            continue
        out = layer.output.shape
        positions = int(np.prod(out[1:-1])) if len(out) > 2 else 1
        total += positions * int(np.prod(layer.kernel.shape))  # each kernel entry once per position
    return total


def builders():
    import keras

    return {
        "resnet50": lambda: keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3)),
        "mobilenet_v2": lambda: keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3)),
    }


def shrunk_models(build, levels, floor):
    """The dense model and one shrunk model per level, with the channels each removed."""
    import dg2pf_tf
    from dg2pf_tf import masking

    dense = build()
    models = {"dense": (dense, 0, 0)}
    for level in levels:
        pruned = dg2pf_tf.prune(dense, structure="channel", floor=floor)
        dg2pf_tf.update_masks(pruned, level)
        dg2pf_tf.finalize(pruned)
        criterion = masking.mask_set(pruned).criterion()
        models[f"{level:.0%}"] = (dg2pf_tf.shrink(pruned), criterion.removals(level), criterion.total)
    return models


def keras_latency(models, batch, runs):
    import numpy as np

    x = np.random.default_rng(0).uniform(0, 255, (batch, 224, 224, 3)).astype("float32")
    times = {name: [] for name in models}
    for name, (model, _, _) in models.items():
        model.predict_on_batch(x)  # traces
    for _ in range(runs):
        for name, (model, _, _) in models.items():
            start = time.perf_counter()
            model.predict_on_batch(x)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def litert_latency(files, threads, runs):
    import numpy as np

    from dg2pf_tf import litert

    x = np.random.default_rng(0).uniform(0, 255, (1, 224, 224, 3)).astype("float32")
    runners = {name: litert.interpreter(content, num_threads=threads) for name, content in files.items()}
    times = {name: [] for name in files}
    for name, runner in runners.items():
        litert.predict(files[name], x, runner)
    for _ in range(runs):
        for name, runner in runners.items():
            start = time.perf_counter()
            litert.predict(files[name], x, runner)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v2")
    parser.add_argument("--levels", default="0.3,0.5,0.7")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--floor", type=float, default=0.5)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "shrink_latency.json"))
    args = parser.parse_args()
    from dg2pf_tf import litert_convert

    levels = [float(v) for v in args.levels.split(",")]
    rows = []
    for family in args.models.split(","):
        models = shrunk_models(builders()[family], levels, args.floor)
        measured = {f"keras_batch{b}": keras_latency(models, b, args.runs) for b in (1, 32)}
        files = {name: litert_convert.float_file(model) for name, (model, _, _) in models.items()}
        measured.update({f"litert_{t}_threads": litert_latency(files, t, args.runs) for t in (1, 2)})
        dense_model = models["dense"][0]
        for name, (model, removed, total) in models.items():
            row = {"model": family, "floor": args.floor, "channels_removed": name,
                   "removed": removed, "of": total,
                   "params": model.count_params(), "macs": macs(model)}
            for key, values in measured.items():
                row[f"{key}_s"] = values[name]
                row[f"{key}_speedup"] = values["dense"] / values[name]
            row["params_ratio"] = row["params"] / dense_model.count_params()
            row["macs_ratio"] = row["macs"] / macs(dense_model)
            rows.append(row)
            print(json.dumps(row), flush=True)

    keys = ("keras_batch1", "keras_batch32", "litert_1_threads", "litert_2_threads")
    print(f"\n{'model':<13} {'removed':>8} {'params':>12} {'MACs':>15} "
          + " ".join(f"{k:>22}" for k in keys))
    for r in rows:
        cells = " ".join(f"{r[k + '_s'] * 1e3:>12.1f} ms {r[k + '_speedup']:>5.2f}x" for k in keys)
        print(f"{r['model']:<13} {r['channels_removed']:>8} {r['params']:>12,} {r['macs']:>15,} {cells}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"command": "python benchmarks/shrink_latency.py " + " ".join(sys.argv[1:]),
                   "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
