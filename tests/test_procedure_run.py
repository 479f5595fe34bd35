"""run(): the DG2PF phases end to end on real digits, and the ERK floor."""

import json

import keras
import numpy as np
import pytest

import dg2pf_tf
from dg2pf_tf.criteria import reference
from helpers import TWO_CPUS, run_python
from zoo.data import digits_arrays
from zoo.models import small_cnn


@pytest.fixture(scope="module")
def digits():
    return digits_arrays()


def _trained(digits, epochs=8):
    (xtr, ytr), _ = digits
    keras.utils.set_random_seed(3)
    model = small_cnn()
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(xtr, ytr, epochs=epochs, batch_size=64, verbose=0)
    return model


def test_floor_keeps_every_kernel_alive_where_global_magnitude_kills_one():
    rng = np.random.default_rng(0)
    small = rng.normal(scale=0.01, size=(3, 3, 1, 8))  # tiny magnitudes
    big = rng.normal(size=(3, 3, 8, 64))
    pure = reference.magnitude_masks([small, big], 0.95)
    assert pure[0].sum() == 0  # global magnitude prunes the small layer away
    floored = reference.magnitude_masks([small, big], 0.95, floor=1.0)
    kept = [int(m.sum()) for m in floored]
    assert sum(kept) == round(0.05 * (small.size + big.size))
    expected = reference.erk_keep_counts([small.shape, big.shape], sum(kept))
    assert kept[0] >= expected[0] > 0


def test_run_reaches_the_exact_sparsity_and_leaves_the_input_model_alone(digits):
    (xtr, ytr), (xte, yte) = digits
    model = _trained(digits)
    before = [w.copy() for w in model.get_weights()]
    result = dg2pf_tf.run(model, (xtr, ytr), (xte, yte), sparsity=0.9,
                          pruning_epochs=2, patience=1, max_epochs=2, seed=0, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert not dg2pf_tf.core.masking.pruned_models(result.model)
    summary = dg2pf_tf.sparsity_summary(result.model)
    assert summary.prunable_zeros == round(0.9 * summary.prunable_weights)
    phases = [row["phase"] for row in result.history]
    assert phases[:2] == ["gradual", "gradual"] and phases[-1] == "finetune"
    assert [row["epoch"] for row in result.history] == list(range(1, len(phases) + 1))
    report = json.loads(json.dumps(result.report))
    accuracy, _ = dg2pf_tf.evaluate(result.model, dg2pf_tf.procedure.data.as_dataset((xte, yte), 128))
    assert report["pruned_val_accuracy"] == pytest.approx(accuracy)
    assert report["sparsity_prunable"] == pytest.approx(0.9, abs=1e-4)
    assert accuracy > 0.8


def test_run_with_a_seed_is_repeatable(digits):
    (xtr, ytr), (xte, yte) = digits
    model = _trained(digits, epochs=3)
    kwargs = {"sparsity": 0.8, "pruning_epochs": 1, "patience": 1, "max_epochs": 1, "seed": 5, "verbose": 0}
    a = dg2pf_tf.run(model, (xtr[:400], ytr[:400]), (xte, yte), **kwargs)
    b = dg2pf_tf.run(model, (xtr[:400], ytr[:400]), (xte, yte), **kwargs)
    for wa, wb in zip(a.model.get_weights(), b.model.get_weights()):
        np.testing.assert_allclose(wa, wb, atol=1e-6)


def test_run_refuses_missing_validation_data_and_bad_arguments(digits):
    (xtr, ytr), (xte, yte) = digits
    model = small_cnn()
    with pytest.raises(ValueError, match="validation_data"):
        dg2pf_tf.run(model, (xtr, ytr), None)
    with pytest.raises(ValueError, match="patience"):
        dg2pf_tf.run(model, (xtr, ytr), (xte, yte), patience=0)
    with pytest.raises(ValueError, match="sparsity"):
        dg2pf_tf.run(model, (xtr, ytr), (xte, yte), sparsity=1.0)
    with pytest.raises(ValueError, match="inputs hold 1347 examples but the labels 5"):
        dg2pf_tf.run(model, (xtr, ytr[:5]), (xte, yte))


def test_reestimate_batchnorm_matches_the_data_statistics(digits):
    (xtr, _), _ = digits
    model = small_cnn()
    model(xtr[:2])
    used = dg2pf_tf.reestimate_batchnorm(model, [xtr[:500]], max_batches=5)
    assert used == 1
    conv = keras.Model(model.input, model.get_layer("conv1").output)
    activations = conv(xtr[:500]).numpy().reshape(-1, 32)
    bn = model.get_layer("bn1")
    np.testing.assert_allclose(bn.moving_mean.numpy(), activations.mean(0), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), activations.var(0), rtol=1e-2, atol=1e-5)


