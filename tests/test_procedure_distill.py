"""Distiller: the KD loss value, frozen teacher, label formats, replica scaling."""

import json

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
