"""The magnitude masks of `reference.py`, computed with TensorFlow ops where the weights live.

No Keras and no host round trip: `DeviceCriterion.masks` runs inside a compiled
function and returns exactly what `reference.magnitude_masks` returns for the
same weights (the same count `round(s*N)`, the same tie rule, the same ERK
floor and per-layer scope); the tests hold the two against each other.

Two ways, by model size. Small models take one radix select over all their
weights at once (`_radix_select`: four `bincount`s of 7-8 bit digits of |w|'s
bit pattern), a graph that does not grow with the number of kernels. Large
ones take `window_search`: counts against windows carried from the previous
call, so an update reads the weights about three times, whatever their size.
The ERK floor caps how many weights of each kernel may be pruned (the rest are
its largest, reserved, ties to the earliest positions).
"""

import numpy as np
import tensorflow as tf

from dg2pf_tf.checks import check_floor, check_scope
from dg2pf_tf.counting import count_zeros, zero_count
from dg2pf_tf.criteria.window_search import INT_MAX, WindowSearch, abs_bits

FLAT_BELOW = 1 << 21       # smaller models: one radix select over all their weights at once
XLA_FROM = 1 << 23         # larger ones compile the passes with XLA: 2x faster, seconds to compile


def _radix_select(values, segments, num_segments, ranks, latest_first=False):
    """Per segment s, which of `values` are its `ranks[s]` smallest: True where chosen.

    `values`: int32 >= 0, flat; `segments`: the segment of each value, in
    order; ties at the boundary go to the earliest positions (`latest_first`:
    the latest). Four `bincount`s of 7-8 bit digits find each segment's
    boundary value exactly; the graph does not grow with the number of kernels.
    """
    ranks = tf.cast(ranks, tf.int32)
    prefix = tf.zeros([num_segments], tf.int32)
    remaining = ranks
    candidates = tf.ones_like(values, tf.bool)
    for shift, bits in ((24, 7), (16, 8), (8, 8), (0, 8)):
        width = 1 << bits
        digits = tf.bitwise.bitwise_and(tf.bitwise.right_shift(values, shift), width - 1)
        index = segments * width + digits if num_segments > 1 else digits
        # The raw op takes a fixed size, as XLA needs (`tf.math.bincount` computes one).
        counts = tf.raw_ops.DenseBincount(input=index, size=num_segments * width,
                                          weights=tf.cast(candidates, tf.int32))
        cumulative = tf.cumsum(tf.reshape(counts, [num_segments, width]), axis=1)
        # The first digit whose cumulative count reaches the rank.
        digit = tf.reduce_sum(tf.cast(cumulative < remaining[:, None], tf.int32), axis=1)
        before = tf.gather(cumulative, tf.maximum(digit - 1, 0), batch_dims=1)
        remaining -= tf.where(digit > 0, before, 0)
        tied = tf.gather(cumulative, digit, batch_dims=1) - tf.where(digit > 0, before, 0)
        prefix = tf.bitwise.bitwise_or(prefix, tf.bitwise.left_shift(digit, shift))
        candidates &= tf.equal(digits, tf.gather(digit, segments))
    # `candidates` now holds the values equal to their segment's boundary;
    # `remaining` of them are chosen, by position.
    at = lambda per_segment: tf.gather(per_segment, segments)  # noqa: E731
    order = tf.cumsum(tf.cast(candidates, tf.int32), exclusive=True)
    if num_segments > 1:
        starts = tf.math.unsorted_segment_min(order, segments, num_segments)
        order -= at(starts)
    if latest_first:
        order = at(tied) - 1 - order
    chosen = (values < at(prefix)) | (candidates & (order < at(remaining)))
    return chosen & at(ranks > 0)


