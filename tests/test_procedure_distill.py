"""Distiller: the KD loss value, frozen teacher, label formats, replica scaling."""

import json
import warnings

import keras
import numpy as np
import pytest

import dg2pf_tf
from helpers import run_python


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _models(teacher_softmax=False):
    keras.utils.set_random_seed(1)
    student = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, name="s")])
    teacher = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(4, activation="softmax" if teacher_softmax else None, name="t")]
    )
    return student, teacher


@pytest.mark.parametrize("teacher_softmax", [False, True])
def test_kd_loss_equals_the_formula(teacher_softmax):
    student, teacher = _models(teacher_softmax)
    x = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
    y = np.arange(16) % 4
    distiller = dg2pf_tf.Distiller(student, teacher, temperature=3.0, alpha=0.6)
    distiller.compile(optimizer="sgd")
    loss = float(distiller.compute_loss(x, y, distiller(x)))

    zs = student.predict(x, verbose=0)
    zt = teacher.predict(x, verbose=0)
    zt = np.log(zt) if teacher_softmax else zt
    p, q = _softmax(zt / 3.0), _softmax(zs / 3.0)
    kd = 9.0 * np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))
    ce = np.mean(-np.log(_softmax(zs)[np.arange(16), y]))
    assert loss == pytest.approx(0.6 * kd + 0.4 * ce, rel=1e-4)


@pytest.mark.parametrize("teacher_softmax", [False, True])
def test_kd_term_equals_keras_logits_distillation(teacher_softmax):
    student, teacher = _models(teacher_softmax)
    x = np.random.default_rng(1).normal(size=(16, 6)).astype("float32")
    distiller = dg2pf_tf.Distiller(student, teacher, temperature=3.0, alpha=0.6)
    distiller.compile(optimizer="sgd")
    distiller.compute_loss(x, np.arange(16) % 4, distiller(x))
    ours = float(distiller.kd_loss_tracker.result())
    # Keras' loss takes logits only: a softmax teacher's go in as log-probabilities.
    # Its default loss="kl_divergence" (a function, not the class) skips the
    # softmax and the T^2 (Keras 3.15); the class instance takes that branch.
    zt = teacher.predict(x, verbose=0)
    zt = np.log(zt) if teacher_softmax else zt
    theirs = keras.distillation.LogitsDistillation(
        temperature=3.0, loss=keras.losses.KLDivergence()).compute_loss(zt, student.predict(x, verbose=0))
    assert ours == pytest.approx(float(theirs), rel=1e-5)


def test_the_students_regularisation_losses_are_added():
    keras.utils.set_random_seed(1)
    student = keras.Sequential([keras.Input((6,)), keras.layers.Dense(
        4, kernel_regularizer=keras.regularizers.L2(0.5), activity_regularizer=keras.regularizers.L1(0.1))])
    x = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
    y = np.arange(8) % 4
    distiller = dg2pf_tf.Distiller(student)
    distiller.compile(optimizer="sgd")
    loss = float(distiller.compute_loss(x, y, distiller(x)))
    z = student.predict(x, verbose=0)
    ce = np.mean(-np.log(_softmax(z)[np.arange(8), y]))
    kernel = student.layers[0].kernel.numpy()
    extra = 0.5 * np.sum(kernel ** 2) + 0.1 * np.sum(np.abs(z)) / len(x)
    assert loss == pytest.approx(ce + extra, rel=1e-5)


def test_one_hot_and_sparse_labels_give_the_same_loss():
    student, teacher = _models()
    x = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
    y = np.arange(8) % 4
    distiller = dg2pf_tf.Distiller(student, teacher)
    distiller.compile(optimizer="sgd")
    sparse = float(distiller.compute_loss(x, y, distiller(x)))
    dense = float(distiller.compute_loss(x, np.eye(4, dtype="float32")[y], distiller(x)))
    assert sparse == pytest.approx(dense, rel=1e-6)


def test_fit_trains_the_student_only_and_logs_each_part():
    student, teacher = _models()
    before = [w.copy() for w in teacher.get_weights()]
    x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    y = np.arange(32) % 4
    distiller = dg2pf_tf.Distiller(student, teacher)
    distiller.compile(optimizer=keras.optimizers.SGD(0.1), metrics=["accuracy"])
    student_before = [w.copy() for w in student.get_weights()]
    history = distiller.fit(x, y, epochs=2, batch_size=8, verbose=0).history
    assert {"loss", "kd_loss", "ce_loss", "accuracy"} <= set(history)
    assert all(np.array_equal(a, b) for a, b in zip(before, teacher.get_weights()))
    assert not all(np.array_equal(a, b) for a, b in zip(student_before, student.get_weights()))
    assert history["kd_loss"][-1] < history["kd_loss"][0]


