"""Channel pruning to a share of the MACs or parameters (`budget=`), counted exactly."""

import keras
import numpy as np
import pytest

import dg2pf_tf
from dg2pf_tf.channels.costs import model_macs
from dg2pf_tf.core import masking
from dg2pf_tf.criteria import reference
from dg2pf_tf.criteria.channel import ChannelCriterion
from helpers import assert_same_outputs, gated_cnn, live_activations, randomized


def mobilenet():
    return randomized(keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10,
        classifier_activation=None))  # logits: a random network's softmax is flat and hides errors


def criterion_of(pruned):
    return masking.mask_set(pruned).criterion()


def shrunk_by_flags(pruned, removed):
    """The pruned model's plain copy with the channels flagged in `removed` zeroed
    wherever they are read, then shrunk: physically without them."""
    criterion = criterion_of(pruned)
    keep = np.append(~removed, True).astype("float32")
    for mask, positions in zip(pruned.masks, criterion.positions):
        value = np.ones(mask.shape, "float32")
        for axis, index in positions:
            value *= keep[index].reshape([-1 if d == axis else 1 for d in range(value.ndim)])
        mask.assign(value)
    return dg2pf_tf.shrink(pruned)


@pytest.mark.parametrize("budget", ["macs", "params"])
def test_cost_of_removed_channels_is_what_the_shrunk_model_costs(budget):
    model = mobilenet()
    pruned = dg2pf_tf.prune(model, structure="channel", budget=budget)
    criterion = criterion_of(pruned)
    count = model_macs if budget == "macs" else (lambda m: m.count_params())
    assert criterion.costs.total_cost == count(model)
    rng = np.random.default_rng(0)
    for share in (0.2, 0.6):
        removed = rng.random(criterion.total) < share
        expected = count(shrunk_by_flags(pruned, removed))
        assert criterion.costs.cost_numpy(removed) == expected
        assert int(criterion.costs.cost(removed)) == expected


@pytest.mark.parametrize("budget", ["macs", "params"])
@pytest.mark.parametrize("level, floor, round_to", [(0.3, 0.0, 1), (0.5, 0.5, 1), (0.6, 1.0, 1), (0.4, 1.0, 1),
                                                    (0.3, 0.0, 4), (0.5, 0.5, 3)])
def test_device_budget_selection_equals_the_numpy_reference_with_ties(budget, level, floor, round_to):
    pruned = dg2pf_tf.prune(randomized(gated_cnn()), structure="channel", budget=budget, floor=floor)
    found = criterion_of(pruned)
    criterion = ChannelCriterion(found.sizes, found.pairs, pruned.targets, floor, found.costs, found.least, round_to)
    scores = np.random.default_rng(3).integers(1, 4, criterion.total).astype("float32")  # many ties
    device = criterion.keep(scores, level).numpy()
    costs = criterion.costs
    expected = np.concatenate(reference.channel_keep_within(
        np.split(scores, np.cumsum(criterion.sizes)[:-1]), costs.first_order, costs.cost_numpy,
        costs.total_cost, level, floor, round_to=round_to))
    np.testing.assert_array_equal(device, expected)
    kept = [int(k.sum()) for k in np.split(device, np.cumsum(criterion.sizes)[:-1])]
    assert all(k % round_to == 0 or k == n for k, n in zip(kept, criterion.sizes))
    saved = 1 - costs.cost_numpy(~device) / costs.total_cost
    if criterion.most_saved(level) < level:  # the floors keep too much: all they allow goes
        assert saved == pytest.approx(criterion.most_saved(level))
        return
    assert saved >= level
    # One chunk fewer would not do: the last one taken was needed.
    assert saved - round_to * costs.first_order.max() / costs.total_cost < level
    assert criterion.problem(criterion_masks(criterion, device), level) is None


def criterion_masks(criterion, keep):
    """The numpy masks of `criterion`'s targets that keep the channels flagged in `keep`."""
    along = np.append(keep, True).astype("float32")
    masks = []
    for shape, positions in zip(criterion.shapes, criterion.positions):
        mask = np.ones(shape, "float32")
        for axis, index in positions:
            mask *= along[index].reshape([-1 if d == axis else 1 for d in range(len(shape))])
        masks.append(mask)
    return masks


def test_round_to_needs_a_cost_budget():
    pruned = dg2pf_tf.prune(randomized(gated_cnn()), structure="channel")
    found = criterion_of(pruned)
    with pytest.raises(ValueError, match="only under a cost budget"):
        ChannelCriterion(found.sizes, found.pairs, pruned.targets, 0.5, None, found.least, 8)


@pytest.mark.slow
def test_macs_budget_halves_a_keras_application_and_shrinks_to_the_same_outputs(tmp_path):
    model = live_activations(mobilenet(), np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3)).astype("float32"))
    pruned = dg2pf_tf.prune(model, sparsity=0.5, structure="channel", budget="macs")
    assert dg2pf_tf.update_masks(pruned, 0.5) == 0.5
    dg2pf_tf.finalize(pruned)
    masking.check_invariant(pruned, 0.5)
    small = dg2pf_tf.shrink(pruned)
    dense_macs, small_macs = model_macs(model), model_macs(small)
    assert 0.45 < small_macs / dense_macs <= 0.5
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    assert_same_outputs(pruned, small, x)
    # The channel budget at the same level removes as many channels, not as many MACs.
    by_channels = dg2pf_tf.prune(model, sparsity=0.5, structure="channel")
    dg2pf_tf.update_masks(by_channels, 0.5)
    assert model_macs(dg2pf_tf.shrink(by_channels)) > small_macs
    # The budget travels with the model.
    path = str(tmp_path / "pruned.keras")
    pruned.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.budget == dg2pf_tf.MACs() and loaded.get_config()["budget"] == "macs"
    assert criterion_of(loaded).costs.total_cost == dense_macs


def test_budget_is_refused_where_it_has_no_meaning_or_cannot_be_met():
    model = gated_cnn()
    before = [w.numpy().copy() for w in model.weights]
    with pytest.raises(ValueError, match="`budget` must be one of"):
        dg2pf_tf.prune(model, structure="channel", budget="flops")
    with pytest.raises(ValueError, match="needs structure='channel'"):
        dg2pf_tf.prune(model, budget="macs")
    with pytest.raises(ValueError, match="needs structure='channel'"):
        dg2pf_tf.prune(keras.Sequential([keras.Input((8,)), keras.layers.Dense(8)]), structure="2:4",
                       budget="params")
    with pytest.raises(ValueError, match=r"saves \d+\.\d%.*Ask for at most"):
        dg2pf_tf.prune(model, sparsity=0.95, structure="channel", budget="macs", floor=1.0)
    anysize = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Conv2D(8, 3),
                                keras.layers.Conv2D(8, 3), keras.layers.GlobalAveragePooling2D(),
                                keras.layers.Dense(4)])
    with pytest.raises(ValueError, match="fixed input size"):
        dg2pf_tf.prune(anysize, structure="channel", budget="macs")
    dg2pf_tf.prune(anysize, structure="channel", budget="params")  # parameters do not depend on it
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights))


def test_macs_of_transformer_layers_count_per_token():
    inputs = keras.Input((None, 16))
    x = keras.layers.MultiHeadAttention(4, 8, name="attention")(inputs, inputs)
    x = keras.layers.Dense(32, activation="relu", name="up")(x)
    model = keras.Model(inputs, keras.layers.Dense(16, name="down")(x))
    attention = model.get_layer("attention")
    projections = (attention.query_dense, attention.key_dense, attention.value_dense, attention.output_dense)
    per_token = sum(int(np.prod(d.kernel.shape)) for d in projections) + 16 * 32 + 32 * 16
    assert model_macs(model) == per_token
    pruned = dg2pf_tf.prune(model, sparsity=0.3, structure="channel", budget="macs", floor=0.0)
    dg2pf_tf.update_masks(pruned, 0.3)
    assert 1 - model_macs(dg2pf_tf.shrink(pruned)) / per_token >= 0.3


@pytest.mark.slow
def test_run_reports_the_share_of_the_budget_removed():
    from zoo.data import digits_arrays
    from zoo.models import small_cnn

    (x, y), _ = digits_arrays()
    keras.utils.set_random_seed(0)
    dense = small_cnn()
    dense.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    dense.fit(x, y, epochs=2, batch_size=64, verbose=0)
    dg2pf_tf.reestimate_batchnorm(dense, [x[i:i + 64] for i in range(0, len(x), 64)])
    config = dg2pf_tf.RunConfig(sparsity=0.4, structure="channel", budget="macs", pruning_epochs=2,
                                patience=1, max_epochs=1, finetune=False)
    result = dg2pf_tf.run(dense, (x[:1000], y[:1000]), (x[1000:], y[1000:]), config, seed=0, verbose=0)
    report = result.report
    removed = 1 - model_macs(result.model) / model_macs(dense)
    assert report["budget"] == "macs" and report["budget_removed"] == pytest.approx(removed) and removed >= 0.4
    assert report["budget_total"] == model_macs(dense)
    assert 0 < report["channels_removed"] < report["channels_total"]


def test_macs_are_what_a_hand_count_of_the_layers_gives():
    image, tokens = keras.Input((10, 10, 3)), keras.Input((7,), dtype="int32")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same")(image)    # 5x5 positions x 3*3*3*8
    x = keras.layers.PReLU()(x)                                        # scales: no MACs
    x = keras.layers.DepthwiseConv2D(3)(x)                             # 3x3 positions x 3*3*8
    x = keras.layers.Dense(4)(keras.layers.Flatten()(x))               # 72*4
    t = keras.layers.Embedding(50, 6)(tokens)                          # a lookup: no MACs
    t = keras.layers.GlobalAveragePooling1D()(keras.layers.Dense(5)(t))  # 7 tokens x 6*5
    out = keras.layers.Dense(2)(keras.layers.Concatenate()([x, t]))    # 9*2
    model = keras.Model([image, tokens], out)
    assert model_macs(model) == 25 * 216 + 9 * 72 + 72 * 4 + 7 * 30 + 9 * 2