def erk_keep_counts(sizes, sums, keep):
    """`reference.erk_keep_counts` in TensorFlow ops: the same float64 operations in
    the same order, so the counts are equal. `keep` is an int64 tensor. Call it
    inside a `tf.function` (as the criterion does): its `tf.while_loop` carries
    a shape-changing structure that eager mode refuses."""
    raw = tf.constant(np.asarray(sums, np.float64) / np.maximum(np.asarray(sizes, np.float64), 1))
    sizes = tf.constant(sizes, tf.int64)
    sums = tf.constant(sums, tf.int64)

    def density_of(dense):
        budget = keep - tf.reduce_sum(tf.where(dense, sizes, tf.zeros_like(sizes)))
        weight = tf.reduce_sum(tf.where(dense, tf.zeros_like(sums), sums))
        eps = tf.where(weight > 0, tf.cast(budget, tf.float64) / tf.cast(tf.maximum(weight, 1), tf.float64),
                       tf.constant(0.0, tf.float64))
        return tf.where(dense, tf.constant(1.0, tf.float64), eps * raw)

    def grow(dense):
        return dense | ((density_of(dense) > 1.0) & ~dense)

    dense = tf.while_loop(lambda dense: tf.reduce_any(grow(dense) != dense), grow,
                          (tf.zeros(sizes.shape, tf.bool),))
    dense = dense[0] if isinstance(dense, (tuple, list)) else dense
    counts = tf.floor(density_of(dense) * tf.cast(sizes, tf.float64))
    return tf.minimum(sizes, tf.cast(counts, tf.int64))


