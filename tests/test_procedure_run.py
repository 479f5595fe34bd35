"""run(): the DG2PF phases end to end on real digits, and the ERK floor."""

import json

import keras
import numpy as np
import pytest

import dg2pf_tf
from dg2pf_tf.criteria import reference
from dg2pf_tf.procedure import runner
from helpers import TWO_CPUS, mlp, run_python
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


def test_pruned_fine_tuning_is_a_phase_only_when_asked_for():
    from dg2pf_tf.procedure.phases import phase_table

    def names(**settings):
        return [phase.name for phase in phase_table(dg2pf_tf.RunConfig(sparsity=0.9, **settings).resolved())]

    assert names() == ["gradual", "distill", "detached"]
    assert names(finetune=True) == ["gradual", "distill", "detached", "finetune"]
    assert names(alpha=0.0, finetune=True) == ["gradual", "detached", "finetune"]


@pytest.mark.slow
def test_run_reaches_the_exact_sparsity_and_leaves_the_input_model_alone(digits):
    (xtr, ytr), (xte, yte) = digits
    model = _trained(digits)
    before = [w.copy() for w in model.get_weights()]
    result = dg2pf_tf.run(model, (xtr, ytr), (xte, yte), sparsity=0.9, finetune=True,
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


@pytest.mark.slow
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


def test_reestimate_batchnorm_averages_the_batch_statistics_and_restores_the_layers(digits):
    (xtr, _), _ = digits
    model = small_cnn()
    model(xtr[:2])
    bn = model.get_layer("bn1")
    momentum = bn.momentum
    batches = [xtr[:200], (xtr[200:300], None), xtr[300:450], xtr[450:600]]  # sizes differ
    assert dg2pf_tf.reestimate_batchnorm(model, batches, max_batches=3) == 3
    conv = keras.Model(model.input, model.get_layer("conv1").output)
    stats = [conv(b[0] if isinstance(b, tuple) else b).numpy().reshape(-1, 32) for b in batches[:3]]
    np.testing.assert_allclose(bn.moving_mean.numpy(), np.mean([a.mean(0) for a in stats], 0),
                               rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), np.mean([a.var(0) for a in stats], 0),
                               rtol=1e-2, atol=1e-5)
    assert (bn.momentum, bn.synchronized) == (momentum, False)
    with pytest.raises(ValueError, match="yielded no batch"):
        dg2pf_tf.reestimate_batchnorm(model, [])


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


@pytest.mark.slow
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


# What the settings of run() do, on an MLP trained on 64 separable examples.


