import csv

import keras
import numpy as np
import pytest

import dg2pf_tf
from helpers import mlp


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(64, 16)).astype("float32"), rng.integers(0, 4, 64)


def _compiled(model):
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_update_masks_follows_the_schedule_travelling_with_the_model(data, tmp_path):
    pruned = _compiled(dg2pf_tf.prune(mlp(), sparsity=0.9, pruning_epochs=4))
    log = tmp_path / "log.csv"
    history = pruned.fit(
        *data, epochs=6, verbose=0,
        callbacks=[dg2pf_tf.UpdateMasks(), keras.callbacks.CSVLogger(str(log))],
    )
    n = 16 * 32 + 32 * 4
    expected = [round(0.9 * i / 4 * n) / n for i in (1, 2, 3, 4, 4, 4)]
    assert history.history["sparsity"] == expected
    with open(log) as f:
        rows = list(csv.DictReader(f))
    np.testing.assert_allclose([float(r["sparsity"]) for r in rows], expected)


def test_masks_are_frozen_after_the_schedule_window(data):
    pruned = _compiled(dg2pf_tf.prune(mlp(), sparsity=0.5, pruning_epochs=2))
    update = dg2pf_tf.UpdateMasks()
    pruned.fit(*data, epochs=2, verbose=0, callbacks=[update])
    masks = [m.numpy().copy() for m in pruned.masks]
    pruned.fit(*data, epochs=5, initial_epoch=2, verbose=0, callbacks=[update])
    for before, mask in zip(masks, pruned.masks):
        np.testing.assert_array_equal(before, mask.numpy())


def test_step_updates_raise_sparsity_within_an_epoch(data):
    pruned = _compiled(dg2pf_tf.prune(mlp(), sparsity=0.8, pruning_epochs=2))
    levels = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            levels.append(update.level)

    update = dg2pf_tf.UpdateMasks(every_n_steps=2)
    pruned.fit(*data, epochs=2, batch_size=8, verbose=0, callbacks=[update, Record()])
    # 8 steps an epoch, updates every 2: the linear ramp reaches 0.8 at the
    # start of the last pruning epoch, as the per-epoch schedule does.
    assert levels == [0.4, 0.4, 0.5, 0.5, 0.6, 0.6, 0.7, 0.7] + [0.8] * 8


def test_explicit_schedule_overrides_the_models(data):
    pruned = _compiled(dg2pf_tf.prune(mlp(), sparsity=0.9, pruning_epochs=4))
    update = dg2pf_tf.UpdateMasks(dg2pf_tf.schedules.Constant(0.25), scope="layer")
    history = pruned.fit(*data, epochs=1, verbose=0, callbacks=[update])
    assert history.history["sparsity"] == [pytest.approx(0.25, abs=1e-3)]


def test_update_masks_on_a_model_that_was_never_pruned_says_what_to_do(data):
    model = _compiled(mlp())
    with pytest.raises(ValueError, match=r"no pruned weights.*dg2pf_tf.prune"):
        model.fit(*data, epochs=1, verbose=0, callbacks=[dg2pf_tf.UpdateMasks()])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"schedule": 0.9}, TypeError,
         r"`schedule` must be a dg2pf_tf.schedules object \(Linear, Polynomial, Constant\), got 0.9\."),
        ({"every_n_steps": 0}, ValueError, r"`every_n_steps` must be None or an int >= 1, got 0\."),
        ({"every_n_steps": 2.0}, ValueError, r"`every_n_steps` must be None or an int >= 1, got 2.0\."),
        ({"scope": "x"}, ValueError, r"`scope` must be one of \('global', 'layer'\).*Got 'x'\."),
    ],
)
def test_bad_callback_arguments_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        dg2pf_tf.UpdateMasks(**kwargs)
