"""Exported file sizes: sparse LiteRT files against the dense float32 .tflite.

For an MLP (64-512-512-10) and MobileNetV2 (alpha 1.0, 224x224, 1000
classes, random weights: sizes do not depend on training), pruned by global
magnitude to each sparsity, `dg2pf_tf.export(..., quantize=...)` writes the
float32 sparse file and the int8 one (dynamic-range for the MLP, full-integer
for MobileNetV2, calibrated on random inputs); each is compared with the
dense float32 .tflite of the same model. Prints a table, writes JSON.

Run: python benchmarks/export_size.py [--sparsities 0.9,0.95,0.98] [--out FILE]
"""

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from results_file import write_json  # noqa: E402  (benchmarks/ is on the path)


def models():
    import keras

    def mlp():
        return keras.Sequential([keras.Input((64,)), keras.layers.Dense(512, activation="relu"),
                                 keras.layers.Dense(512, activation="relu"), keras.layers.Dense(10)])

    def mobilenet_v2():
        return keras.applications.MobileNetV2(input_shape=(224, 224, 3), weights=None,
                                              classifier_activation=None)

    return {"mlp": (mlp, (64,), "dynamic"), "mobilenet_v2": (mobilenet_v2, (224, 224, 3), "int8")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.9,0.95,0.98")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "export_size.json"))
    args = parser.parse_args()
    import keras
    import numpy as np

    import dg2pf_tf

    rows = []
    for name, (build, shape, quantize) in models().items():
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            keras.utils.set_random_seed(0)
            pruned = dg2pf_tf.prune(build())
            dg2pf_tf.update_masks(pruned, sparsity)
            data = np.random.default_rng(0).normal(size=(32, *shape)).astype(np.float32)
            with tempfile.TemporaryDirectory() as tmp:
                report = dg2pf_tf.export(pruned, os.path.join(tmp, "out"), quantize=quantize,
                                         representative_data=data, verbose=0)
            dense = report["files"]["model.tflite"]["dense_equivalent_bytes"]
            for file in ("model.tflite", "model_int8.tflite"):
                entry = report["files"][file]
                encodings = sorted({t["encoding"] for t in entry["tensors"]})
                rows.append({"model": name, "sparsity": sparsity, "file": file,
                             "weights": "int8 " + quantize if file != "model.tflite" else "float32",
                             "bytes": entry["bytes"], "dense_float32_bytes": dense,
                             "ratio": entry["bytes"] / dense,
                             "own_dense_bytes": entry["dense_equivalent_bytes"],
                             "encodings": encodings})
                print(json.dumps(rows[-1]), flush=True)

    print(f"\n{'model':<13} {'sparsity':>8} {'file':<18} {'weights':<13} {'bytes':>11} "
          f"{'dense f32':>11} {'ratio':>6}  encodings")
    for r in rows:
        print(f"{r['model']:<13} {r['sparsity']:>8.2f} {r['file']:<18} {r['weights']:<13} "
              f"{r['bytes']:>11,} {r['dense_float32_bytes']:>11,} {r['ratio']:>6.3f}  "
              f"{','.join(r['encodings'])}")
    write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
