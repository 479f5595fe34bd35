import keras
import numpy as np
import pytest

import dg2pf_tf
from helpers import mlp, residual_cnn

PRUNABLE = {"stem", "sep", "dw", "fc"}


def _pruned_layers(pruned):
    return {r.layer for r in dg2pf_tf.sparsity_summary(pruned).rows if r.pruned}


def test_prune_masks_every_prunable_kernel_and_keeps_names_and_outputs(images):
    model = residual_cnn()
    pruned = dg2pf_tf.prune(model)
    assert isinstance(pruned, dg2pf_tf.PrunedModel) and pruned.name == model.name
    assert _pruned_layers(pruned) == PRUNABLE
    assert [l.name for l in pruned.model.layers] == [l.name for l in model.layers]
    sep = pruned.model.get_layer("sep")
    assert {v.path for v in pruned.targets} >= {sep.depthwise_kernel.path, sep.pointwise_kernel.path}
    np.testing.assert_array_equal(pruned(images[0]), model(images[0]))


def test_prune_never_modifies_the_original_model(images):
    model = residual_cnn()
    before = [w.numpy().copy() for w in model.weights]
    pruned = dg2pf_tf.prune(model, 0.9)
    dg2pf_tf.update_masks(pruned, 0.9)
    pruned.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruned.fit(*images, epochs=1, verbose=0)
    assert all(np.array_equal(b, w.numpy()) for b, w in zip(before, model.weights))
    assert not dg2pf_tf.core.masking.pruned_models(model)


def test_update_masks_sets_exact_global_sparsity_and_strip_agrees(images):
    pruned = dg2pf_tf.prune(residual_cnn())
    realised = dg2pf_tf.update_masks(pruned, 0.75)
    summary = dg2pf_tf.sparsity_summary(pruned)
    assert summary.prunable_zeros == round(0.75 * summary.prunable_weights)
    assert realised == summary.prunable_sparsity == summary.pruned_sparsity
    stripped = dg2pf_tf.strip(pruned)
    assert not dg2pf_tf.core.masking.pruned_models(stripped)
    assert [l.name for l in stripped.layers] == [l.name for l in pruned.model.layers]
    np.testing.assert_array_equal(stripped(images[0]), pruned(images[0]))
    plain = dg2pf_tf.sparsity_summary(stripped)
    assert [(r.path, r.zeros) for r in plain.rows] == [(r.path, r.zeros) for r in summary.rows]
    assert (plain.prunable_sparsity, plain.total_params, plain.total_zeros) == (
        summary.prunable_sparsity, summary.total_params, summary.total_zeros)


def test_layer_scope_prunes_every_kernel_to_the_level():
    pruned = dg2pf_tf.prune(residual_cnn(), scope="layer")
    dg2pf_tf.update_masks(pruned, 0.5, scope="layer")
    for row in dg2pf_tf.sparsity_summary(pruned).rows:
        assert row.zeros == round(0.5 * row.weights), row


def test_exclude_by_name_and_by_predicate_keeps_layers_dense_and_says_so():
    model = residual_cnn()
    by_name = dg2pf_tf.prune(model, exclude=["stem", "fc"])
    assert _pruned_layers(by_name) == {"sep", "dw"}
    dg2pf_tf.update_masks(by_name, 0.5)
    summary = dg2pf_tf.sparsity_summary(by_name)
    assert summary.dense_by_choice == 8 * 9 + 16 * 10
    # Under masks: sep's depthwise 3*3*8 and pointwise 8*8, dw's 3*3*8; half of 208.
    assert summary.pruned_weights == 72 + 64 + 72
    assert sum(r.zeros for r in summary.rows if r.pruned) == 104
    assert summary.prunable_sparsity < summary.pruned_sparsity
    by_type = dg2pf_tf.prune(model, exclude=lambda l: isinstance(l, keras.layers.Dense))
    assert _pruned_layers(by_type) == PRUNABLE - {"fc"}


def test_exclude_reaches_layers_inside_attention_and_refuses_unknown_names():
    inputs = keras.Input((6, 8))
    attention = keras.layers.MultiHeadAttention(2, 4, name="mha")
    model = keras.Model(inputs, attention(inputs, inputs))
    pruned = dg2pf_tf.prune(model, exclude=["query"])
    assert _pruned_layers(pruned) == {"key", "value", "attention_output"}
    with pytest.raises(ValueError, match="quary.*query"):
        dg2pf_tf.prune(model, exclude=["quary"])


def test_functional_graph_with_ops_is_pruned_and_stripped():
    inputs = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(8, name="d1")(inputs) + 1.0
    outputs = keras.layers.Dense(3, name="d2")(keras.ops.relu(hidden) * 2.0)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    pruned = dg2pf_tf.prune(model)
    np.testing.assert_allclose(pruned(x), model(x), atol=1e-6)
    dg2pf_tf.update_masks(pruned, 0.5)
    stripped = dg2pf_tf.strip(pruned)
    np.testing.assert_array_equal(stripped(x), pruned(x))
    assert dg2pf_tf.sparsity_summary(stripped).prunable_zeros == round(0.5 * (4 * 8 + 8 * 3))