def test_sample_weights_scale_each_examples_terms_and_a_zero_weight_removes_it():
    student, teacher = _models(teacher_softmax=True)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = np.arange(16) % 4
    w = rng.uniform(0.0, 2.0, 16).astype("float32")
    w[[3, 10]] = 0.0
    distiller = dg2pf_tf.Distiller(student, teacher, temperature=3.0, alpha=0.6)
    distiller.compile(optimizer="sgd")
    loss = float(distiller.compute_loss(x, y, distiller(x), sample_weight=w))
    zs, zt = student.predict(x, verbose=0), np.log(teacher.predict(x, verbose=0))
    p, q = _softmax(zt / 3.0), _softmax(zs / 3.0)
    kd = 9.0 * np.sum(p * (np.log(p) - np.log(q)), -1)
    ce = -np.log(_softmax(zs)[np.arange(16), y])
    # Each example's terms times its weight, averaged over the batch (as Keras'
    # "sum_over_batch_size" does): the weights are not renormalised.
    assert loss == pytest.approx(0.6 * np.mean(w * kd) + 0.4 * np.mean(w * ce), rel=1e-5)
    assert float(distiller.kd_loss_tracker.result()) == pytest.approx(np.mean(w * kd), rel=1e-5)

    # Training through fit: whatever examples 3 and 10 hold, the student learns the same.
    def trained(x, y):
        s, t = _models(teacher_softmax=True)  # the same initial weights each time
        d = dg2pf_tf.Distiller(s, t, temperature=3.0, alpha=0.6)
        d.compile(optimizer=keras.optimizers.SGD(0.5))
        history = d.fit(x, y, sample_weight=w, batch_size=16, epochs=2, shuffle=False, verbose=0)
        return s.get_weights(), history.history["loss"]

    x2, y2 = x.copy(), y.copy()
    x2[[3, 10]], y2[[3, 10]] = 100.0 * rng.normal(size=(2, 6)), [1, 2]
    (weights, losses), (weights2, losses2) = trained(x, y), trained(x2, y2)
    assert losses2 == pytest.approx(losses, rel=1e-6)
    for a, b in zip(weights, weights2):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    w[3] = 1.0  # and with a weight, the same change of example 3 counts
    assert not np.allclose(trained(x, y)[0][0], trained(x2, y2)[0][0])


def test_config_and_keras_file_round_trips_keep_the_settings_and_the_loss(tmp_path):
    student, teacher = _models()
    distiller = dg2pf_tf.Distiller(student, teacher, temperature=2.5, alpha=0.3, from_logits=True,
                                   task="binary", name="kd")
    config = distiller.get_config()
    assert {k: config[k] for k in ("name", "temperature", "alpha", "from_logits", "task")} == {
        "name": "kd", "temperature": 2.5, "alpha": 0.3, "from_logits": True, "task": "binary"}
    copy = dg2pf_tf.Distiller.from_config(json.loads(json.dumps(config)))
    assert (copy.name, copy.temperature, copy.alpha, copy.from_logits) == ("kd", 2.5, 0.3, True)
    assert copy.task == dg2pf_tf.tasks.Binary() and copy.teacher.trainable is False
    assert [l.get_config()["units"] for l in copy.student.layers] == [4]
    assert copy.teacher.layers[0].name == "t"

    x = np.random.default_rng(3).normal(size=(8, 6)).astype("float32")
    y = (np.random.default_rng(4).uniform(size=(8, 4)) > 0.5).astype("float32")  # multi-label
    distiller.compile(optimizer=keras.optimizers.SGD(0.05))
    expected = float(distiller.compute_loss(x, y, distiller(x)))
    path = tmp_path / "distiller.keras"
    distiller.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "compile() was not called" from Keras
        loaded = keras.models.load_model(path)
    assert loaded.compiled and float(loaded.optimizer.learning_rate) == pytest.approx(0.05)
    assert isinstance(loaded, dg2pf_tf.Distiller) and loaded.task == dg2pf_tf.tasks.Binary()
    assert (loaded.temperature, loaded.alpha, loaded.from_logits) == (2.5, 0.3, True)
    assert float(loaded.compute_loss(x, y, loaded(x))) == pytest.approx(expected, rel=1e-6)
    assert loaded.teacher.trainable is False


def test_bad_arguments_are_refused():
    student, teacher = _models()
    with pytest.raises(ValueError, match="temperature"):
        dg2pf_tf.Distiller(student, teacher, temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        dg2pf_tf.Distiller(student, teacher, alpha=1.5)
    with pytest.raises(TypeError, match="student"):
        dg2pf_tf.Distiller("model", teacher)
    with pytest.raises(ValueError, match="own loss"):
        dg2pf_tf.Distiller(student, teacher).compile("sgd", loss="mse")


TWO_REPLICAS = r"""
import json, sys
import tensorflow as tf
n = int(sys.argv[1]) if len(sys.argv) > 1 else 1
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np, dg2pf_tf
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"][:REPLICAS])
x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
y = np.arange(32) % 4
keras.utils.set_random_seed(1)
with strategy.scope():
    student = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    teacher = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    d = dg2pf_tf.Distiller(student, teacher)
    d.compile(optimizer=keras.optimizers.SGD(0.5))
h = d.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), epochs=1, verbose=0, shuffle=False)
print(json.dumps({"loss": h.history["loss"][0], "w": student.get_weights()[0].tolist(),
                  "replicas": strategy.num_replicas_in_sync}))
"""


@pytest.mark.slow
def test_one_and_two_replicas_give_the_same_loss_and_update():
    one = json.loads(run_python(TWO_REPLICAS.replace("REPLICAS", "1")).strip().splitlines()[-1])
    two = json.loads(run_python(TWO_REPLICAS.replace("REPLICAS", "2")).strip().splitlines()[-1])
    assert (one["replicas"], two["replicas"]) == (1, 2)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    np.testing.assert_allclose(two["w"], one["w"], rtol=1e-5, atol=1e-6)