MIRRORED_RUN = TWO_CPUS + r"""
import json
import keras, numpy as np, dg2pf_tf
from zoo.data import digits_arrays
from zoo.models import small_cnn
(xtr, ytr), (xte, yte) = digits_arrays()
keras.utils.set_random_seed(0)
model = small_cnn()
model(xtr[:1])
r = dg2pf_tf.run(model, (xtr[:400], ytr[:400]), (xte, yte), sparsity=0.9, pruning_epochs=1,
                 patience=1, max_epochs=1, seed=0, verbose=0, strategy=strategy)
s = dg2pf_tf.sparsity_summary(r.model)
print(json.dumps({"replicas": r.report["replicas"], "zeros": s.prunable_zeros,
                  "weights": s.prunable_weights, "loss": r.history[-1]["loss"],
                  "shapes": [list(w.shape) for w in r.model.get_weights()]}))
"""


@pytest.mark.slow
def test_run_under_mirrored_strategy_on_two_logical_cpus():
    out = json.loads(run_python(MIRRORED_RUN).strip().splitlines()[-1])
    assert out["replicas"] == 2
    assert out["zeros"] == round(0.9 * out["weights"])
    assert np.isfinite(out["loss"])
    assert out["shapes"] == [list(w.shape) for w in small_cnn().get_weights()]


def test_per_layer_scope_prunes_each_kernel_to_its_own_count(digits):
    (xtr, ytr), (xte, yte) = digits
    result = dg2pf_tf.run(_trained(digits, epochs=2), (xtr[:256], ytr[:256]), (xte, yte),
                          sparsity=0.98, scope="layer", pruning_epochs=1, patience=1,
                          max_epochs=1, finetune=False, seed=0, verbose=0)
    rows = dg2pf_tf.sparsity_summary(result.model).rows
    assert all(r.zeros == round(0.98 * r.weights) for r in rows)
    # One global round(0.98 * n) would differ from the per-kernel sum here.
    assert sum(r.zeros for r in rows) != round(0.98 * sum(r.weights for r in rows))



def test_run_takes_a_run_config_and_refuses_unknown_settings_before_any_work():
    import dataclasses

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    data = (np.zeros((8, 4), "float32"), np.zeros(8, "int32"))
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['sparcity'\].*RunConfig: alpha"):
        dg2pf_tf.run(model, data, data, sparcity=0.9)
    with pytest.raises(TypeError, match="must be a dg2pf_tf.RunConfig"):
        dg2pf_tf.run(model, data, data, config={"sparsity": 0.5})
    with pytest.raises(ValueError, match="`alpha` must be in"):
        dg2pf_tf.run(model, data, data, alpha=2.0)
    config = dg2pf_tf.RunConfig(structure="2:4")
    assert (config.sparsity, config.floor) == (None, None)  # the structure's defaults, when resolved
    assert (config.resolved().sparsity, config.resolved().floor) == (0.5, 0.0)
    assert dataclasses.replace(config, patience=2).patience == 2
    # A config made for one structure serves another: no default of the first one is kept.
    channels = dataclasses.replace(dg2pf_tf.RunConfig(pruning_epochs=5), structure="channel").resolved()
    assert (channels.sparsity, channels.floor, channels.pruning_epochs) == (0.9, 0.5, 5)
    assert dataclasses.replace(dg2pf_tf.RunConfig(structure="channel"), structure="2:4").resolved().floor == 0.0
    with pytest.raises(ValueError, match="`learning_rate` must be a number > 0"):
        dg2pf_tf.RunConfig(learning_rate=0)
