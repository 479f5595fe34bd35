"""Helpers the tests share: small real models, and fresh interpreters for distribution."""

import os
import subprocess
import sys

import keras
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def residual_cnn(input_shape=(8, 8, 1), classes=10):
    """A functional CNN with a residual add, a concatenation and BatchNorm."""
    inputs = keras.Input(input_shape, name="pixels")
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    y = keras.layers.SeparableConv2D(8, 3, padding="same", name="sep")(x)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.BatchNormalization(name="bn")(x)
    z = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.Concatenate(name="cat")([x, z])
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(classes, name="fc")(x)
    return keras.Model(inputs, outputs, name="residual_cnn")


def mlp(inputs=16, hidden=32, classes=4):
    return keras.Sequential(
        [
            keras.Input((inputs,)),
            keras.layers.Dense(hidden, activation="relu", name="hidden"),
            keras.layers.Dense(classes, name="out"),
        ],
        name="mlp",
    )


# Put first in a fresh interpreter's code: splits the CPU into two logical
# devices (before any TensorFlow op) and makes `strategy` mirror over them.
TWO_CPUS = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
"""


def replicas_agree(pruned):
    """True if every replica of `pruned` (a PrunedModel) holds the same masks and
    weights, with masked weights 0 where the masks are hard (for the
    subprocesses run under `TWO_CPUS`)."""
    hard = float(pruned.hard.numpy()) == 1.0
    for mask, kernel in zip(pruned.masks, pruned.targets):
        masks = [v.numpy() for v in mask.value.values]
        kernels = [v.numpy() for v in kernel.value.values]
        if len(masks) != 2 or not all(np.array_equal(masks[0], m) for m in masks):
            return False
        if not all(np.array_equal(kernels[0], k) for k in kernels):
            return False
        if hard and (kernels[0][masks[0] == 0] != 0).any():
            return False
    return True


def run_python(code, env=None, timeout=300):
    """Runs `code` in a fresh interpreter (own TF runtime); returns its stdout."""
    full_env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT,
    )
    if done.returncode != 0:
        raise AssertionError(f"subprocess failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout
