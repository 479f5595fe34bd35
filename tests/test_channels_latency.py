"""The latency budget: a latency model built from per-layer timings (a fake clock here), its cache, bad input."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import dg2pf_tf
from dg2pf_tf import _compat, settings
from dg2pf_tf.channels import costs, latency, latency_cache, latency_tables, timing
from dg2pf_tf.core import calibration, masking
from dg2pf_tf.model import clone

L = keras.layers


def residual_net(size=16):
    """A small residual CNN nobody tuned for this: stem, two residual blocks, a head."""
    inputs = keras.Input((size, size, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, padding="same", use_bias=False, name="stem")(inputs)))
    for i in range(2):
        y = L.Conv2D(24, 3, padding="same", activation="relu", name=f"wide{i}")(x)
        y = L.BatchNormalization()(L.Conv2D(16, 1, name=f"narrow{i}")(y))
        x = L.ReLU()(L.Add()([x, y]))
    x = L.MaxPooling2D()(x)
    x = L.Conv2D(32, 3, padding="same", activation="relu", name="late")(x)
    return keras.Model(inputs, L.Dense(10, name="head")(L.GlobalAveragePooling2D()(x)))


class FakeTimer:
    """Times a model as 10 us a call, 1 ns a multiply-accumulate and 0.1 ns an output
    element: the form the latency model fits."""

    def __init__(self):
        self.timed = 0

    def seconds(self, models, progress=lambda done, total: None):
        self.timed += len(models)
        return [fake_seconds(m) for m in models]


def fake_seconds(model):
    # The outputs of this model's calls: a probe calls layers of the folded model
    # again, whose `layer.output` is of their first call.
    batch = model.inputs[0].shape[0]
    elements = sum(int(np.prod(call.outputs[0].shape[1:])) for call in _compat.graph_nodes(model))
    return 1e-5 + batch * (1e-9 * costs.model_macs(model) + 1e-10 * elements)


@pytest.fixture
def fake_timer(monkeypatch):
    timer = FakeTimer()
    monkeypatch.setattr(timing, "timer", lambda budget, runs=5: timer)
    return timer


def _latency_pruned(model, tmp_path, level=0.4, **budget):
    budget = settings.Latency(cache_dir=str(tmp_path), **budget)
    pruned = dg2pf_tf.prune(model, structure="channel", budget=budget, sparsity=level)
    return pruned, masking.mask_set(pruned).criterion()


def test_latency_model_predicts_the_shrunk_models_time_on_a_fake_clock(fake_timer, tmp_path):
    model = residual_net()
    pruned, criterion = _latency_pruned(model, tmp_path, batch_size=4)
    dg2pf_tf.update_masks(pruned, 0.4)
    flags = criterion.removed_flags([m.numpy() for m in pruned.masks])
    small = dg2pf_tf.shrink(pruned, fold_batchnorm=True)
    measured = fake_seconds(clone.copy(small, inputs=keras.Input(batch_shape=(4, 16, 16, 3))))
    dense = fake_seconds(clone.copy(dg2pf_tf.shrink(model, fold_batchnorm=True),
                                    inputs=keras.Input(batch_shape=(4, 16, 16, 3))))
    assert criterion.costs.measured == pytest.approx(dense)
    # Within 1e-5: the idle call's own 8 outputs are taken off every probe with its overhead.
    assert criterion.costs.seconds(flags) == pytest.approx(measured, rel=1e-5)
    assert 1 - measured / dense >= 0.4  # the budget is met on the clock, not only in the model
    assert criterion.costs.fixed_layers == []
    # Every width is a whole number of the runtime's tiles (8 by default).
    assert all(w.shape[-1] % 8 == 0 for w in small.weights if len(w.shape) == 4)


class UnevenTimer(FakeTimer):
    """The fake clock, but whole models (more than 8 layers) take `fake_seconds ** 0.8`:
    run together, layers take other than their sum, and a shrunk model more of the dense time."""

    def seconds(self, models, progress=lambda done, total: None):
        self.timed += len(models)
        return [fake_seconds(m) ** (0.8 if len(m.layers) > 8 else 1.0) for m in models]


@pytest.mark.parametrize("rounds", [0, calibration.ROUNDS])
def test_prune_times_the_shrunk_model_it_selects_and_meets_the_budget_on_the_clock(rounds, monkeypatch, tmp_path):
    monkeypatch.setattr(timing, "timer", lambda budget, runs=5: UnevenTimer())
    monkeypatch.setattr(calibration, "ROUNDS", rounds)  # 0: the layers' timings alone
    model = residual_net()
    pruned, criterion = _latency_pruned(model, tmp_path, level=0.4, batch_size=4, round_to=1)
    dg2pf_tf.update_masks(pruned, 0.4)
    clock = lambda m: UnevenTimer().seconds([clone.copy(  # noqa: E731
        dg2pf_tf.shrink(m, fold_batchnorm=True), inputs=keras.Input(batch_shape=(4, 16, 16, 3)))])[0]
    share = clock(pruned) / clock(model)
    predicted = criterion.costs.cost_numpy(criterion.removed_flags([m.numpy() for m in pruned.masks]))
    if rounds:  # 40% of the time gone on the clock, as predicted
        assert share <= 0.6 + calibration.TOLERANCE
        assert predicted / criterion.costs.total_cost == pytest.approx(share, abs=calibration.TOLERANCE)
    else:
        assert share > 0.6 + calibration.TOLERANCE


def test_latency_ranking_spends_the_budget_where_time_is(fake_timer, tmp_path):
    # 'late' runs at a quarter of the positions: per channel, the stream at full
    # resolution costs more time, so the latency budget takes more of it than of 'late'.
    pruned, criterion = _latency_pruned(residual_net(), tmp_path, level=0.3)
    dg2pf_tf.update_masks(pruned, 0.3)
    groups = masking.groups.prunable_groups(pruned.model, pruned.targets).groups
    flags = criterion.removed_flags([m.numpy() for m in pruned.masks])
    start = np.cumsum([0] + [g.size for g in groups])
    share = {g.name: flags[a:b].mean() for g, a, b in zip(groups, start, start[1:])}
    late = next(v for k, v in share.items() if k.startswith("late"))
    assert share[next(k for k in share if k.startswith("stem"))] > late


def test_latency_measurements_are_cached_and_a_foreign_cache_is_measured_anew(fake_timer, tmp_path):
    model = residual_net()
    _, first = _latency_pruned(model, tmp_path)
    timed = fake_timer.timed
    _, second = _latency_pruned(model, tmp_path)
    assert (first.costs.cached, second.costs.cached, fake_timer.timed) == (False, True, timed)
    assert second.costs.total_cost == first.costs.total_cost
    _latency_pruned(model, tmp_path, batch_size=2)  # another batch size: its own file
    assert fake_timer.timed == 2 * timed
    for path in tmp_path.iterdir():  # the layers' timings, and the shrunk model's against the dense
        stale = json.loads(path.read_text())
        if stale["key"]["batch_size"] == 32:
            stale["key"]["cpu"] = "another machine"
            path.write_text(json.dumps(stale))
    _, again = _latency_pruned(model, tmp_path)
    assert not again.costs.cached and fake_timer.timed == 3 * timed


def test_an_unwritable_cache_warns_and_the_latency_is_still_measured(fake_timer, tmp_path):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a directory")
    with pytest.warns(UserWarning, match="could not be cached"):
        _, criterion = _latency_pruned(residual_net(), blocked)
    assert criterion.costs.total_cost > 0


def test_latency_budget_that_the_floors_cannot_reach_says_the_most(fake_timer, tmp_path):
    with pytest.raises(ValueError, match=r"Ask for at most \d+\.\d%"):
        _latency_pruned(residual_net(), tmp_path, level=0.999)


def test_latency_needs_a_fixed_input_size(fake_timer, tmp_path):
    inputs = keras.Input((None, None, 3))
    x = L.Conv2D(8, 3, activation="relu")(L.Conv2D(8, 3)(inputs))
    model = keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(x)))
    with pytest.raises(ValueError, match="input_shape="):
        _latency_pruned(model, tmp_path, level=0.2)


def test_latency_settings_refuse_bad_values_and_round_trip_through_their_config():
    with pytest.raises(ValueError, match="runtime"):
        settings.Latency(runtime="gpu")
    with pytest.raises(ValueError, match="tf.config.threading"):
        settings.Latency(threads=2)
    with pytest.raises(ValueError, match="batch_size"):
        settings.Latency(batch_size=0)
    with pytest.raises(ValueError, match="round_to"):
        settings.Latency(round_to=0)
    with pytest.raises(ValueError, match="structure='channel'"):
        dg2pf_tf.prune(residual_net(), budget="latency")
    assert settings.Latency().batch_size == 32 and settings.Latency(runtime="litert").batch_size == 1
    budget = settings.Latency(runtime="litert", threads=2)
    assert settings.budget(budget.config()) == budget
    assert settings.budget("latency") == settings.Latency()
    # A file written before round_to existed removed channels one at a time.
    written = {k: v for k, v in budget.config().items() if k != "round_to"}
    assert settings.budget(written) == settings.Latency(runtime="litert", threads=2, round_to=1)


def test_a_pruned_model_with_a_latency_budget_saves_and_loads(fake_timer, tmp_path):
    budget = settings.Latency(runtime="litert", threads=2, cache_dir=str(tmp_path))
    pruned = dg2pf_tf.prune(residual_net(), structure="channel", budget=budget, sparsity=0.3)
    pruned.save(tmp_path / "pruned.keras")
    loaded = keras.models.load_model(tmp_path / "pruned.keras")
    assert loaded.budget == budget


def test_a_table_gives_its_timings_back_and_interpolates_between_them():
    # A 1x1 convolution bound by its output: reading 8 channels costs what 16 do.
    xs, ys = [8, 8, 8, 16, 16, 16, 32, 32, 32], [16, 32, 64] * 3
    times = [4.0, 8.0, 16.0, 4.0, 8.0, 16.0, 6.0, 12.0, 24.0]
    x_nodes, y_nodes, table = latency_tables.table(xs, ys, times)
    axis = lambda group, nodes: latency_tables.Axis([0.0], [(0, group, 1)], [nodes])  # noqa: E731
    tables = latency_tables.LatencyCosts(table[None] * 1e12, axis(0, x_nodes), axis(1, y_nodes),
                                         [32, 64], 0.0, settings.Latency())
    removed = lambda a, b: np.concatenate([np.arange(32) < a, np.arange(64) < b])  # noqa: E731
    assert tables.seconds(removed(0, 0)) == 24.0
    assert tables.seconds(removed(24, 0)) == 16.0  # a timing given back, where a formula fits through it
    # 24 channels in, 48 out: half way between the timings at (16, 32), (16, 64), (32, 32), (32, 64).
    assert tables.seconds(removed(8, 16)) == pytest.approx((8 + 16 + 12 + 24) / 4)
    cut = removed(20, 40)
    assert tables.cost(tf.constant(cut)).numpy() == tables.cost_numpy(cut)
    assert tables.first_order[0] == pytest.approx((24 - 16) / 16 * 1e12)  # the last step of the input
    # Measured: with those channels gone (8 in, 24 out) the model ran 40% of its time, not 25%.
    assert tables.cost_numpy(cut) / tables.total_cost == pytest.approx(0.25)
    calibrated = tables.calibrated([(cut, 0.4)])
    assert calibrated.total_cost == pytest.approx(tables.total_cost, abs=2)
    assert calibrated.cost_numpy(cut) / calibrated.total_cost == pytest.approx(0.4, abs=1e-9)
    assert calibrated.first_order[0] == pytest.approx(0.8 * tables.first_order[0])
    # 90% would halve what the layers cost and more: taken as noise, it moves them by half at most.
    assert tables.calibrated([(cut, 0.9)]).cost_numpy(cut) / tables.total_cost == pytest.approx(0.625, abs=1e-9)
    assert tables.calibrated([(removed(0, 0), 0.7)]) is tables  # nothing removed: nothing to learn
    # Two measurements, 40% and 65% where 25% and 50% were predicted: the scale fits both, in least squares.
    both = tables.calibrated([(cut, 0.4), (removed(16, 16), 0.65)])
    saved, wanted = np.array([0.75, 0.5]), np.array([0.6, 0.35])
    assert tables.cost_numpy(removed(16, 16)) / tables.total_cost == pytest.approx(0.5)
    assert both.cost_numpy(cut) / both.total_cost == pytest.approx(1 - 0.75 * (saved @ wanted) / (saved @ saved))


def test_a_table_never_makes_a_wider_layer_faster_and_takes_one_or_two_widths():
    _, _, table = latency_tables.table([8] * 3 + [16] * 3 + [32] * 3, [8, 16, 32] * 3,
                                       [3.0, 2.0, 5.0, 1.0, 4.0, 6.0, 7.0, 7.0, 7.0])
    assert table.tolist() == [[3.0, 3.0, 5.0], [3.0, 4.0, 6.0], [7.0, 7.0, 7.0]]
    x_nodes, y_nodes, table = latency_tables.table([0, 0], [8, 16], [1.0, 3.0])
    assert x_nodes == [-2, -1, 0] and y_nodes == [8, 12.0, 16]
    assert table[0].tolist() == [1.0, 2.0, 3.0] and np.all(table == table[0])


def test_calibration_counts_one_call_overhead_and_scales_the_layers_to_the_whole():
    # 2 ms a call, layers summing to 0.1 s, the whole 0.082 s: they run 0.8 times as long together.
    assert latency._calibration(0.082, 0.002, 0.1) == pytest.approx((0.8, 0.002))
    assert latency._calibration(0.001, 0.002, 0.1) == pytest.approx((0.01, 0.0))  # a clock too coarse
    assert latency._calibration(0.002, 0.002, 0.0) == pytest.approx((1.0, 0.002))  # all overhead


def test_timers_take_the_median_of_interleaved_rounds_on_their_clock():
    ticks = iter(np.cumsum([0, 5, 0, 1, 0, 7, 0, 2, 0, 6, 0, 3]).astype(float))
    timer = timing.KerasTimer(runs=3, clock=lambda: next(ticks))
    a = keras.Sequential([keras.Input((4,), batch_size=2), L.Dense(3)])
    b = keras.Sequential([keras.Input((4,), batch_size=2), L.Dense(5)])
    # Rounds interleave a, b, a, b, ...: a takes 5, 7, 6; b takes 1, 2, 3.
    assert timer.seconds([a, b]) == [6.0, 2.0]


@pytest.mark.slow
def test_litert_timer_runs_many_models_from_one_file():
    models = [keras.Sequential([keras.Input((8, 8, c), batch_size=1), L.Conv2D(c, 3)]) for c in (4, 8, 16)]
    models.append(keras.Model(*(lambda i: (i, L.Add()(i)))([keras.Input((8, 8, 4), batch_size=1)] * 2)))
    found = timing.LiteRTTimer(threads=1, runs=2).seconds(models)
    assert len(found) == 4 and all(s > 0 for s in found)


def test_keras_timer_times_real_models():
    small = keras.Sequential([keras.Input((32, 32, 8), batch_size=4), L.Conv2D(8, 3)])
    large = keras.Sequential([keras.Input((32, 32, 64), batch_size=4), L.Conv2D(256, 3)])
    fast, slow = timing.KerasTimer(runs=3).seconds([small, large])
    assert 0 < fast < slow


def test_channel_structure_gives_each_layer_its_widths():
    model = residual_net()
    found = dg2pf_tf.channel_groups(model)
    inputs, output = found.widths["wide0"]
    assert inputs[0].fixed == 0 and [g.size for g, _ in inputs[0].parts] == [16]
    assert output.parts[0][0].size == 24
    head_inputs, head_output = found.widths["head"]
    assert head_output.fixed == 10 and not head_output.parts
    assert os.path.basename(latency_cache.cache_dir(settings.Latency(cache_dir="/x/y"))) == "y"
