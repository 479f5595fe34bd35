"""The device criterion returns exactly the masks of the numpy reference (`criteria/reference.py`)."""

import numpy as np
import pytest
import tensorflow as tf

from dg2pf_tf.criteria import magnitude, reference, window_search

SHAPES = [(3, 3, 4, 5), (7,), (31, 2), (64, 33), (5000,), (300, 20)]
SETTINGS = [("global", 0.0), ("layer", 0.0), ("global", 1.0), ("global", 0.5)]
LEVELS = [0.0, 0.1, 0.5, 0.9, 0.95, 0.999]


def _weights(kind, rng):
    weights = [rng.normal(size=shape).astype(np.float32) for shape in SHAPES]
    if kind == "ties":  # a handful of distinct magnitudes, many weights each
        weights = [(np.round(w * 2) / 2).astype(np.float32) for w in weights]
    if kind == "zeros":  # hard-pruned weights: most are exactly 0
        weights = [np.where(rng.random(w.shape) < 0.7, 0.0, w).astype(np.float32) for w in weights]
    if kind == "dead kernel":  # a whole kernel of zeros, another of one value
        weights[3] = np.zeros_like(weights[3])
        weights[5] = np.full_like(weights[5], -0.25)
    return weights


def _mismatches(expected, masks):
    return [int(np.sum(a != b.numpy())) for a, b in zip(expected, masks)]


def _device_masks(scope, floor, jit_compile=False, flat=False):
    criterion = magnitude.DeviceCriterion(SHAPES, scope, floor, jit_compile=jit_compile, flat=flat)
    return tf.function(criterion.masks)


@pytest.mark.parametrize("flat,jit_compile", [(True, True), (True, False), (False, False)],
                         ids=["radix select, XLA", "radix select", "windowed search"])
@pytest.mark.parametrize("scope,floor", SETTINGS)
def test_device_masks_equal_the_reference(scope, floor, flat, jit_compile):
    masks_of = _device_masks(scope, floor, jit_compile, flat)
    for kind in ("normal", "ties", "zeros", "dead kernel"):
        weights = _weights(kind, np.random.default_rng(0))
        for level in LEVELS:
            expected = reference.magnitude_masks(weights, level, scope, floor)
            masks = masks_of([tf.constant(w) for w in weights], tf.constant(level, tf.float64))
            assert _mismatches(expected, masks) == [0] * len(SHAPES), (kind, level)
            assert all(m.dtype == tf.float32 and tuple(m.shape) == w.shape for m, w in zip(masks, weights))


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("scope,floor", SETTINGS)
def test_windows_carried_between_calls_stay_exact_as_weights_and_levels_move(scope, floor, jit_compile):
    rng = np.random.default_rng(1)
    masks_of = _device_masks(scope, floor, jit_compile)
    weights = _weights("normal", rng)
    expected = None
    for step, level in enumerate([0.1, 0.1, 0.12, 0.5, 0.51, 0.9, 0.9, 0.95, 0.999, 0.3, 0.0, 0.9]):
        weights = [(w + rng.normal(scale=0.01, size=w.shape)).astype(np.float32) for w in weights]
        if step == 6:  # masked weights become exact zeros, as in the hard phases
            weights = [np.where(m == 0, 0, w).astype(np.float32) for w, m in zip(weights, expected)]
        if step == 7:  # then heavy ties
            weights = [(np.round(w * 2) / 2).astype(np.float32) for w in weights]
        expected = reference.magnitude_masks(weights, level, scope, floor)
        masks = masks_of([tf.constant(w) for w in weights], tf.constant(level, tf.float64))
        assert _mismatches(expected, masks) == [0] * len(SHAPES), (step, level)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("scope,floor", SETTINGS)
def test_schedule_jumps_into_the_tails_of_normal_uniform_and_heavy_tailed_kernels_stay_exact(scope, floor,
                                                                                           jit_compile):
    # An epoch's jump of the level starts from a sample; with a floor, large
    # kernels' free weights end deep in their upper tail, where magnitudes thin
    # out (normal), stop at a bound (uniform) or straggle (Student's t).
    rng = np.random.default_rng(3)
    shapes = [(512, 400), (3, 3, 64, 64), (1000,), (64, 10), (5,)]
    criterion = magnitude.DeviceCriterion(shapes, scope, floor, jit_compile=jit_compile, flat=False)
    masks_of = tf.function(criterion.masks)
    draws = [lambda s: rng.normal(size=s), lambda s: rng.uniform(-1, 1, size=s),
             lambda s: rng.standard_t(2, size=s), lambda s: rng.normal(size=s), lambda s: rng.normal(size=s)]
    weights = [draw(shape).astype(np.float32) for draw, shape in zip(draws, shapes)]
    for level in [0.09 * epoch for epoch in range(1, 11)] + [0.99, 0.5]:
        weights = [(w * (1 + rng.normal(scale=0.01, size=w.shape))).astype(np.float32) for w in weights]
        expected = reference.magnitude_masks(weights, level, scope, floor)
        masks = masks_of([tf.constant(w) for w in weights], tf.constant(level, tf.float64))
        assert _mismatches(expected, masks) == [0] * len(shapes), level


@pytest.mark.parametrize("scope,floor", SETTINGS)
def test_searches_that_start_from_a_bad_sample_still_end_exact(monkeypatch, scope, floor):
    # Tiny samples and targets make the first window miss or overflow often,
    # so the widening, secant and bisecting paths of the search run.
    monkeypatch.setattr(window_search, "_SAMPLE", 16)
    monkeypatch.setattr(window_search, "_TARGET", 16)
    monkeypatch.setattr(window_search, "_CROWDED", 2)
    rng = np.random.default_rng(2)
    masks_of = _device_masks(scope, floor)
    for kind in ("normal", "ties", "zeros"):
        weights = _weights(kind, rng)
        weights[4] = np.sort(np.abs(weights[4]))  # sorted values defeat a strided sample
        for level in (0.3, 0.9, 0.999):
            expected = reference.magnitude_masks(weights, level, scope, floor)
            masks = masks_of([tf.constant(w) for w in weights], tf.constant(level, tf.float64))
            assert _mismatches(expected, masks) == [0] * len(SHAPES), (kind, level)


def test_criterion_refuses_bad_scope_and_floor():
    with pytest.raises(ValueError, match="scope"):
        magnitude.DeviceCriterion(SHAPES, "channel", 0.0)
    with pytest.raises(ValueError, match="floor"):
        magnitude.DeviceCriterion(SHAPES, "global", 1.5)
