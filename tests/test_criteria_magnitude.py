import numpy as np
import pytest

from dg2pf_tf import counting
from dg2pf_tf.criteria import reference


def _zeros(masks):
    return sum(m.size - int(m.sum()) for m in masks)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.95, 0.999])
def test_global_masks_prune_exactly_round_s_times_n(sparsity):
    rng = np.random.default_rng(1)
    weights = [rng.normal(size=(3, 3, 4, 5)), rng.normal(size=(7,)), rng.normal(size=(31, 2))]
    masks = reference.magnitude_masks(weights, sparsity)
    n = sum(w.size for w in weights)
    assert _zeros(masks) == round(sparsity * n)
    assert all(m.dtype == np.float32 and m.shape == w.shape for m, w in zip(masks, weights))


def test_global_masks_remove_the_smallest_magnitudes_across_layers():
    small = np.array([0.1, -0.2, 0.3])
    large = np.array([5.0, -4.0, 0.05, 6.0])
    masks = reference.magnitude_masks([small, large], 3 / 7)
    # 0.05, 0.1 and -0.2 are the three smallest |w| of the whole network.
    np.testing.assert_array_equal(masks[0], [0, 0, 1])
    np.testing.assert_array_equal(masks[1], [1, 1, 0, 1])


def test_layer_scope_gives_each_kernel_the_same_sparsity_where_global_does_not():
    rng = np.random.default_rng(2)
    small = rng.normal(scale=0.01, size=100)
    large = rng.normal(scale=1.0, size=100)
    per_layer = reference.magnitude_masks([small, large], 0.5, scope="layer")
    assert [100 - m.sum() for m in per_layer] == [50, 50]
    global_ = reference.magnitude_masks([small, large], 0.5, scope="global")
    assert 100 - global_[0].sum() > 90 and 100 - global_[1].sum() < 10
    assert _zeros(global_) == 100


def test_ties_are_broken_by_position_first_come_first_pruned():
    weights = [np.ones(4), np.ones(4)]
    masks = reference.magnitude_masks(weights, 0.5)
    np.testing.assert_array_equal(masks[0], [0, 0, 0, 0])
    np.testing.assert_array_equal(masks[1], [1, 1, 1, 1])
    masks = reference.magnitude_masks([np.array([0.0, 2, 0, 1, 0, 0])], 0.5)
    np.testing.assert_array_equal(masks[0], [0, 1, 0, 1, 0, 1])
    again = reference.magnitude_masks([np.array([0.0, 2, 0, 1, 0, 0])], 0.5)
    np.testing.assert_array_equal(masks[0], again[0])


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.2, float("nan")])
def test_sparsity_outside_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        reference.magnitude_masks([np.ones(3)], bad)


def test_sparsity_of_wrong_type_and_unknown_scope_are_refused():
    with pytest.raises(TypeError, match="number"):
        reference.magnitude_masks([np.ones(3)], "high")
    with pytest.raises(ValueError, match="scope"):
        reference.magnitude_masks([np.ones(3)], 0.5, scope="channel")


def test_zero_counts_are_exact_zeros_only_and_empty_arrays_count_none():
    values = np.array([[0.0, -0.0, 1e-30], [np.nan, 0.0, -2.0]], dtype="float32")
    assert counting.count_zeros(values) == 3
    assert counting.zero_fraction(values) == 0.5
    assert counting.count_zeros(np.zeros((0, 4))) == 0
    assert counting.zero_fraction(np.zeros((0, 4))) == 0.0


@pytest.mark.parametrize("options", [{}, {"structure": "2:4"}, {"structure": "channel"},
                                     {"structure": "channel", "budget": "macs"}], ids=str)