@pytest.mark.slow
def test_nested_backbone_inside_sequential_is_pruned():
    backbone = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None)
    model = keras.Sequential(
        [keras.Input((32, 32, 3)), backbone, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)])
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    pruned = dg2pf_tf.prune(model, exclude=["Conv1"])
    masked = _pruned_layers(pruned)
    assert "block_16_project" in masked and "Conv1" not in masked
    np.testing.assert_allclose(pruned(x), model(x), atol=1e-6)
    dg2pf_tf.update_masks(pruned, 0.9)
    np.testing.assert_allclose(dg2pf_tf.strip(pruned)(x), pruned(x), atol=1e-6)


def test_a_pruned_model_inside_another_model_trains_and_strips():
    backbone = dg2pf_tf.prune(mlp(), 0.5, 1)
    inputs = keras.Input((16,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(backbone(inputs)))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 16)).astype("float32"), rng.integers(0, 2, 32)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, verbose=0, callbacks=[dg2pf_tf.UpdateMasks()])
    summary = dg2pf_tf.sparsity_summary(model)
    assert summary.pruned_weights == 16 * 32 + 32 * 4
    assert sum(r.zeros for r in summary.rows if r.pruned) == 320  # round(0.5 * 640)
    stripped = dg2pf_tf.strip(model)
    assert not dg2pf_tf.core.masking.pruned_models(stripped)
    np.testing.assert_array_equal(stripped(x), model(x))


@pytest.mark.slow
def test_defaults_match_run_and_the_floor_keeps_every_kernel_alive():
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10)
    pruned = dg2pf_tf.prune(model)
    assert pruned.floor == 1.0
    dg2pf_tf.update_masks(pruned, 0.95)
    assert dg2pf_tf.sparsity_summary(pruned).dead == ()
    dg2pf_tf.update_masks(pruned, 0.95, floor=0.0)
    summary = dg2pf_tf.sparsity_summary(pruned)
    assert summary.dead and "entirely zero" in str(summary)


def test_finalize_zeroes_masked_weights_in_place():
    pruned = dg2pf_tf.prune(mlp())
    dg2pf_tf.update_masks(pruned, 0.5)
    kernel = pruned.model.get_layer("hidden").kernel
    assert np.count_nonzero(kernel.numpy()) == kernel.numpy().size
    assert dg2pf_tf.finalize(pruned) is pruned
    mask = pruned.masks[[v.path for v in pruned.targets].index(kernel.path)]
    np.testing.assert_array_equal(kernel.numpy() == 0, mask.numpy() == 0)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: dg2pf_tf.prune(m, sparsity=1.0), ValueError, r"\[0, 1\)"),
        (lambda m: dg2pf_tf.prune(m, sparsity=-0.5), ValueError, r"\[0, 1\)"),
        (lambda m: dg2pf_tf.prune(m, pruning_epochs=0), ValueError, "pruning_epochs"),
        (lambda m: dg2pf_tf.prune(m, scope="row"), ValueError, "scope"),
        (lambda m: dg2pf_tf.prune(m, floor=2), ValueError, "floor"),
        (lambda m: dg2pf_tf.prune(m, exclude=["hiden"]), ValueError, "hiden.*hidden"),
        (lambda m: dg2pf_tf.prune(m, exclude=[3]), TypeError, "exclude"),
        (lambda m: dg2pf_tf.prune(m, exclude=["hidden", "out"]), ValueError, "no prunable weight"),
        (lambda m: dg2pf_tf.prune(m, schedule="linear"), TypeError, "schedule"),
        (lambda m: dg2pf_tf.prune(dg2pf_tf.prune(m)), ValueError, "already pruned"),
        (lambda m: dg2pf_tf.prune(keras.layers.Dense(3)), TypeError, "Keras model"),
        (lambda m: dg2pf_tf.finalize(m), ValueError, "no pruned weights"),
        (lambda m: dg2pf_tf.update_masks(m, 0.5), ValueError, "no pruned weights"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(call, error, match):
    with pytest.raises(error, match=match):
        call(mlp())


def test_unbuilt_model_and_model_without_prunable_weights_are_refused():
    with pytest.raises(ValueError, match="not built"):
        dg2pf_tf.prune(keras.Sequential([keras.layers.Dense(3)]))
    model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
    with pytest.raises(ValueError, match="no prunable weight"):
        dg2pf_tf.prune(model)


class Gate(keras.layers.Layer):
    """A user's layer whose weight is not called `kernel`."""

    def __init__(self, declare=True, **kwargs):
        super().__init__(**kwargs)
        self.declare = declare

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], 6), name="w")

    def call(self, x):
        return keras.ops.matmul(x, self.w)

    def get_config(self):
        return {**super().get_config(), "declare": self.declare}


class DeclaredGate(Gate):
    def get_prunable_weights(self):
        return [self.w]


def test_own_layers_offer_weights_by_get_prunable_weights_or_are_warned_about():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(5, name="dense")(inputs)
    plain = keras.Model(inputs, Gate(name="gate")(hidden))
    with pytest.warns(UserWarning, match="gate/w.*get_prunable_weights"):
        pruned = dg2pf_tf.prune(plain)
    assert _pruned_layers(pruned) == {"dense"}
    declared = keras.Model(inputs, DeclaredGate(name="gate")(hidden))
    pruned = dg2pf_tf.prune(declared)
    assert _pruned_layers(pruned) == {"dense", "gate"}
    dg2pf_tf.update_masks(pruned, 0.5)
    x = np.ones((2, 4), "float32")
    np.testing.assert_array_equal(dg2pf_tf.strip(pruned)(x), pruned(x))