class DeviceCriterion:
    """`reference.magnitude_masks` for kernels of fixed shapes, in TensorFlow ops.

    Build it once per set of kernel shapes; call `masks(kernels, sparsity)`
    inside a `tf.function`. Models of fewer than `FLAT_BELOW` weights (or
    `flat=True`) take one radix select over all their weights at once: a small
    graph, quick to trace, compiled with XLA unless `jit_compile=False`.
    Larger ones take the windowed counting search (`window_search`), whose two
    passes `jit_compile` (default: from `XLA_FROM` weights) compiles with XLA.

    Raises:
        ValueError: bad `scope` or `floor`, or 2**31 weights or more in a kernel.
    """

    unit = "weights"
    max_level = 1.0  # the highest sparsity the masks can reach (below 1)

    def __init__(self, shapes, scope="global", floor=0.0, *, jit_compile=None, flat=None):
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.scope = check_scope(scope)
        self.floor = check_floor(floor)
        self.sizes = np.array([int(np.prod(s, dtype=np.int64)) for s in self.shapes], np.int64)
        self.total = int(self.sizes.sum())
        if self.sizes.max(initial=0) >= INT_MAX:
            raise ValueError("The device criterion handles kernels of fewer than 2**31 weights.")
        self.flat = self.total < FLAT_BELOW if flat is None else bool(flat)
        # XLA fuses the radix select's passes: 3-4x faster here, a second to compile.
        self._flat_select = tf.function(self._flat_pruned, jit_compile=jit_compile is not False,
                                        autograph=False)
        if jit_compile is None:
            jit_compile = self.total >= XLA_FROM
        self._search = None if self.flat else WindowSearch(self.sizes, jit_compile=jit_compile)

    def describe(self):
        """What the masks remove, in words: '56,224 weights in 4 kernels'."""
        return f"{self.total:,} weights in {len(self.shapes)} kernels"

    def report(self, masks):
        """Nothing beyond the zero counts `run()` reports for every structure."""
        return {}

    def unreachable(self, level):
        """Why `level` cannot be reached, or None: above `max_level`."""
        if level <= self.max_level + 1e-12:
            return None
        return f"sparsity {level:g} is above what this structure can reach ({self.max_level:g})"

    def removals(self, level):
        """How many weights `level` removes: `round(s * N)`, or per kernel with scope 'layer'."""
        if self.scope == "layer":
            return sum(zero_count(level, int(n)) for n in self.sizes)
        return zero_count(level, self.total)

    def realised(self, level):
        """The fraction of zeros the masks hold at `level`: exact, from the shapes."""
        return self.removals(level) / max(1, self.total)

    def removed(self, masks):
        """How many weights numpy `masks` remove."""
        return sum(count_zeros(m) for m in masks)

    def pattern_problems(self, masks):
        """`(index, count)` for each mask that breaks a pattern: none for single weights."""
        return []

    def problem(self, masks, level, names):
        """Why numpy `masks` (of the weights called `names`) are not what this
        criterion makes at `level`, or None."""
        found, expected = self.removed(masks), self.removals(level)
        if found != expected:
            return f"the masks remove {found} {self.unit}, the target {level} needs {expected} of {self.total}"
        broken = self.pattern_problems(masks)
        if broken:
            index, blocks = broken[0]
            return (f"the pattern is broken: {blocks} blocks of the mask of '{names[index]}' keep too many "
                    f"weights ({len(broken)} kernels so)")
        return None

    # Python loops over kernels build the graph; autograph would only slow the
    # tracing down (it converts every branch function anew).
    @tf.autograph.experimental.do_not_convert
    def masks(self, kernels, sparsity):
        """Float32 masks equal to `reference.magnitude_masks(kernels, sparsity, scope, floor)`.

        `kernels` are tensors of the shapes given at construction; `sparsity`
        a scalar, cast to float64 as Python does.
        """
        flats = [tf.reshape(k, [-1]) for k in kernels]
        sparsity = tf.cast(sparsity, tf.float64)
        if self.flat:
            return self._flat_masks(kernels, flats, sparsity)
        sizes = tf.constant(self.sizes)
        if self.scope == "layer":
            ranks = tf.cast(tf.round(sparsity * tf.cast(sizes, tf.float64)), tf.int64)
            flat_masks = self._search.masks(flats, own_ranks=ranks)
        else:
            k = tf.cast(tf.round(sparsity * float(self.total)), tf.int64)
            if self.floor == 0:
                flat_masks = self._search.masks(flats, rank=k)
            else:
                caps = sizes - self._reserve_counts(k)
                flat_masks = self._search.masks(flats, rank=k, caps=caps, own_ranks=caps, descending=True)
        return [tf.reshape(mask, kernel.shape) for mask, kernel in zip(flat_masks, kernels)]

    def _reserve_counts(self, k):
        keep = erk_keep_counts(self.sizes, [sum(s) for s in self.shapes], self.total - k)
        return tf.cast(tf.floor(self.floor * tf.cast(keep, tf.float64)), tf.int64)

    def _flat_masks(self, kernels, flats, sparsity):
        # Made outside the compiled part: XLA would fold a constant this size slowly.
        segments = tf.repeat(tf.range(len(flats), dtype=tf.int32), self.sizes)
        masks = self._flat_select(flats, sparsity, segments)
        return [tf.reshape(mask, kernel.shape) for mask, kernel in zip(masks, kernels)]

    def _flat_pruned(self, flats, sparsity, segments):
        """The flat masks from one radix select over all weights (small models)."""
        values = tf.concat([abs_bits(flat) for flat in flats], 0)
        m = len(flats)
        sizes = tf.constant(self.sizes)
        if self.scope == "layer":
            ranks = tf.cast(tf.round(sparsity * tf.cast(sizes, tf.float64)), tf.int64)
            pruned = _radix_select(values, segments, m, ranks)
        else:
            k = tf.cast(tf.round(sparsity * float(self.total)), tf.int64)
            if self.floor > 0:
                # Each kernel's largest weights (ties: the earliest) are reserved.
                free = _radix_select(values, segments, m, sizes - self._reserve_counts(k), latest_first=True)
                values = tf.where(free, values, INT_MAX)
            pruned = _radix_select(values, tf.zeros_like(segments), 1, k[None])
        return tf.split(tf.cast(~pruned, tf.float32), self.sizes.tolist())