def test_every_criterion_keeps_the_protocol_and_checks_masks_it_did_not_make(options):
    import dg2pf_tf
    from dg2pf_tf.core import masking
    from dg2pf_tf.criteria.protocol import Criterion
    from helpers import gated_cnn, randomized

    pruned = dg2pf_tf.prune(randomized(gated_cnn()), **options)
    criterion = masking.mask_set(pruned).criterion()
    assert isinstance(criterion, Criterion)
    level = 0.5  # 2:4 whole
    dg2pf_tf.update_masks(pruned, level)
    names = [t.path for t in pruned.targets]
    masks = [m.numpy() for m in pruned.masks]
    assert criterion.problem(masks, level, names) is None
    assert 0 < criterion.realised(level) <= level + 1 / criterion.total  # counts round to the nearest
    assert criterion.problem([np.ones_like(m) for m in masks], level, names)  # nothing pruned


# Erdos-Renyi-kernel by hand, three kernels of 132 weights:
#   conv (3, 3, 2, 4): 72 weights, sum of dims 12, raw density 12/72 = 1/6
#   fc   (4, 10):      40 weights, sum 14,         raw density 14/40 = 0.35
#   head (10, 2):      20 weights, sum 12,         raw density 12/20 = 0.6
# Density is eps * raw, eps spreading `keep` over the sums: count = floor(eps * sum).
ERK_SHAPES = [(3, 3, 2, 4), (4, 10), (10, 2)]


@pytest.mark.parametrize("keep, expected", [
    # eps = 50 / (12 + 14 + 12) = 1.3158; densities 0.219, 0.461, 0.789 all <= 1:
    # floor(12 * 50/38) = floor(15.79) = 15, floor(14 * 50/38) = floor(18.42) = 18, and 15 again.
    (50, [15, 18, 15]),
    # eps = 70/38 = 1.842 gives head 0.6 * 1.842 = 1.105 > 1: head is kept whole (20);
    # the other 50 go over sums 12 + 14: eps = 50/26, floor(23.08) = 23, floor(26.92) = 26.
    (70, [23, 26, 20]),
    # Everything: eps = 132/38 caps head (2.08) and fc (1.22) at 1, then conv keeps 132 - 60 = 72.
    (132, [72, 40, 20]),
    (0, [0, 0, 0]),
])
def test_erk_keep_counts_match_the_allocation_worked_by_hand(keep, expected):
    import tensorflow as tf

    from dg2pf_tf.criteria import magnitude

    assert reference.erk_keep_counts(ERK_SHAPES, keep).tolist() == expected
    sizes, sums = [72, 40, 20], [12, 14, 12]
    # The device version runs inside the compiled mask update (a tf.function).
    device = tf.function(lambda k: magnitude.erk_keep_counts(sizes, sums, k))
    assert device(tf.constant(keep, tf.int64)).numpy().tolist() == expected


def test_the_erk_floor_keeps_a_share_of_a_kernel_global_magnitude_would_empty():
    rng = np.random.default_rng(4)
    conv, fc = rng.normal(size=ERK_SHAPES[0]), rng.normal(size=ERK_SHAPES[1])
    head = rng.uniform(1e-4, 1e-3, size=ERK_SHAPES[2])  # smaller than any weight of conv and fc
    sparsity = 62 / 132  # keep 70: ERK gives conv 23, fc 26, head 20 (above)
    plain = reference.magnitude_masks([conv, fc, head], sparsity, floor=0.0)
    assert plain[2].sum() == 0 and _zeros(plain) == 62
    # floor 0.5 reserves int(0.5 * count) of each kernel's largest: 11, 13 and 10;
    # head keeps just its 10 largest, the 52 other zeros fall on conv and fc.
    half = reference.magnitude_masks([conv, fc, head], sparsity, floor=0.5)
    assert _zeros(half) == 62 and half[2].sum() == 10
    np.testing.assert_array_equal(half[2].reshape(-1) == 1, head.reshape(-1) >= np.sort(head.reshape(-1))[-10])
    assert half[0].sum() >= 11 and half[1].sum() >= 13
    # floor 1 reserves all of head's 20.
    whole = reference.magnitude_masks([conv, fc, head], sparsity, floor=1.0)
    assert _zeros(whole) == 62 and whole[2].sum() == 20
