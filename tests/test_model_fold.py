"""BatchNormalization folded into the linear layer before it: same outputs, fewer layers."""

import keras
import numpy as np
import pytest

import dg2pf_tf
from dg2pf_tf.model.fold import fold_batchnorm
from helpers import live_activations

L = keras.layers


def _with_statistics(model, rng):
    """Gives every BatchNormalization non-trivial parameters and statistics."""
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            for weight, low, high in zip(layer.weights, (0.5, -1, -1, 0.2), (2, 1, 1, 3)):
                weight.assign(rng.uniform(low, high, weight.shape).astype("float32"))
    return model


def _relative_gap(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


def _mixed_net():
    inputs = keras.Input((12, 12, 3))
    a = L.BatchNormalization(name="bn_conv")(L.Conv2D(8, 3, use_bias=False, name="conv")(inputs))
    b = L.BatchNormalization(name="bn_depthwise")(L.DepthwiseConv2D(3, depth_multiplier=2, name="depthwise")(a))
    c = L.BatchNormalization(name="bn_separable")(L.SeparableConv2D(6, 3, padding="same", name="separable")(b))
    # Not folded: an activation between, a second reader, channels on another axis.
    d = L.BatchNormalization(name="bn_after_relu")(L.Conv2D(6, 1, activation="relu", name="relu_conv")(c))
    shared = L.Conv2D(6, 1, name="shared")(d)
    e = L.Add()([L.BatchNormalization(name="bn_shared")(shared), shared])
    f = L.BatchNormalization(axis=1, name="bn_axis1")(L.Conv2D(6, 1, name="conv_axis1")(e))
    pooled = L.GlobalAveragePooling2D()(f)
    outputs = L.BatchNormalization(name="bn_dense")(L.Dense(5, name="dense")(pooled))
    return keras.Model(inputs, outputs)


def test_each_foldable_pair_folds_and_the_outputs_stay():
    rng = np.random.default_rng(0)
    model = _with_statistics(_mixed_net(), rng)
    x = rng.normal(size=(4, 12, 12, 3)).astype("float32")
    folded, count = fold_batchnorm(model)
    kinds = {layer.name: type(layer) for layer in folded.layers}
    assert count == 4
    for name in ("bn_conv", "bn_depthwise", "bn_separable", "bn_dense"):
        assert kinds[name] is L.Identity, name
    for name in ("bn_after_relu", "bn_shared", "bn_axis1"):
        assert kinds[name] is L.BatchNormalization, name
    assert folded.get_layer("conv").use_bias and not model.get_layer("conv").use_bias
    assert _relative_gap(model(x, training=False), folded(x, training=False)) < 1e-5


def test_a_folded_model_saves_and_loads_as_plain_keras(tmp_path):
    rng = np.random.default_rng(1)
    model = _with_statistics(_mixed_net(), rng)
    folded, _ = fold_batchnorm(model)
    folded.save(tmp_path / "folded.keras")
    loaded = keras.models.load_model(tmp_path / "folded.keras")
    x = rng.normal(size=(2, 12, 12, 3)).astype("float32")
    np.testing.assert_array_equal(loaded(x), folded(x))


def test_a_sequential_model_folds():
    rng = np.random.default_rng(2)
    model = _with_statistics(keras.Sequential([
        keras.Input((6,)), L.Dense(8), L.BatchNormalization(), L.ReLU(), L.Dense(3), L.BatchNormalization()]), rng)
    folded, count = fold_batchnorm(model)
    x = rng.normal(size=(5, 6)).astype("float32")
    assert count == 2
    assert not any(isinstance(layer, L.BatchNormalization) for layer in folded.layers)
    assert _relative_gap(model(x), folded(x)) < 1e-5


@pytest.mark.parametrize("name, expected", [("ResNet50", 53), ("ResNet50V2", 32), ("MobileNetV2", 52)])
def test_keras_applications_fold_every_batchnorm_after_a_linear_layer(name, expected):
    # ResNet50V2's pre-activation BatchNorms read an Add or a pooling, not a convolution.
    rng = np.random.default_rng(3)
    model = getattr(keras.applications, name)(input_shape=(32, 32, 3), weights=None, classes=10,
                                               classifier_activation=None)
    live_activations(model, rng.normal(size=(16, 32, 32, 3)).astype("float32"))
    folded, count = fold_batchnorm(model)
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    assert count == expected
    # Each fold rounds differently from the layer pair it replaces; over 50 layers
    # of a random-weight network the differences add up to about 1e-4.
    assert _relative_gap(model(x, training=False), folded(x, training=False)) < 3e-4


def test_shrink_folds_on_request():
    rng = np.random.default_rng(4)
    model = _with_statistics(_mixed_net(), rng)
    pruned = dg2pf_tf.prune(model, structure="channel")
    dg2pf_tf.update_masks(pruned, 0.3)
    dg2pf_tf.finalize(pruned)
    x = rng.normal(size=(3, 12, 12, 3)).astype("float32")
    plain, folded = dg2pf_tf.shrink(pruned), dg2pf_tf.shrink(pruned, fold_batchnorm=True)
    assert plain.count_params() < model.count_params()
    assert sum(isinstance(layer, L.BatchNormalization) for layer in folded.layers) == 3
    assert _relative_gap(plain(x, training=False), folded(x, training=False)) < 1e-5


def test_export_folds_the_saved_model_on_request(tmp_path):
    import tensorflow as tf

    rng = np.random.default_rng(5)
    model = _with_statistics(_mixed_net(), rng)
    x = rng.normal(size=(3, 12, 12, 3)).astype("float32")
    report = dg2pf_tf.export(model, tmp_path / "out", fold_batchnorm=True, verbose=0)
    loaded = tf.saved_model.load(str(tmp_path / "out" / "saved_model"))
    assert _relative_gap(model(x, training=False), loaded.serve(x)) < 1e-5
    folded, _ = fold_batchnorm(model)  # four BatchNorms (4 weights a channel) fewer, one bias more
    assert report["params_total"] == folded.count_params() < model.count_params()
