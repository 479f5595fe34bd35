"""Whole residual blocks: which can go (`channel_groups`), `shrink` replacing an emptied
branch by what it adds, and `floor=0` letting the ranking empty one."""

import keras
import numpy as np
import pytest

import dg2pf_tf
from dg2pf_tf.channels import graph
from dg2pf_tf.core import masking
from dg2pf_tf.criteria import reference
from helpers import assert_same_outputs, live_activations, randomized

L = keras.layers


def residual_net():
    """Blocks of three kinds nobody here tuned: a 1x1-3x3-1x1 bottleneck, a basic block
    of two padded 3x3 convolutions whose skip is the Add's second input, and a Dense
    residual MLP after pooling."""
    inputs = keras.Input((12, 12, 3), name="image")
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", name="stem")(inputs)))
    y = L.ReLU()(L.BatchNormalization()(L.Conv2D(12, 1, name="a_reduce")(x)))
    y = L.ReLU()(L.BatchNormalization()(L.Conv2D(12, 3, padding="same", name="a_mid")(y)))
    y = L.BatchNormalization()(L.Conv2D(8, 1, name="a_expand")(y))
    x = L.ReLU()(L.Add(name="a_add")([x, y]))
    y = L.ReLU()(L.BatchNormalization()(L.Conv2D(10, 3, padding="same", name="b_first")(x)))
    y = L.BatchNormalization()(L.Conv2D(8, 3, padding="same", name="b_second")(y))
    x = L.Add(name="b_add")([y, x])
    h = L.Dense(16, name="project")(L.GlobalAveragePooling2D()(x))
    z = L.Dense(16, name="c_out")(L.Dense(24, activation="relu", name="c_in")(h))
    h = L.Add(name="c_add")([h, z])
    return keras.Model(inputs, L.Dense(5, name="logits")(h))


def _application(family):
    return getattr(keras.applications, family)(weights=None, input_shape=(32, 32, 3), classifier_activation=None)


def test_channel_groups_say_which_residual_blocks_can_go_and_with_which_groups():
    found = graph.channel_groups(residual_net())
    blocks = {b.add: b for b in found.blocks}
    assert sorted(blocks) == ["a_add", "b_add", "c_add"]
    assert [g.name for g in blocks["a_add"].groups] == ["a_reduce", "a_mid"]
    assert blocks["a_add"].branch[0] == "a_reduce" and blocks["a_add"].skip == 0
    assert [g.name for g in blocks["b_add"].groups] == ["b_first"] and blocks["b_add"].skip == 1
    assert blocks["c_add"].branch == ("c_in", "c_out") and [g.name for g in blocks["c_add"].groups] == ["c_in"]
    assert "block 'b_add' can go: its branch of 5 layers holds b_first" in str(found)


@pytest.mark.parametrize("family, count", [("ResNet50", 16), ("ResNet50V2", 16), ("MobileNetV2", 10)])
def test_every_residual_block_of_keras_applications_is_found(family, count):
    found = graph.channel_groups(_application(family))
    assert len(found.blocks) == count
    # A bottleneck holds its two inside widths; an inverted residual its expanded one.
    assert {len(b.groups) for b in found.blocks} == ({1} if family == "MobileNetV2" else {2})


