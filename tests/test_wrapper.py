import keras
import numpy as np
import pytest
import tensorflow as tf

import dg2pf_tf
from conftest import mlp, residual_cnn


def _masked_gradient(recovery):
    pruned = dg2pf_tf.prune(mlp(), recovery=recovery)
    dg2pf_tf.update_masks(pruned, 0.6)
    layer = pruned.get_layer("hidden")
    x = np.random.default_rng(0).normal(size=(8, 16)).astype("float32")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(pruned(x) ** 2)
    grad = tape.gradient(loss, layer.layer.kernel).numpy()
    return grad[layer.masks[0].numpy() == 0]


def test_gradient_reaches_masked_weights_with_recovery_and_not_without():
    assert np.abs(_masked_gradient(recovery=True)).sum() > 0
    assert np.abs(_masked_gradient(recovery=False)).sum() == 0


def test_forward_pass_uses_masked_kernel_while_weights_keep_their_values():
    pruned = dg2pf_tf.prune(mlp())
    dg2pf_tf.update_masks(pruned, 0.5)
    layer = pruned.get_layer("hidden")
    kernel, mask = layer.layer.kernel.numpy(), layer.masks[0].numpy()
    assert np.count_nonzero(kernel) == kernel.size
    x = np.random.default_rng(1).normal(size=(4, 16)).astype("float32")
    expected = np.maximum(x @ (kernel * mask) + layer.layer.bias.numpy(), 0)
    hidden = keras.Model(pruned.inputs[0], layer.output)
    np.testing.assert_allclose(hidden(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda: keras.optimizers.SGD(0.1, momentum=0.9),
        lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
    ],
    ids=["sgd_momentum", "adamw"],
)
def test_hard_masked_weights_stay_exactly_zero_through_optimizer_steps(optimizer, images):
    pruned = dg2pf_tf.prune(residual_cnn(), recovery=True)
    pruned.compile(optimizer(), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    dg2pf_tf.update_masks(pruned, 0.7)
    # Steps with recovery build momentum on masked weights; the train step is
    # traced before finalize() and must follow it.
    pruned.fit(*images, epochs=2, batch_size=8, verbose=0)
    dg2pf_tf.finalize(pruned)
    pruned.fit(*images, epochs=3, batch_size=8, verbose=0)
    for wrapper in [l for l in pruned._flatten_layers() if isinstance(l, dg2pf_tf.PruneWrapper)]:
        for kernel, mask in zip(wrapper.kernels, wrapper.masks):
            assert np.all(kernel.numpy()[mask.numpy() == 0] == 0)
    assert dg2pf_tf.sparsity_summary(pruned).prunable_zeros == round(
        0.7 * dg2pf_tf.sparsity_summary(pruned).prunable_weights
    )


def test_users_kernel_constraint_still_applies_with_the_mask():
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(3, kernel_constraint=keras.constraints.NonNeg(), name="d")
    pruned = dg2pf_tf.prune(keras.Model(inputs, dense(inputs)), recovery=False)
    dg2pf_tf.update_masks(pruned, 0.5)
    pruned.compile(keras.optimizers.SGD(1.0), "mse")
    pruned.fit(np.ones((8, 4)), -np.ones((8, 3)) * 10, epochs=2, verbose=0)
    kernel = pruned.get_layer("d").layer.kernel.numpy()
    assert kernel.min() >= 0 and np.count_nonzero(kernel) <= 6


def test_subclassed_model_with_prune_wrapper_trains_with_update_masks():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = dg2pf_tf.PruneWrapper(keras.layers.Dense(32, activation="relu"))
            self.out = dg2pf_tf.PruneWrapper(keras.layers.Dense(4))

        def call(self, x):
            return self.out(self.hidden(x))

    net = Net()
    net.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 16)).astype("float32"), rng.integers(0, 4, 64)
    update = dg2pf_tf.UpdateMasks(dg2pf_tf.schedules.Linear(0.9, 3))
    with pytest.raises(ValueError, match="not built.*model.build"):
        net.fit(x, y, epochs=1, verbose=0, callbacks=[update])
    net(x[:1])
    history = net.fit(
        x, y, epochs=3, verbose=0,
        callbacks=[dg2pf_tf.UpdateMasks(dg2pf_tf.schedules.Linear(0.9, 3))],
    )
    n = 16 * 32 + 32 * 4
    assert history.history["sparsity"][-1] == round(0.9 * n) / n
    plain = net.hidden.strip()
    assert type(plain) is keras.layers.Dense
    np.testing.assert_array_equal(plain(x), net.hidden(x))


def test_pruned_model_round_trips_through_a_keras_file(tmp_path, images):
    pruned = dg2pf_tf.prune(residual_cnn(), 0.8, 5, scope="layer")
    dg2pf_tf.update_masks(pruned, 0.6, scope="layer")
    path = tmp_path / "pruned.keras"
    pruned.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(images[0]), pruned(images[0]))
    for a, b in zip(loaded.weights, pruned.weights):
        assert a.path == b.path
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    wrapper = loaded.get_layer("fc")
    assert wrapper.schedule == dg2pf_tf.schedules.Linear(0.8, 5) and wrapper.scope == "layer"


def test_mixed_float16_keeps_masks_in_float32_and_computes_in_float16(images):
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = residual_cnn()
    pruned = dg2pf_tf.prune(model)
    dg2pf_tf.update_masks(pruned, 0.8)
    wrapper = pruned.get_layer("stem")
    assert wrapper.masks[0].dtype == "float32" and wrapper.layer.kernel.dtype == "float32"
    assert pruned(images[0]).dtype == "float16"
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruned.fit(*images, epochs=1, verbose=0)
    summary = dg2pf_tf.sparsity_summary(pruned)
    assert summary.prunable_zeros == round(0.8 * summary.prunable_weights)
    np.testing.assert_array_equal(dg2pf_tf.strip(pruned)(images[0]), pruned(images[0]))
