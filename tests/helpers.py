"""Helpers the tests share: small real models, and fresh interpreters for distribution."""

import os
import subprocess
import sys

import keras
import numpy as np

import dg2pf_tf

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


def randomized(model, seed=0):
    """`model` with its vectors (biases, BatchNorm parameters and statistics)
    random too, not the initial 0s and 1s, so that no removed channel would
    happen to contribute nothing; kernels keep their random initial values."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        if len(v.shape) == 1:
            positive = any(k in v.path for k in ("variance", "gamma"))
            value = rng.uniform(0.5, 1.5, v.shape) if positive else rng.normal(0, 0.1, v.shape)
            v.assign(value.astype(v.dtype))
    return model


def live_activations(model, images):
    """`model`, a random-weight network, rescaled so that its outputs depend on its inputs.

    With their initial statistics BatchNorm layers pass on whatever scale
    reaches them, and Glorot-initialised layers shrink it at every ReLU: a
    random MobileNetV2's logits differ by 1e-8 between images (they are its
    classifier's bias) and a random VGG16's by 1e-4, so no comparison of
    outputs would see a wrong weight inside. BatchNorm statistics are
    re-estimated on `images`; a network without normalization layers gets
    each kernel (and bias) scaled to a unit spread of its layer's outputs on
    them, in order (LSUV initialisation, Mishkin & Matas 2016); one with
    LayerNormalization (ConvNeXt) keeps its scale already.
    """
    normalized = any(isinstance(l, (keras.layers.LayerNormalization, keras.layers.GroupNormalization))
                     for l in model.layers)
    if dg2pf_tf.reestimate_batchnorm(model, [images]) or normalized:
        return model
    for layer in model.layers:
        if getattr(layer, "kernel", None) is None:
            continue
        spread = float(np.std(keras.Model(model.inputs, layer.output)(images)))
        for weight in (layer.kernel, getattr(layer, "bias", None)):
            if weight is not None:
                weight.assign(weight / spread)
    return model


def assert_same_outputs(a, b, x):
    ya, yb = a.predict(x, verbose=0), b.predict(x, verbose=0)
    scale = max(1.0, float(np.max(np.abs(ya))))
    np.testing.assert_allclose(yb, ya, atol=1e-5 * scale, rtol=0)


def gated_cnn():
    """Residual add, depthwise, a concatenation gated squeeze-and-excitation
    style, a one-channel spatial gate, Flatten into Dense."""
    x = keras.Input((8, 8, 3), name="image")
    a = keras.layers.Conv2D(8, 3, padding="same", name="stem")(x)
    a = keras.layers.ReLU()(keras.layers.BatchNormalization(name="stem_bn")(a))
    b = keras.layers.BatchNormalization(name="branch_bn")(keras.layers.Conv2D(8, 1, name="branch")(a))
    c = keras.layers.Activation("relu")(keras.layers.Add(name="add")([a, b]))
    d = keras.layers.Conv2D(4, 1, name="widen")(keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(c))
    cat = keras.layers.Concatenate(name="cat")([c, d])
    gate = keras.layers.GlobalAveragePooling2D(keepdims=True)(cat)
    gate = keras.layers.Conv2D(3, 1, activation="relu", name="se_reduce")(gate)
    gate = keras.layers.Conv2D(12, 1, activation="sigmoid", name="se_expand")(gate)
    y = keras.layers.Multiply(name="se")([cat, gate])
    y = keras.layers.Multiply(name="spatial")([y, keras.layers.Conv2D(1, 1, activation="sigmoid", name="where")(y)])
    y = keras.layers.Flatten()(keras.layers.MaxPooling2D()(y))
    y = keras.layers.Dense(16, activation="relu", name="hidden")(y)
    return keras.Model(x, keras.layers.Dense(5, name="logits")(y))


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


def tiny_cnn(input_shape=(8, 8, 1), classes=10):
    """Two convolutions with BatchNorm, a residual add, global pooling and a
    linear head: the model of the fixtures in tests/fixtures/legacy."""
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv1")(inputs)
    x = keras.layers.ReLU(name="relu1")(keras.layers.BatchNormalization(name="bn1")(x))
    y = keras.layers.Conv2D(8, 3, padding="same", name="conv2")(x)
    x = keras.layers.Add(name="add")([x, keras.layers.BatchNormalization(name="bn2")(y)])
    x = keras.layers.Conv2D(16, 1, name="conv3")(keras.layers.ReLU(name="relu2")(x))
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(classes, name="logits")(x), name="tiny_cnn")