def _empty_some_blocks(model, seed=0):
    """Zeroes every channel of one own group of every other block, as channel
    pruning at floor=0 leaves them, and half of every other group; returns the
    blocks emptied."""
    found = graph.channel_groups(model)
    rng = np.random.default_rng(seed)
    emptied = found.blocks[::2]
    chosen = {id(b.groups[i % len(b.groups)]) for i, b in enumerate(emptied)}
    for group in found.groups:
        channels = np.arange(group.size) if id(group) in chosen else rng.choice(
            group.size, group.size // 2, replace=False)
        for s in group.trainable_slices():
            if s.role in (graph.PRODUCES, graph.CONSUMES):
                value = np.moveaxis(keras.ops.convert_to_numpy(s.variable), s.axis, 0).copy()
                value[s.rows[channels].reshape(-1)] = 0
                s.variable.assign(np.moveaxis(value, 0, s.axis))
    return emptied


@pytest.fixture
def float64():
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")


@pytest.mark.parametrize("build", [residual_net, lambda: _application("ResNet50"),
                                   lambda: _application("ResNet50V2")], ids=["custom", "ResNet50", "ResNet50V2"])
def test_shrink_replaces_an_emptied_branch_by_its_skip_and_computes_what_the_masked_model_does(build, float64):
    model = randomized(build())
    rng = np.random.default_rng(0)
    live_activations(model, rng.uniform(0, 1, (16, *model.input_shape[1:])))
    emptied = _empty_some_blocks(model)
    small = dg2pf_tf.shrink(model)
    names = {layer.name for layer in small.layers}
    for block in emptied:
        assert not names & set(block.branch), block.add  # the branch is gone
        assert type(small.get_layer(block.add)) in (L.Rescaling, L.Identity)
    kept = {b.add for b in graph.channel_groups(model).blocks} - {b.add for b in emptied}
    assert all(type(small.get_layer(name)) is L.Add for name in kept)
    assert_same_outputs(model, small, rng.uniform(0, 1, (4, *model.input_shape[1:])))
    folded = dg2pf_tf.shrink(model, fold_batchnorm=True)
    assert_same_outputs(model, folded, rng.uniform(0, 1, (4, *model.input_shape[1:])))


def test_a_branch_that_would_add_numbers_varying_over_positions_stays_one_channel_wide(float64):
    # Emptying the first width leaves the last padded 3x3 convolution a constant
    # input whose zero padding makes the borders differ: no constant to add, so the
    # branch stays, exact, one channel wide.
    inputs = keras.Input((6, 6, 4))
    y = L.Conv2D(6, 3, padding="same", activation="relu", name="first")(inputs)
    y = L.Conv2D(6, 3, padding="same", activation="relu", name="second")(y)
    y = L.Conv2D(4, 3, padding="same", name="third")(y)
    model = randomized(keras.Model(inputs, L.Add(name="add")([inputs, y])))
    group = next(g for g in graph.channel_groups(model).groups if g.name == "first")
    for s in group.trainable_slices():
        if s.role in (graph.PRODUCES, graph.CONSUMES):
            s.variable.assign(np.zeros(s.variable.shape))
    small = dg2pf_tf.shrink(model)
    assert type(small.get_layer("add")) is L.Add and small.get_layer("first").filters == 1
    assert_same_outputs(model, small, np.random.default_rng(1).uniform(0, 1, (4, 6, 6, 4)))


def test_floor_zero_lets_the_ranking_empty_a_block_and_shrink_removes_it():
    # Every weight of the basic block's inside width made 100 times quieter: its
    # channels rank last, and at floor=0 all of them go, then the block.
    model = randomized(residual_net())
    quiet = next(g for g in graph.channel_groups(model).groups if g.name == "b_first")
    for s in quiet.trainable_slices():
        s.variable.assign(keras.ops.convert_to_numpy(s.variable) * 0.01)
    pruned = dg2pf_tf.prune(model, structure="channel", floor=0.0)
    criterion = masking.mask_set(pruned).criterion()
    groups = masking.groups.prunable_groups(pruned.model, pruned.targets).groups
    assert [g.name for g, low in zip(groups, criterion.least) if low == 0] == ["a_reduce", "a_mid", "b_first", "c_in"]
    dg2pf_tf.update_masks(pruned, 0.3)
    dg2pf_tf.finalize(pruned)
    small = dg2pf_tf.shrink(pruned)
    assert type(small.get_layer("b_add")) in (L.Rescaling, L.Identity)
    assert "b_first" not in {layer.name for layer in small.layers}
    assert_same_outputs(pruned, small, np.random.default_rng(1).uniform(0, 1, (4, 12, 12, 3)))
    # The default floor keeps a channel of every group, so no block goes.
    default = dg2pf_tf.prune(model, structure="channel")
    assert set(masking.mask_set(default).criterion().least) == {1}


@pytest.mark.parametrize("sparsity", [0.3, 0.8])
def test_device_selection_with_groups_that_may_empty_equals_the_numpy_reference(sparsity):
    pruned = dg2pf_tf.prune(randomized(residual_net()), structure="channel", floor=0.0)
    criterion = masking.mask_set(pruned).criterion()
    scores = np.random.default_rng(3).integers(0, 4, criterion.total).astype("float32")  # many ties
    device = criterion.keep(scores, sparsity).numpy()
    expected = np.concatenate(reference.channel_keep(
        np.split(scores, np.cumsum(criterion.sizes)[:-1]), sparsity, 0.0, criterion.least))
    np.testing.assert_array_equal(device, expected)
    assert (~device).sum() == reference.channel_removals(criterion.sizes, sparsity, 0.0, criterion.least)
