"""Every keras.applications model through prune -> update_masks -> strip -> .keras round trip.

For each architecture (random weights, smallest input, 10 classes), in one
process: the share of its Dense/Conv2D kernels that `prune()` masks, whether
`update_masks(0.9)` leaves exactly round(0.9 N) zeros, the largest difference
between the pruned and the stripped model's outputs, whether the `.keras`
file of the pruned model loads back with the same outputs, weights entirely
zero, and the seconds each step took (the first mask update includes its
compilation). Prints a table and writes JSON (default
benchmarks/results/applications.json).

Run: python benchmarks/applications.py [--models ResNet50,MobileNetV2] [--level 0.9]
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from results_file import write_json  # noqa: E402  (benchmarks/ is on the path)

import dg2pf_tf  # noqa: E402

SMALLEST = {"InceptionResNetV2": 75, "InceptionV3": 75, "Xception": 71}
MODELS = [
    "ConvNeXtTiny", "ConvNeXtSmall", "ConvNeXtBase", "ConvNeXtLarge", "ConvNeXtXLarge",
    "DenseNet121", "DenseNet169", "DenseNet201",
    *[f"EfficientNetB{i}" for i in range(8)],
    "EfficientNetV2B0", "EfficientNetV2B1", "EfficientNetV2B2", "EfficientNetV2B3",
    "EfficientNetV2S", "EfficientNetV2M", "EfficientNetV2L",
    "InceptionResNetV2", "InceptionV3", "MobileNet", "MobileNetV2", "MobileNetV3Small",
    "MobileNetV3Large", "NASNetLarge", "NASNetMobile", "ResNet50", "ResNet101", "ResNet152",
    "ResNet50V2", "ResNet101V2", "ResNet152V2", "VGG16", "VGG19", "Xception",
]


def _largest_difference(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def check(name, level, directory):
    """One row: what prune/update/strip/round trip did on `keras.applications.<name>`."""
    size = SMALLEST.get(name, 32)
    model = getattr(keras.applications, name)(input_shape=(size, size, 3), weights=None, classes=10)
    x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype("float32")
    seconds = {}
    tick = time.perf_counter()
    pruned = dg2pf_tf.prune(model)
    seconds["prune"] = time.perf_counter() - tick
    targets = {id(v) for v in pruned.targets}
    kernels = [l.kernel for l in pruned.model.layers  # these models are flat graphs
               if isinstance(l, (keras.layers.Dense, keras.layers.Conv2D))]
    tick = time.perf_counter()
    dg2pf_tf.update_masks(pruned, level)
    seconds["first_update"] = time.perf_counter() - tick
    masks = [m.numpy() for m in pruned.masks]
    total = sum(m.size for m in masks)
    zeros = total - sum(int(np.count_nonzero(m)) for m in masks)
    expected = pruned(x)
    tick = time.perf_counter()
    stripped = dg2pf_tf.strip(pruned)
    seconds["strip"] = time.perf_counter() - tick
    path = os.path.join(directory, f"{name}.keras")
    tick = time.perf_counter()
    pruned.save(path)
    loaded = keras.models.load_model(path)
    seconds["round_trip"] = time.perf_counter() - tick
    os.remove(path)
    row = {
        "model": name, "input": size, "params": model.count_params(), "prunable": total,
        "kernels_masked": sum(id(k) in targets for k in kernels) / max(1, len(kernels)),
        "exact": zeros == round(level * total),
        "strip_difference": _largest_difference(stripped(x), expected),
        "round_trip_difference": _largest_difference(loaded(x), expected),
        "entirely_zero": len(dg2pf_tf.sparsity_summary(stripped).dead),
        "seconds": seconds,
    }
    keras.backend.clear_session()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--level", type=float, default=0.9)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "applications.json"))
    args = parser.parse_args()
    names = [m for m in args.models.split(",") if m]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for name in names:
            print(f"{name}...", flush=True)
            rows.append(check(name, args.level, directory))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'model':<20}{'params':>13}{'masked':>8}{'exact':>7}{'strip diff':>12}{'file diff':>11}"
          f"{'zero':>6}{'update s':>10}")
    for r in rows:
        print(f"{r['model']:<20}{r['params']:>13,}{r['kernels_masked']:>8.0%}{str(r['exact']):>7}"
              f"{r['strip_difference']:>12.1e}{r['round_trip_difference']:>11.1e}{r['entirely_zero']:>6}"
              f"{r['seconds']['first_update']:>10.1f}")
    write_json(args.out, {"level": args.level, "rows": rows})


if __name__ == "__main__":
    main()
