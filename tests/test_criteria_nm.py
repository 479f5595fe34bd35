"""N:M sparsity (structure='2:4'): device masks against the numpy reference,
the pattern on real Keras models, serialisation, export and bad input."""

import json
import os
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import dg2pf_tf
from dg2pf_tf.core import masking
from dg2pf_tf.criteria import reference
from dg2pf_tf.criteria.nm import NMCriterion, candidates
from helpers import assert_same_outputs, live_activations, mlp, residual_cnn

SHAPES = [(3, 3, 8, 16), (64, 10), (4, 16, 6)]
AXES = [2, 0, 1]


def kernels(kind, rng):
    """Weights of `SHAPES`: random normal, or small integers (ties everywhere) with a zeroed block."""
    if kind == "random":
        return [rng.normal(size=s).astype("float32") for s in SHAPES]
    found = [rng.integers(-3, 4, size=s).astype("float32") for s in SHAPES]
    found[1][:16] = 0.0  # a hard-pruned slice: exact zeros
    return found


@pytest.mark.parametrize("kind", ["random", "ties"])
@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_device_candidates_equal_the_reference(kind, n, m):
    rng = np.random.default_rng(m * 10 + n)
    for weight, axis in zip(kernels(kind, rng), AXES):
        expected = reference.nm_candidates(weight, axis, n, m)
        assert expected.sum() == weight.size * (m - n) // m
        np.testing.assert_array_equal(candidates(tf.constant(weight), axis, n, m).numpy(), expected)


@pytest.mark.parametrize("flat", [True, False], ids=["radix", "window"])
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_device_masks_equal_the_reference_at_every_level(kind, scope, flat):
    rng = np.random.default_rng(1)
    weights = kernels(kind, rng)
    criterion = NMCriterion(SHAPES, AXES, 2, 4, scope, flat=flat)
    for level in (0.0, 0.1, 0.37, 0.5):
        expected = reference.nm_masks(weights, AXES, level, 2, 4, scope)
        got = [m.numpy() for m in criterion.masks([tf.constant(w) for w in weights],
                                                  tf.constant(level, tf.float64))]
        for a, b in zip(expected, got):
            np.testing.assert_array_equal(a, b)
        assert criterion.removed(got) == criterion.removals(level)
    # At 1 - N/M every block of 4 keeps exactly its 2 largest.
    for mask, axis in zip(got, AXES):
        blocks = np.moveaxis(mask, axis, -1).reshape(-1, 4)
        assert (blocks.sum(axis=1) == 2).all()
    assert criterion.pattern_problems(got) == []


def test_pattern_problems_name_a_kernel_that_breaks_it():
    criterion = NMCriterion(SHAPES, AXES, 2, 4)
    masks = reference.nm_masks(kernels("random", np.random.default_rng(2)), AXES, 0.5, 2, 4)
    masks[2][0, :4, 0] = 1.0  # one block of four keeps all four
    assert criterion.pattern_problems(masks) == [(2, 1)]


@pytest.mark.slow
def test_keras_applications_model_takes_the_pattern_and_leaves_the_rest_dense():
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10,
                                           classifier_activation=None)  # logits: a random softmax is flat
    rng = np.random.default_rng(0)
    live_activations(model, rng.normal(size=(16, 32, 32, 3)).astype("float32"))
    with pytest.warns(UserWarning, match=r"stay dense: the 2:4 pattern.*Conv1/kernel \(3 inputs\)"):
        pruned = dg2pf_tf.prune(model, structure="2:4")
    assert pruned.schedule.sparsity == 0.5 and pruned.floor == 0.0
    names = {t.path for t in pruned.targets}
    assert "block_1_depthwise/kernel" not in names and "block_1_project/kernel" in names
    dg2pf_tf.update_masks(pruned, 0.5)
    masking.check_invariant(pruned, 0.5)
    report = dg2pf_tf.pattern_report(pruned, "2:4")
    assert report.broken == () and len(report.checked) == len(pruned.targets)
    assert f"{len(pruned.targets)} kernels hold zeros" in str(report) and "0 kernels break" in str(report)
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    assert_same_outputs(pruned, dg2pf_tf.strip(pruned), x)


