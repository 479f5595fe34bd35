"""LiteRT latency of a dense and a 90%-sparse MobileNetV2 .tflite, 1 and 2 threads.

MobileNetV2 (alpha 1.0, 225x225: an odd size keeps every padding symmetric,
which XNNPACK's sparse path needs; 1000 classes, random weights) pruned with
`presets.xnnpack` (1x1 convolutions only) to `--sparsity`, exported with
`explicit_padding=True`; the dense file is the same model unpruned. Each
interpreter is the default ai-edge-litert one (XNNPACK on); invocations of the
four (file, threads) pairs are interleaved, `--runs` each after a warm-up, and
the median is reported with the sparse/dense ratio. `deploy_report` says
whether XNNPACK would take its sparse path (it does so only on ARM and on
x86 without AVX). Prints a table, writes JSON.

Run: python benchmarks/tflite_latency.py [--runs 200] [--sparsity 0.9] [--out FILE]
"""

import argparse
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from results_file import write_json  # noqa: E402  (benchmarks/ is on the path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "tflite_latency.json"))
    args = parser.parse_args()
    import keras
    import numpy as np

    import dg2pf_tf
    from dg2pf_tf.deploy import litert

    keras.utils.set_random_seed(0)
    dense = keras.applications.MobileNetV2(input_shape=(225, 225, 3), weights=None, classifier_activation=None)
    pruned = dg2pf_tf.prune(dense, exclude=dg2pf_tf.presets.xnnpack)
    dg2pf_tf.update_masks(pruned, args.sparsity)
    x = np.random.default_rng(0).normal(size=(1, 225, 225, 3)).astype(np.float32)
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in (("dense", dense), ("sparse", pruned)):
            dg2pf_tf.export(model, os.path.join(tmp, name), explicit_padding=True,
                            representative_data=x, verbose=0)
            with open(os.path.join(tmp, name, "model.tflite"), "rb") as f:
                files[name] = f.read()
    report = dg2pf_tf.deploy_report(files["sparse"])
    print(f"deploy_report: {report.verdict}", flush=True)

    runners = {}
    for name, content in files.items():
        for threads in (1, 2):
            runner = litert.interpreter(content, num_threads=threads)
            runner.set_tensor(runner.get_input_details()[0]["index"], x)
            runners[(name, threads)] = runner
    times = {key: [] for key in runners}
    for i in range(args.warmup + args.runs):
        for key, runner in runners.items():
            start = time.perf_counter()
            runner.invoke()
            if i >= args.warmup:
                times[key].append(time.perf_counter() - start)
    medians = {key: float(np.median(v)) for key, v in times.items()}

    print(f"\n{'threads':>7} {'dense ms':>9} {'sparse ms':>10} {'sparse/dense':>13}")
    rows = []
    for threads in (1, 2):
        d, s = medians[("dense", threads)], medians[("sparse", threads)]
        rows.append({"threads": threads, "dense_ms": 1e3 * d, "sparse_ms": 1e3 * s, "ratio": s / d})
        print(f"{threads:>7} {1e3 * d:>9.2f} {1e3 * s:>10.2f} {s / d:>13.3f}")
    print(f"file sizes: dense {len(files['dense']):,} bytes, sparse {len(files['sparse']):,} bytes")
    write_json(args.out, {"machine": platform.machine(), "processor": platform.processor(),
                          "runs": args.runs, "sparsity": args.sparsity, "rows": rows,
                          "bytes": {k: len(v) for k, v in files.items()},
                          "xnnpack_sparse_path": report.sparse_path, "deploy_verdict": report.verdict})


if __name__ == "__main__":
    main()