@pytest.fixture(scope="module")
def separable():
    """64 examples of 16 features whose class (of 4) is the largest of the first
    four; a model that learnt them (an MLP, or with `bn` one with BatchNorm)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16)).astype("float32")
    y = np.argmax(x[:, :4], -1)
    keras.utils.set_random_seed(0)
    with_bn = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, name="hidden"),
                                keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU(),
                                keras.layers.Dense(4, name="out")])
    models = {"mlp": mlp(), "bn": with_bn}
    for model in models.values():
        model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, epochs=30, batch_size=64, verbose=0)
    return models, (x, y)


class Watch(keras.callbacks.Callback):
    """What a run does, phase by phase (an `on_train_begin` each): the student's
    weights as the phase starts, its masks and pruned weights after every
    step, and the optimizer and its iteration count as the phase ends."""

    def __init__(self):
        super().__init__()
        self.starts, self.steps, self.ends = [], [], []

    def on_train_begin(self, logs=None):
        self.starts.append([w.copy() for w in self.model.student.model.get_weights()])
        self.steps.append([])

    def on_train_batch_end(self, batch, logs=None):
        student = self.model.student
        self.steps[-1].append(([m.numpy().copy() for m in student.masks],
                               [t.numpy().copy() for t in student.targets]))

    def on_train_end(self, logs=None):
        optimizer = self.model.optimizer
        self.ends.append((optimizer, int(optimizer.iterations.numpy())))


def _short_run(model, data, watch, **settings):
    """A run of 2 pruning epochs to 80% and one distillation epoch, no fine-tuning."""
    return dg2pf_tf.run(model, data, data, **{
        "sparsity": 0.8, "pruning_epochs": 2, "max_epochs": 1, "patience": 1, "finetune": False,
        "batch_size": 8, "seed": 0, "verbose": 0, "callbacks": [watch], **settings})


def _leaked(step):
    """How many weights under a 0 of their mask are not 0, after a step."""
    masks, targets = step
    return sum(int(np.count_nonzero(t[m == 0])) for m, t in zip(masks, targets))


@pytest.mark.slow
@pytest.mark.parametrize("recovery", [False, True])
def test_without_recovery_pruned_weights_are_zero_from_the_first_step_with_it_they_move(separable, recovery):
    models, data = separable
    watch = Watch()
    _short_run(models["mlp"], data, watch, recovery=recovery)
    gradual, distill = watch.steps  # no detached phase: one distill epoch ends it, not a plateau
    assert len(gradual) == 16 and len(distill) == 8
    leaked = [_leaked(step) for step in gradual]
    if not recovery:
        assert leaked == [0] * 16
    else:
        assert all(n > 0 for n in leaked)
        # Weights masked before and after a step still learn (straight-through).
        (masks, before), (masks_after, after) = gradual[5], gradual[6]
        moved = sum(int(np.count_nonzero((b != a)[(m == 0) & (n == 0)]))
                    for m, n, b, a in zip(masks, masks_after, before, after))
        assert moved > 0
    assert [_leaked(step) for step in distill] == [0] * 8  # after the gradual phase, hard either way


@pytest.mark.parametrize("every", [pytest.param(1, marks=pytest.mark.slow), 3, None])
def test_masks_are_recomputed_only_every_mask_update_steps_steps(separable, every):
    models, data = separable
    watch = Watch()
    _short_run(models["mlp"], data, watch, mask_update_steps=every)
    gradual = watch.steps[0]  # 2 epochs of 64 / 8 = 8 steps
    schedule = dg2pf_tf.RunConfig(sparsity=0.8, pruning_epochs=2).schedule()
    n = 16 * 32 + 32 * 4
    expected, level = [], None
    for epoch in range(2):
        for step in range(8):
            if step % (every or 8) == 0:  # None: the first step of each epoch only
                level = schedule(epoch + step / 8)
            expected.append(round(level * n))  # 512 all of epoch 2
    zeros = [sum(int(np.count_nonzero(m == 0)) for m in masks) for masks, _ in gradual]
    assert zeros == expected
    for k in range(1, 16):
        if k % 8 % (every or 8):  # no update before step k: the masks stay as they were
            for a, b in zip(gradual[k - 1][0], gradual[k][0]):
                np.testing.assert_array_equal(a, b)


def test_steps_per_epoch_caps_the_optimizer_steps_of_every_epoch(separable):
    models, data = separable
    watch = Watch()
    result = dg2pf_tf.run(models["mlp"], data, data, sparsity=0.8, pruning_epochs=2, max_epochs=2,
                          patience=1, batch_size=8, steps_per_epoch=3, finetune=True, seed=0, verbose=0,
                          callbacks=[watch])
    epochs = result.report["epochs"]
    phases = [phase for phase in ("gradual", "distill", "detached", "finetune") if phase in epochs]
    assert [len(steps) for steps in watch.steps] == [3 * epochs[p] for p in phases]  # of 8 batches
    # AdamW trains every phase but fine-tuning, SGD that one: iterations are steps taken.
    adamw, sgd = watch.ends[0][0], watch.ends[-1][0]
    assert adamw is not sgd and isinstance(sgd, keras.optimizers.SGD)
    assert watch.ends[-2][1] == int(adamw.iterations.numpy()) == 3 * (len(result.history) - epochs["finetune"])
    assert watch.ends[-1][1] == 3 * epochs["finetune"] > 0


@pytest.mark.parametrize("while_pruning", [True, False])
def test_the_teacher_guides_the_gradual_steps_unless_distillation_waits_for_the_target(separable, while_pruning):
    models, data = separable
    result = dg2pf_tf.run(models["mlp"], data, data, sparsity=0.8, pruning_epochs=2, max_epochs=1, patience=1,
                          batch_size=64, finetune=False, distill_while_pruning=while_pruning, seed=0, verbose=0)
    kd = {row["phase"]: row["kd_loss"] for row in result.history}
    assert kd["distill"] > 0
    assert (kd["gradual"] > 0) is while_pruning


@pytest.mark.parametrize("recalibrate", ["auto", pytest.param(True, marks=pytest.mark.slow), False])
def test_recalibrate_bn_leaves_the_batchnorm_statistics_of_the_training_data(separable, recalibrate):
    models, (x, y) = separable
    result = dg2pf_tf.run(models["bn"], (x, y), (x, y), sparsity=0.8, pruning_epochs=1, max_epochs=1,
                          patience=1, finetune=False, batch_size=64, recalibrate_bn=recalibrate,
                          seed=0, verbose=0)
    bn = result.model.get_layer("bn")
    statistics = [bn.moving_mean.numpy(), bn.moving_variance.numpy()]
    # The statistics of the returned model's own activations over the training data (one batch).
    fresh = keras.models.clone_model(result.model)
    fresh.set_weights(result.model.get_weights())
    assert dg2pf_tf.reestimate_batchnorm(fresh, [x]) == 1
    activations = keras.Model(fresh.inputs, fresh.get_layer("hidden").output)(x).numpy()
    np.testing.assert_allclose(fresh.get_layer("bn").moving_mean.numpy(), activations.mean(0), rtol=1e-5, atol=1e-6)
    reestimated = [fresh.get_layer("bn").moving_mean.numpy(), fresh.get_layer("bn").moving_variance.numpy()]
    if recalibrate:  # 'auto': the model has BatchNorm
        for a, b in zip(statistics, reestimated):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    else:  # the moving averages of 2 steps at momentum 0.99: still the dense model's, nearly
        assert not np.allclose(statistics[1], reestimated[1], rtol=0.05)
        np.testing.assert_allclose(statistics[1], models["bn"].get_layer("bn").moving_variance.numpy(), rtol=0.05)


# Phase control: the runner's validation replaced by scripted scores.


class Scripted:
    """Stands in for `runner.Evaluator`: the dense teacher scores 1.0; the
    student scores the next of `scores` (a subclass's; loss 1.0 always, so no
    tie is broken) and its weights are recorded in `seen`."""

    def __init__(self, model, task, probabilities=None, **_):
        self.model = model

    def __call__(self, data):
        if not isinstance(self.model, dg2pf_tf.PrunedModel):
            return 1.0, 1.0
        self.seen.append([w.copy() for w in self.model.model.get_weights()])
        return self.scores[len(self.seen) - 1], 1.0


@pytest.fixture
def scripted(monkeypatch):
    """Sets the validation scores `run()` sees, epoch by epoch; returns the
    student weights each score was given to."""
    def script(scores):
        monkeypatch.setattr(runner, "Evaluator", type("Script", (Scripted,), {"scores": scores, "seen": []}))
        return runner.Evaluator.seen
    return script


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))


def test_each_phase_ends_after_patience_epochs_without_a_better_score_and_the_best_state_wins(
        separable, scripted):
    models, data = separable
    scores = [0.99, 0.99,              # gradual: below the target sparsity, never the best
              0.5, 0.7, 0.6, 0.65,     # distill: best at its 2nd epoch, then 2 worse: plateau
              0.6, 0.65,               # detached: 2 epochs not above 0.7: plateau
              0.8, 0.75, 0.7]          # finetune: best at its 1st epoch (epoch 9), then plateau
    seen = scripted(scores)
    watch = Watch()
    result = dg2pf_tf.run(models["mlp"], data, data, sparsity=0.5, pruning_epochs=2, patience=2,
                          max_epochs=5, batch_size=32, finetune=True, seed=0, verbose=0, callbacks=[watch])
    phases = [row["phase"] for row in result.history]
    assert phases == ["gradual"] * 2 + ["distill"] * 4 + ["detached"] * 2 + ["finetune"] * 3
    assert [row["val_accuracy"] for row in result.history] == scores
    assert (result.report["best_epoch"], result.report["best_phase"]) == (9, "finetune")
    # The detached phase starts from where distillation stopped; fine-tuning from
    # the best state so far (distill's 2nd epoch, epoch 4), not the latest.
    gradual, distill, detached, finetune = watch.starts
    assert _same(detached, seen[5]) and not _same(detached, seen[3])
    assert _same(finetune, seen[3]) and not _same(finetune, seen[7])
    # The model returned is the student as it was at epoch 9.
    assert _same(result.model.get_weights(), seen[8]) and not _same(seen[8], seen[10])


def test_without_a_plateau_in_distillation_the_detached_phase_is_skipped(separable, scripted):
    models, data = separable
    seen = scripted([0.99, 0.99,              # gradual
                     0.5, 0.6, 0.7,           # distill: better every epoch until max_epochs
                     0.6, 0.7])               # finetune: nothing above 0.7 (a tie is not better)
    watch = Watch()
    result = dg2pf_tf.run(models["mlp"], data, data, sparsity=0.5, pruning_epochs=2, patience=2,
                          max_epochs=3, batch_size=32, finetune=True, seed=0, verbose=0, callbacks=[watch])
    assert [row["phase"] for row in result.history] == ["gradual"] * 2 + ["distill"] * 3 + ["finetune"] * 2
    assert (result.report["best_epoch"], result.report["best_phase"]) == (5, "distill")
    assert len(watch.starts) == 3 and _same(watch.starts[2], seen[4])
    assert _same(result.model.get_weights(), seen[4]) and not _same(seen[4], seen[6])