def test_attention_projections_take_the_pattern_along_their_summed_axis():
    inputs = keras.Input((6, 16))
    x = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")(inputs, inputs)
    x = keras.layers.LSTM(8, name="lstm")(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(x))
    pruned = dg2pf_tf.prune(model, structure="2:4")
    dg2pf_tf.update_masks(pruned, 0.5)
    by_path = {t.path: m.numpy() for t, m in zip(pruned.targets, pruned.masks)}
    # Query kernel (16, heads, 8), 'abc,cde->abde': inputs along axis 0. Output
    # kernel (heads, 8, 16), 'abcd,cde->abe': the last summed axis is 1.
    query, output = by_path["mha/query/kernel"], by_path["mha/attention_output/kernel"]
    assert (np.moveaxis(query, 0, -1).reshape(-1, 4).sum(axis=1) == 2).all()
    assert (np.moveaxis(output, 1, -1).reshape(-1, 4).sum(axis=1) == 2).all()
    assert {"lstm/lstm_cell/kernel", "lstm/lstm_cell/recurrent_kernel", "head/kernel"} <= set(by_path)
    assert dg2pf_tf.pattern_report(pruned, "2:4").broken == ()


def test_keras_file_round_trips_the_structure_and_masks(tmp_path):
    pruned = dg2pf_tf.prune(mlp(), structure="1:4", pruning_epochs=3)
    dg2pf_tf.update_masks(pruned, 0.6)
    path = str(tmp_path / "nm.keras")
    pruned.save(path)
    loaded = keras.models.load_model(path)
    own = lambda config: {k: v for k, v in config.items() if k != "model"}  # noqa: E731
    assert loaded.get_config()["structure"] == "1:4"
    assert own(loaded.get_config()) == own(pruned.get_config())
    for a, b in zip(loaded.masks, pruned.masks):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    dg2pf_tf.update_masks(loaded, 0.75)  # the loaded model computes the same masks
    dg2pf_tf.update_masks(pruned, 0.75)
    for a, b in zip(loaded.masks, pruned.masks):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_export_records_the_pattern_and_refuses_a_broken_one(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stem's single input channel stays dense
        pruned = dg2pf_tf.prune(residual_cnn(), structure="2:4")
    dg2pf_tf.update_masks(pruned, 0.25)
    with pytest.raises(ValueError, match=r"2 kernels break the 2:4 pattern .*sep/pointwise_kernel"):
        dg2pf_tf.export(pruned, str(tmp_path / "early"), tflite=False, verbose=0)
    dg2pf_tf.update_masks(pruned, 0.5)
    plain = dg2pf_tf.strip(pruned)
    report = dg2pf_tf.export(plain, str(tmp_path / "out"), pattern="2:4", verbose=0)
    assert report["pattern"]["broken"] == [] and report["pattern"]["kernels_checked"] == 2
    with open(os.path.join(tmp_path, "out", "export.json")) as f:
        assert json.load(f)["pattern"]["pattern"] == "2:4"
    with pytest.raises(ValueError, match="no kernel .* holds zeros"):
        dg2pf_tf.export(residual_cnn(), str(tmp_path / "dense"), pattern="2:4", tflite=False, verbose=0)


@pytest.mark.parametrize("arguments, message", [
    ({"sparsity": 0.9}, r"final sparsity is 1 - 2/4 = 0.5"),
    ({"floor": 0.5}, "`floor` has no meaning"),
    ({"structure": "4:4"}, "needs 1 <= N < M"),
    ({"structure": "2:4:8"}, "must be 'unstructured', 'channel' or an N:M"),
    ({"schedule": dg2pf_tf.schedules.Linear(0.8, 2)}, "final sparsity is 1 - 2/4"),
])
def test_bad_pattern_arguments_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        dg2pf_tf.prune(mlp(), **{"structure": "2:4", **arguments})


def test_levels_above_the_pattern_and_models_without_room_are_refused():
    pruned = dg2pf_tf.prune(mlp(), structure="2:4")
    with pytest.raises(ValueError, match=r"above what structure '2:4' can reach \(0.5\)"):
        dg2pf_tf.update_masks(pruned, 0.6)
    narrow = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5)])
    with pytest.raises(ValueError, match="No prunable weight can take the 2:4 pattern"):
        dg2pf_tf.prune(narrow, structure="2:4")
