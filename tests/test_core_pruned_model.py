"""PrunedModel: every read of a target weight sees `weight * mask`; state, gradients,
constraints, mixed precision and `.keras` files behave as in the model it holds."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import dg2pf_tf
from helpers import mlp, residual_cnn


def _target(pruned, path):
    for variable, mask in zip(pruned.targets, pruned.masks):
        if variable.path == path:
            return variable, mask
    raise KeyError(path)


def _masked_gradient(recovery):
    pruned = dg2pf_tf.prune(mlp(), recovery=recovery)
    dg2pf_tf.update_masks(pruned, 0.6)
    kernel, mask = _target(pruned, pruned.model.get_layer("hidden").kernel.path)
    x = np.random.default_rng(0).normal(size=(8, 16)).astype("float32")
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(pruned(x) ** 2)
    return tape.gradient(loss, kernel.value).numpy()[mask.numpy() == 0]


def test_gradient_reaches_masked_weights_with_recovery_and_not_without():
    assert np.abs(_masked_gradient(recovery=True)).sum() > 0
    assert np.abs(_masked_gradient(recovery=False)).sum() == 0


def test_forward_pass_uses_masked_weights_while_weights_keep_their_values():
    pruned = dg2pf_tf.prune(mlp())
    dg2pf_tf.update_masks(pruned, 0.5)
    hidden, out = pruned.model.get_layer("hidden"), pruned.model.get_layer("out")
    (k1, m1), (k2, m2) = _target(pruned, hidden.kernel.path), _target(pruned, out.kernel.path)
    assert np.count_nonzero(k1.numpy()) == k1.numpy().size
    x = np.random.default_rng(1).normal(size=(4, 16)).astype("float32")
    h = np.maximum(x @ (k1.numpy() * m1.numpy()) + hidden.bias.numpy(), 0)
    np.testing.assert_allclose(pruned(x), h @ (k2.numpy() * m2.numpy()) + out.bias.numpy(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "optimizer",
    [lambda: keras.optimizers.SGD(0.1, momentum=0.9), lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1)],
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
    for kernel, mask in zip(pruned.targets, pruned.masks):
        assert np.all(kernel.numpy()[mask.numpy() == 0] == 0)
    summary = dg2pf_tf.sparsity_summary(pruned)
    assert summary.prunable_zeros == round(0.7 * summary.prunable_weights)


def test_users_kernel_constraint_still_applies_with_the_mask():
    # Every kernel entry starts in [-2, -1] and the data push all of them up,
    # by less than 1 in these three steps: the user's NonNeg lifts them to 0 at
    # the first step, the steps after make them positive (without NonNeg they
    # would still be negative). The mask alone keeps the pruned half at 0.
    def model():
        inputs = keras.Input((4,))
        dense = keras.layers.Dense(3, kernel_initializer=keras.initializers.RandomUniform(-2.0, -1.0),
                                   kernel_constraint=keras.constraints.NonNeg(), name="d")
        return keras.Model(inputs, dense(inputs))

    x, y = np.ones((8, 4), "float32"), np.full((8, 3), 10.0, "float32")
    plain = model()
    plain.compile(keras.optimizers.SGD(0.01), "mse")
    plain.fit(x, y, epochs=3, verbose=0)
    assert np.all(plain.get_layer("d").kernel.numpy() > 0)  # unpruned: every entry nonzero
    pruned = dg2pf_tf.prune(model(), recovery=False)
    dg2pf_tf.update_masks(pruned, 0.5)
    pruned.compile(keras.optimizers.SGD(0.01), "mse")
    pruned.fit(x, y, epochs=3, verbose=0)
    kernel, mask = (v.numpy() for v in _target(pruned, pruned.model.get_layer("d").kernel.path))
    assert np.count_nonzero(mask == 0) == 6
    assert np.all(kernel[mask == 0] == 0)
    assert np.all(kernel[mask == 1] > 0)


def test_batchnorm_statistics_and_dropout_seeds_move_through_the_mask_scope():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, name="d")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    outputs = keras.layers.Dropout(0.5, name="drop")(x)
    pruned = dg2pf_tf.prune(keras.Model(inputs, outputs))
    x = np.random.default_rng(0).normal(loc=3.0, size=(64, 6)).astype("float32")
    first, second = pruned(x, training=True), pruned(x, training=True)
    assert not np.array_equal(first, second)  # a new dropout mask each call
    moving = pruned.model.get_layer("bn").moving_mean.numpy()
    assert np.abs(moving).max() > 0  # the statistics reached the variable
    # In a compiled step too, as fit runs it.
    step = tf.function(lambda: pruned(x, training=True))
    step()
    assert not np.array_equal(moving, pruned.model.get_layer("bn").moving_mean.numpy())


def test_activity_regularization_inside_the_model_reaches_the_loss():
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(3, activity_regularizer=keras.regularizers.L2(10.0))(inputs)
    pruned = dg2pf_tf.prune(keras.Model(inputs, outputs))
    pruned(np.ones((2, 4), "float32"))
    assert len(pruned.losses) == 1 and float(pruned.losses[0]) > 0


@keras.saving.register_keras_serializable(package="dg2pf_tf_tests")
class Net(keras.Model):
    """A subclassed model nobody wrapped: prune() must reach it as it is."""

    def __init__(self, hidden=32, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(hidden, activation="relu")
        self.head = keras.layers.Dense(4)
        self.units = hidden

    def call(self, x):
        return self.head(self.hidden(x))

    def get_config(self):
        return {**super().get_config(), "hidden": self.units}


def test_subclassed_model_is_pruned_trained_and_stripped_to_its_own_class(tmp_path):
    net = Net()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 16)).astype("float32"), rng.integers(0, 4, 64)
    net(x[:1])
    pruned = dg2pf_tf.prune(net, 0.9, 3)
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = pruned.fit(x, y, epochs=3, verbose=0, callbacks=[dg2pf_tf.UpdateMasks()])
    n = 16 * 32 + 32 * 4
    assert history.history["sparsity"][-1] == round(0.9 * n) / n
    plain = dg2pf_tf.strip(pruned)
    assert type(plain) is Net
    np.testing.assert_array_equal(plain(x), pruned(x))
    pruned.save(tmp_path / "net.keras")
    loaded = keras.models.load_model(tmp_path / "net.keras")
    np.testing.assert_array_equal(loaded(x), pruned(x))


def test_subclassed_model_that_cannot_be_copied_is_refused_with_what_to_do():
    class Opaque(keras.Model):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def call(self, x):
            return self.layer(x)

    model = Opaque(keras.layers.Dense(3))
    model(np.zeros((1, 4), "float32"))
    with pytest.raises(TypeError, match="get_config"):
        dg2pf_tf.prune(model)


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
    assert loaded.schedule == dg2pf_tf.schedules.Linear(0.8, 5) and loaded.scope == "layer"
    # The loaded model keeps scope 'layer': round(0.7 * n) of each kernel, stem,
    # sep's depthwise and dw 3*3*8 = 72 (50 of each), sep's pointwise 64 (45), fc 160 (112).
    assert dg2pf_tf.update_masks(loaded, 0.7) == (3 * 50 + 45 + 112) / 440
    zeros = {(r.layer, r.kernel): r.zeros for r in dg2pf_tf.sparsity_summary(loaded).rows}
    assert zeros == {("stem", "kernel"): 50, ("sep", "depthwise_kernel"): 50, ("sep", "pointwise_kernel"): 45,
                     ("dw", "kernel"): 50, ("fc", "kernel"): 112}


def test_mixed_float16_keeps_masks_in_float32_and_computes_in_float16(images):
    keras.mixed_precision.set_global_policy("mixed_float16")
    pruned = dg2pf_tf.prune(residual_cnn())
    dg2pf_tf.update_masks(pruned, 0.8)
    assert all(m.dtype == "float32" for m in pruned.masks)
    assert all(v.dtype == "float32" for v in pruned.targets)
    assert pruned(images[0]).dtype == "float16"
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pruned.fit(*images, epochs=1, verbose=0)
    summary = dg2pf_tf.sparsity_summary(pruned)
    assert summary.prunable_zeros == round(0.8 * summary.prunable_weights)
    np.testing.assert_array_equal(dg2pf_tf.strip(pruned)(images[0]), pruned(images[0]))
