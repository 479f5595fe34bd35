"""Latency, MACs and parameters of channel-pruned, shrunk models against the dense ones.

ResNet-50 and MobileNetV2 (alpha 1.0) at 224x224, pruned with
`prune(structure="channel", budget=--budget, floor=--floor)` to each level
(the share of channels, MACs or parameters removed; the default floor 0.5
ranks channels over the whole network, 1.0 removes the same share of
channels from every group), masks made final, then `shrink()`. Weights:
`--weights random` (1000 classes, the initial weights) or `digits`: the
model trained for `--train_epochs` epochs on scikit-learn's digits,
upsampled to 32x32 RGB (10 classes), its weights then used at 224x224 (a
convolution's weights do not depend on the input size): which channels a
ranking removes depends on the weights. For each model: multiply-accumulates
(as `budget="macs"` counts them), parameters, Keras inference at batch 1 and
32 (the compiled `predict_on_batch`), and the default LiteRT interpreter
(`export`'s float32 file) at 1 and 2 threads. Timings of a model family are
interleaved round by round in one process and the median is taken;
speed-up = dense / shrunk. Prints a table, writes JSON.

Run: python benchmarks/shrink_latency.py [--levels 0.3,0.5,0.7] [--budget channels|macs|params]
         [--weights random|digits] [--runs 10] [--floor 0.5] [--out FILE]
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from results_file import write_json  # noqa: E402  (benchmarks/ is on the path)


def builders(classes):
    import keras

    return {
        "resnet50": lambda shape: keras.applications.ResNet50(
            weights=None, input_shape=shape, classes=classes),
        "mobilenet_v2": lambda shape: keras.applications.MobileNetV2(
            weights=None, input_shape=shape, classes=classes),
    }


def dense_model(family, weights, epochs):
    """`(model at 224x224, digits accuracy or None)`: `family` with random weights
    (1000 classes) or, for `weights='digits'`, `digits_trained` ones."""
    if weights != "digits":
        return builders(1000)[family]((224, 224, 3)), None
    dense, accuracy = digits_trained(builders(10)[family], epochs)
    print(f"{family}: trained on digits, held-out accuracy {accuracy:.4f}", flush=True)
    return dense, accuracy


def digits_trained(build, epochs):
    """`build` at 224x224 with the weights it learnt in `epochs` epochs on digits
    at 32x32 (RGB, 10 classes), BatchNorm statistics settled; and its accuracy
    on the held-out digits."""
    import keras
    import numpy as np
    import tensorflow as tf

    from dg2pf_tf import reestimate_batchnorm
    from zoo.data import digits_arrays

    (x, y), (xt, yt) = digits_arrays()
    rgb = lambda a: tf.image.resize(np.repeat(a, 3, axis=-1) * 255.0, (32, 32)).numpy()  # noqa: E731
    x, xt = rgb(x), rgb(xt)
    keras.utils.set_random_seed(0)
    small = build((32, 32, 3))
    small.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    small.fit(x, y, batch_size=64, epochs=epochs, verbose=0)
    reestimate_batchnorm(small, [x[i:i + 64] for i in range(0, len(x), 64)])
    accuracy = float(np.mean(small.predict(xt, verbose=0).argmax(-1) == yt))
    model = build((224, 224, 3))
    model.set_weights(small.get_weights())
    return model, accuracy


def shrunk_models(dense, levels, floor, budget):
    """The dense model and one shrunk model per level, with the channels each removed."""
    import dg2pf_tf
    from dg2pf_tf.core import masking

    models = {"dense": (dense, 0, 0)}
    for level in levels:
        pruned = dg2pf_tf.prune(dense, structure="channel", floor=floor, budget=budget)
        dg2pf_tf.update_masks(pruned, level)
        dg2pf_tf.finalize(pruned)
        criterion = masking.mask_set(pruned).criterion()
        removed = criterion.removed([m.numpy() for m in pruned.masks])
        models[f"{level:.0%}"] = (dg2pf_tf.shrink(pruned), removed, criterion.total)
    return models


def keras_latency(models, batch, runs):
    import numpy as np

    x = np.random.default_rng(0).uniform(0, 255, (batch, 224, 224, 3)).astype("float32")
    times = {name: [] for name in models}
    for model, _, _ in models.values():
        model.predict_on_batch(x)  # traces
    for _ in range(runs):
        for name, (model, _, _) in models.items():
            start = time.perf_counter()
            model.predict_on_batch(x)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def litert_latency(files, threads, runs, input_shape=(224, 224, 3)):
    import numpy as np

    from dg2pf_tf.deploy import litert

    x = np.random.default_rng(0).uniform(0, 255, (1, *input_shape)).astype("float32")
    runners = {name: litert.interpreter(content, num_threads=threads) for name, content in files.items()}
    times = {name: [] for name in files}
    for name, runner in runners.items():
        litert.predict(files[name], x, runner)  # sets the input, which stays
    # The interpreter's invoke alone, as an app calls it: Python's handling of inputs and
    # outputs takes tens of microseconds, a third of a small MNIST model's time.
    for _ in range(runs):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner.invoke()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v2")
    parser.add_argument("--levels", default="0.3,0.5,0.7")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--floor", type=float, default=0.5)
    parser.add_argument("--budget", default="channels", choices=("channels", "macs", "params"))
    parser.add_argument("--weights", default="random", choices=("random", "digits"))
    parser.add_argument("--train_epochs", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "shrink_latency.json"))
    args = parser.parse_args()
    from dg2pf_tf.channels.costs import model_macs
    from dg2pf_tf.deploy import convert

    levels = [float(v) for v in args.levels.split(",")]
    rows = []
    for family in args.models.split(","):
        dense, accuracy = dense_model(family, args.weights, args.train_epochs)
        models = shrunk_models(dense, levels, args.floor, args.budget)
        measured = {f"keras_batch{b}": keras_latency(models, b, args.runs) for b in (1, 32)}
        files = {name: convert.float_file(model) for name, (model, _, _) in models.items()}
        measured.update({f"litert_{t}_threads": litert_latency(files, t, args.runs) for t in (1, 2)})
        reference = models["dense"][0]
        for name, (model, removed, total) in models.items():
            row = {"model": family, "floor": args.floor, "budget": args.budget, "weights": args.weights,
                   "digits_accuracy": accuracy, "level": name, "channels_removed": removed, "of": total,
                   "params": model.count_params(), "macs": model_macs(model)}
            for key, values in measured.items():
                row[f"{key}_s"] = values[name]
                row[f"{key}_speedup"] = values["dense"] / values[name]
            row["params_ratio"] = row["params"] / reference.count_params()
            row["macs_ratio"] = row["macs"] / model_macs(reference)
            rows.append(row)
            print(json.dumps(row), flush=True)

    keys = ("keras_batch1", "keras_batch32", "litert_1_threads", "litert_2_threads")
    print(f"\n{'model':<13} {args.budget:>8} {'channels':>13} {'params':>19} {'MACs':>22} "
          + " ".join(f"{k:>22}" for k in keys))
    for r in rows:
        cells = " ".join(f"{r[k + '_s'] * 1e3:>12.1f} ms {r[k + '_speedup']:>5.2f}x" for k in keys)
        print(f"{r['model']:<13} {r['level']:>8} {r['channels_removed']:>6}/{r['of']:<6} "
              f"{r['params']:>11,} ({r['params_ratio']:.2f}x) {r['macs']:>14,} ({r['macs_ratio']:.2f}x) {cells}")
    write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
