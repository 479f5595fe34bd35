import keras
import numpy as np
import pytest

import dg2pf_tf
from conftest import mlp, residual_cnn

PRUNABLE = {"stem", "sep", "dw", "fc"}


def _wrapped_names(model):
    return {l.name for l in model._flatten_layers() if isinstance(l, dg2pf_tf.PruneWrapper)}


def test_prune_wraps_every_prunable_kernel_and_keeps_names_and_outputs(images):
    model = residual_cnn()
    pruned = dg2pf_tf.prune(model)
    assert _wrapped_names(pruned) == PRUNABLE
    assert [l.name for l in pruned.layers] == [l.name for l in model.layers]
    assert pruned.get_layer("sep").kernel_names == ("depthwise_kernel", "pointwise_kernel")
    assert not isinstance(pruned.get_layer("bn"), dg2pf_tf.PruneWrapper)
    np.testing.assert_array_equal(pruned(images[0]), model(images[0]))


def test_prune_never_modifies_the_original_model(images):
    model = residual_cnn()
    before = [w.numpy().copy() for w in model.weights]
    pruned = dg2pf_tf.prune(model, 0.9)
    dg2pf_tf.update_masks(pruned, 0.9)
    pruned.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruned.fit(*images, epochs=1, verbose=0)
    assert all(np.array_equal(b, w.numpy()) for b, w in zip(before, model.weights))
    assert not _wrapped_names(model)


def test_update_masks_sets_exact_global_sparsity_and_strip_matches(images):
    pruned = dg2pf_tf.prune(residual_cnn())
    realised = dg2pf_tf.update_masks(pruned, 0.75)
    summary = dg2pf_tf.sparsity_summary(pruned)
    assert summary.prunable_zeros == round(0.75 * summary.prunable_weights)
    assert realised == summary.prunable_sparsity
    stripped = dg2pf_tf.strip(pruned)
    assert not _wrapped_names(stripped)
    assert [l.name for l in stripped.layers] == [l.name for l in pruned.layers]
    np.testing.assert_array_equal(stripped(images[0]), pruned(images[0]))
    assert dg2pf_tf.sparsity_summary(stripped).to_dict() == summary.to_dict()


def test_layer_scope_prunes_every_kernel_to_the_level():
    pruned = dg2pf_tf.prune(residual_cnn(), scope="layer")
    dg2pf_tf.update_masks(pruned, 0.5, scope="layer")
    for row in dg2pf_tf.sparsity_summary(pruned).rows:
        assert row.zeros == round(0.5 * row.weights), row


def test_exclude_by_name_and_by_predicate_keeps_layers_dense():
    model = residual_cnn()
    by_name = dg2pf_tf.prune(model, exclude=["stem", "fc"])
    assert _wrapped_names(by_name) == {"sep", "dw"}
    by_type = dg2pf_tf.prune(model, exclude=lambda l: isinstance(l, keras.layers.Dense))
    assert _wrapped_names(by_type) == PRUNABLE - {"fc"}


def test_nested_backbone_inside_sequential_is_pruned():
    backbone = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None
    )
    model = keras.Sequential(
        [keras.Input((32, 32, 3)), backbone, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    )
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    pruned = dg2pf_tf.prune(model, exclude=["Conv1"])
    wrapped = _wrapped_names(pruned)
    assert "block_16_project" in wrapped and "Conv1" not in wrapped
    np.testing.assert_allclose(pruned(x), model(x), atol=1e-6)
    dg2pf_tf.update_masks(pruned, 0.9)
    np.testing.assert_allclose(dg2pf_tf.strip(pruned)(x), pruned(x), atol=1e-6)


@pytest.mark.parametrize(
    "build",
    [
        lambda: keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10),
        lambda: keras.applications.ResNet50(input_shape=(32, 32, 3), weights=None, classes=10),
    ],
    ids=["mobilenet_v2", "resnet50"],
)
def test_keras_applications_prune_and_strip(build):
    model = build()
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    pruned = dg2pf_tf.prune(model)
    np.testing.assert_allclose(pruned(x), model(x), atol=1e-6)
    dg2pf_tf.update_masks(pruned, 0.9)
    summary = dg2pf_tf.sparsity_summary(pruned)
    assert summary.prunable_zeros == round(0.9 * summary.prunable_weights)
    assert 0.8 < summary.total_sparsity < summary.prunable_sparsity
    np.testing.assert_allclose(dg2pf_tf.strip(pruned)(x), pruned(x), atol=1e-5)


def test_finalize_zeroes_masked_weights_in_place():
    pruned = dg2pf_tf.prune(mlp())
    dg2pf_tf.update_masks(pruned, 0.5)
    hidden = pruned.get_layer("hidden")
    assert np.count_nonzero(hidden.layer.kernel.numpy()) == hidden.layer.kernel.numpy().size
    assert dg2pf_tf.finalize(pruned) is pruned
    np.testing.assert_array_equal(hidden.layer.kernel.numpy() == 0, hidden.masks[0].numpy() == 0)


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.fc = keras.layers.Dense(3)

    def call(self, x):
        return self.fc(x)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: dg2pf_tf.prune(m, sparsity=1.0), ValueError, r"\[0, 1\)"),
        (lambda m: dg2pf_tf.prune(m, sparsity=-0.5), ValueError, r"\[0, 1\)"),
        (lambda m: dg2pf_tf.prune(m, pruning_epochs=0), ValueError, "pruning_epochs"),
        (lambda m: dg2pf_tf.prune(m, scope="row"), ValueError, "scope"),
        (lambda m: dg2pf_tf.prune(m, exclude=["hiden"]), ValueError, "hiden.*summary"),
        (lambda m: dg2pf_tf.prune(m, exclude=[3]), TypeError, "exclude"),
        (lambda m: dg2pf_tf.prune(m, exclude=["hidden", "out"]), ValueError, "no prunable layer"),
        (lambda m: dg2pf_tf.prune(m, schedule="linear"), TypeError, "schedule"),
        (lambda m: dg2pf_tf.prune(dg2pf_tf.prune(m)), ValueError, "already pruned"),
        (lambda m: dg2pf_tf.finalize(m), ValueError, "no pruned layers"),
        (lambda m: dg2pf_tf.update_masks(m, 0.5), ValueError, "no pruned layers"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(call, error, match):
    model = mlp()
    with pytest.raises(error, match=match):
        call(model)


def test_model_without_prunable_layers_is_refused():
    model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
    with pytest.raises(ValueError, match="no prunable layer"):
        dg2pf_tf.prune(model)


def test_subclassed_model_is_refused_with_what_to_do():
    model = _Subclassed()
    model(np.zeros((1, 4), "float32"))
    with pytest.raises(TypeError, match="subclassed.*PruneWrapper"):
        dg2pf_tf.prune(model)
    with pytest.raises(TypeError, match="wrapper.strip"):
        dg2pf_tf.strip(model)


def test_custom_layer_hiding_a_dense_layer_is_warned_about():
    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.inner = keras.layers.Dense(4)

        def call(self, x):
            return self.inner(x)

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(Block(name="block")(inputs)))
    with pytest.warns(UserWarning, match="block"):
        dg2pf_tf.prune(model)
