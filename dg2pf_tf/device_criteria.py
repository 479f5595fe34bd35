"""The magnitude masks of `criteria.py`, computed with TensorFlow ops where the weights live.

No Keras and no host round trip: `DeviceCriterion.masks` runs inside a compiled
function and returns exactly what `criteria.magnitude_masks` returns for the
same weights (the same count `round(s*N)`, the same tie rule, the same ERK
floor and per-layer scope); the tests hold the two against each other.

How, without sorting N weights. The bits of |w| as an int32 order like the
magnitudes, so "the k-th smallest magnitude" is found by counting:
1. a strided sample of each kernel, sorted, gives a window of values that
   should hold the k-th one;
2. one pass over the weights counts, per kernel, the values below and up to
   the window; a miss moves the window and counts again, so the answer is
   exact whatever the sample said;
3. the values inside the window (a small share of N) are gathered and a radix
   select over them (`bincount` of their digits) finds the k-th value;
4. ties at that value go by position: where a kernel keeps some of its tied
   weights and prunes others, one `where` over that kernel finds the position
   that separates them;
5. one more pass writes every mask: value below the threshold, or equal to it
   and on the pruned side of the position.
Per-layer scope runs the same search with one window per kernel. The ERK floor
caps how many weights of each kernel may be pruned (the rest are its largest,
reserved, ties to the earliest positions); the global search counts each kernel
up to its cap, and a per-kernel search finds where the reserved weights begin
in the kernels whose cap binds below the window.

Passes 2 and 5 are compiled per kernel size with XLA (`jit_compile`) when the
model is large: XLA fuses them into one read of the weights, at the price of
a compilation per distinct kernel size.
"""

import math

import numpy as np
import tensorflow as tf

from dg2pf_tf.criteria import check_floor, check_scope

INT_MAX = 0x7FFFFFFF       # above the bits of every finite |w| (inf is 0x7F800000)
_SAMPLE = 1 << 15          # sample size of a whole-network search
_KERNEL_SAMPLE = 1 << 11   # sample size of a per-kernel search
_CANDIDATES = 1 << 22      # most values a search gathers, over all its windows
_Z = 4.5                   # window half-width, in standard deviations of the sample quantile
_MAX_ROUNDS = 128          # counting rounds before the search gives up
_TARGET = 4096             # values a carried window should hold (per group, at most)
_BLOCK = 256               # weights per block: a window holding few values rereads only its blocks
XLA_FROM = 1 << 21         # models with at least this many weights compile the passes with XLA
FLAT_BELOW = XLA_FROM      # smaller models: one radix select over all their weights at once


def _abs_bits(flat):
    """The bits of |flat| as int32: non-negative, ordered like the magnitudes."""
    return tf.bitwise.bitwise_and(tf.bitcast(tf.cast(flat, tf.float32), tf.int32), INT_MAX)


def _count(flags):
    """Number of True in a flat bool tensor, exact, in a shape XLA reduces fast."""
    n = int(flags.shape[0])
    head = n - n % 8
    total = tf.zeros((), tf.int32)
    if head:
        rows = tf.reshape(tf.cast(flags[:head], tf.float32), [-1, 8])
        total += tf.reduce_sum(tf.cast(tf.reduce_sum(rows, axis=1), tf.int32))
    if n - head:
        total += tf.reduce_sum(tf.cast(flags[head:], tf.int32))
    return total


def _member_round(flat, lo, hi):
    """One counting pass over a kernel: how many magnitudes lie below the window
    [lo, hi] and inside it, and which blocks of `_BLOCK` weights hold one inside."""
    bits = _abs_bits(flat)
    inside = (bits >= lo) & (bits <= hi)
    head = int(flat.shape[0]) // _BLOCK * _BLOCK
    blocks = tf.zeros([0], tf.bool)
    if head:
        eights = tf.reduce_sum(tf.reshape(tf.cast(inside[:head], tf.float32), [-1, 8]), axis=1)
        blocks = tf.reduce_max(tf.reshape(eights, [-1, _BLOCK // 8]), axis=1) > 0
    return _count(bits < lo), _count(inside), blocks


def _member_window(flat, lo, hi):
    bits = _abs_bits(flat)
    return (bits >= lo) & (bits <= hi)


def _member_mask(flat, t, b, v, c):
    """Mask of one kernel: pruned where (value < t, or = t at a position < b) and
    (value < v, or = v at a position >= c)."""
    bits = _abs_bits(flat)
    positions = tf.range(int(flat.shape[0]), dtype=tf.int32)
    pruned = ((bits < t) | ((bits == t) & (positions < b))) & ((bits < v) | ((bits == v) & (positions >= c)))
    return tf.cast(~pruned, tf.float32)


class _Passes:
    """The compiled passes over the weights, one function per kernel size."""

    def __init__(self, jit_compile):
        options = dict(jit_compile=jit_compile, reduce_retracing=False, autograph=False)
        self.round = tf.function(_member_round, **options)
        self.window = tf.function(_member_window, **options)
        self.mask = tf.function(_member_mask, **options)


class _Search:
    """Per group of kernels, the `rank`-th smallest magnitude and how ties split.

    One group of all kernels (`per_kernel=False`: a global threshold) or one
    group per kernel. A kernel i may be capped at `caps[i]` weights: then only
    its `caps[i]` smallest (ties to the latest positions) take part. Within a
    group, ties go to the earliest position (kernels in order) or, with
    `descending`, to the latest.
    """

    def __init__(self, sizes, passes, *, per_kernel, sample):
        self.sizes = np.asarray(sizes, np.int64)
        self.per_kernel = per_kernel
        m = len(self.sizes)
        self.groups = np.arange(m, dtype=np.int32) if per_kernel else np.zeros(m, np.int32)
        self.num_groups = m if per_kernel else 1
        self.passes = passes
        self.positions = [np.arange(0, n, max(1, int(n) // sample(i)), dtype=np.int64)
                          for i, n in enumerate(self.sizes)]
        self.sample_counts = np.array([len(p) for p in self.positions], np.int64)
        self.width = int(self.sample_counts.max())
        whole = self.sample_counts == self.sizes
        self.whole = whole if per_kernel else np.array([whole.all()])
        self.group_cap = max(1 << 16, _CANDIDATES // self.num_groups)
        self.target = max(256, _TARGET // self.num_groups)
        # The last answer of each group, its rank and the density of values
        # around it: the next search starts from a window there.
        g = self.num_groups
        with tf.init_scope():
            self._last = tf.Variable(tf.fill([g], tf.constant(-1, tf.int64)), trainable=False)
            self._last_rank = tf.Variable(tf.zeros([g], tf.int64), trainable=False)
            self._density = tf.Variable(tf.ones([g], tf.float64), trainable=False)

    # -- helpers over kernels and groups -----------------------------------------

    def _per_group(self, member_values):
        if self.per_kernel:
            return member_values
        return tf.reduce_sum(member_values, keepdims=True)

    def _per_member(self, group_values):
        return tf.gather(group_values, tf.constant(self.groups))

    def _group_offsets(self, member_values):
        """Per kernel, the sum of `member_values` over the earlier kernels of its group."""
        if self.per_kernel:
            return tf.zeros_like(member_values)
        return tf.cumsum(member_values, exclusive=True)

    # -- 1. the sample -------------------------------------------------------------

    def _sample_windows(self, flats, ranks, caps, totals, capped):
        samples = [_abs_bits(tf.gather(flat, tf.constant(p))) for flat, p in zip(flats, self.positions)]
        kept = tf.constant(self.sample_counts)
        if capped or self.per_kernel:
            rows = tf.sort(tf.stack([tf.pad(x, [[0, self.width - int(x.shape[0])]], constant_values=INT_MAX)
                                     for x in samples]), axis=-1)
        if capped:
            # A capped kernel contributes only the smallest part of its sample.
            sizes = tf.constant(self.sizes)
            share = tf.math.ceil(tf.cast(kept * caps, tf.float64) / tf.cast(sizes, tf.float64))
            kept = tf.where(caps >= sizes, kept, tf.cast(share, tf.int64))
            rows = tf.where(tf.range(self.width, dtype=tf.int64)[None, :] < kept[:, None], rows, INT_MAX)
            samples = [rows[i, :int(c)] for i, c in enumerate(self.sample_counts)]
        table = rows if self.per_kernel else tf.sort(tf.concat(samples, 0))[None, :]
        counted = self._per_group(kept)
        n = tf.cast(counted, tf.float64)
        p = tf.cast(ranks, tf.float64) / tf.cast(tf.maximum(totals, 1), tf.float64)
        spread = _Z * tf.sqrt(n * p * (1.0 - p)) + 2.0
        low = tf.cast(tf.floor(n * p - spread), tf.int64)
        high = tf.cast(tf.math.ceil(n * p + spread), tf.int64)
        width = int(table.shape[1])
        at = lambda j: tf.cast(tf.gather(table, tf.clip_by_value(j, 0, width - 1),  # noqa: E731
                                         batch_dims=1), tf.int64)
        lo = tf.where(low < 0, tf.zeros_like(low), at(low))
        hi = tf.where(high >= counted, tf.fill(tf.shape(high), tf.constant(INT_MAX, tf.int64)), at(high))
        # Where the sample is the whole group, it holds the answer itself.
        exact = at(ranks - 1)
        whole = tf.constant(self.whole)
        return tf.where(whole, exact, lo), tf.where(whole, exact, hi)

    def _start_windows(self, flats, ranks, caps, totals, capped):
        """Windows around the last answers, moved by the change of rank; from the
        sample where there is no last answer."""
        known = self._last >= 0
        shift = tf.cast(ranks - self._last_rank, tf.float64) / self._density
        half = tf.cast(self.target, tf.float64) / 2.0 / self._density + 2.0 * tf.abs(shift)
        centre = tf.cast(self._last, tf.float64) + shift
        clip = lambda x: tf.cast(tf.clip_by_value(x, 0.0, float(INT_MAX)), tf.int64)  # noqa: E731
        carried = clip(tf.floor(centre - half)), clip(tf.math.ceil(centre + half))
        lo, hi = tf.cond(tf.reduce_all(known), lambda: carried,
                         lambda: self._sample_windows(flats, ranks, caps, totals, capped))
        return tf.where(known, carried[0], lo), tf.where(known, carried[1], hi)

    def _remember(self, lo, hi, inside, value, ranks, trivial):
        """Keeps each solved group's answer and the density of values near it."""
        density = tf.maximum(tf.cast(self._per_group(inside), tf.float64), 1.0) / tf.cast(hi - lo + 1, tf.float64)
        self._density.assign(tf.where(trivial, self._density, density))
        self._last.assign(tf.where(trivial, self._last, value))
        self._last_rank.assign(tf.where(trivial, self._last_rank, ranks))

    # -- 2. counting until each window holds its answer ---------------------------

    def _round(self, flats, lo, hi, active, blocks):
        lo_m, hi_m = (tf.unstack(tf.cast(self._per_member(x), tf.int32)) for x in (lo, hi))
        active = tf.unstack(self._per_member(active))
        below, inside, found = [], [], []
        for i, flat in enumerate(flats):
            b, c, f = tf.cond(active[i],
                              lambda i=i, flat=flat: self.passes.round(flat, lo_m[i], hi_m[i]),
                              lambda i=i: (tf.zeros((), tf.int32), tf.zeros((), tf.int32), blocks[i]))
            below.append(b)
            inside.append(c)
            found.append(f)
        return tf.cast(tf.stack(below), tf.int64), tf.cast(tf.stack(inside), tf.int64), found

    def _narrow(self, flats, ranks, caps, lo, hi, done):
        """Counts until every group's window holds its answer and few values.
        Returns the windows, per kernel the counts below and inside them, and
        the blocks holding values inside."""
        m = len(self.sizes)

        def body(rounds, lo, hi, bottom, top, done, below, inside, blocks):
            b, c, found = self._round(flats, lo, hi, ~done, blocks)
            under = self._per_group(tf.minimum(b, caps)) >= ranks
            over = self._per_group(tf.minimum(b + c, caps)) < ranks
            crowded = ~under & ~over & (lo < hi) & (self._per_group(c) > self.group_cap)
            finished = done | ~(under | over | crowded)
            fresh = self._per_member(finished & ~done)
            below = tf.where(fresh, b, below)
            inside = tf.where(fresh, c, inside)
            step = tf.minimum(hi - lo + 1, INT_MAX) * 4
            top = tf.where(under, lo - 1, tf.where(crowded, hi, top))
            bottom = tf.where(over, hi + 1, tf.where(crowded, lo, bottom))
            new_lo = tf.where(under, tf.maximum(bottom, lo - step), bottom)
            new_hi = tf.where(under, top, tf.where(over, tf.minimum(top, hi + step),
                                                   bottom + (top - bottom) // 2))
            return (rounds + 1, tf.where(finished, lo, new_lo), tf.where(finished, hi, new_hi),
                    bottom, top, finished, below, inside, found)

        zeros = tf.zeros([m], tf.int64)
        blocks = [tf.zeros([int(n) // _BLOCK], tf.bool) for n in self.sizes]
        start = (tf.constant(0), lo, hi, tf.zeros_like(lo), tf.fill(tf.shape(hi), tf.constant(INT_MAX, tf.int64)),
                 done, zeros, zeros, blocks)
        rounds, lo, hi, _, _, done, below, inside, blocks = tf.while_loop(
            lambda rounds, lo, hi, bottom, top, done, *_: ~tf.reduce_all(done),
            body, start, maximum_iterations=_MAX_ROUNDS)
        tf.debugging.assert_equal(tf.reduce_all(done), True, message=(
            "dg2pf_tf: the device mask search did not converge; please report this."))
        return lo, hi, below, inside, blocks

    # -- 3. the values inside the windows ------------------------------------------

    def _inside(self, i, flat, lo, hi, count, blocks):
        """The magnitudes (bits) of kernel i inside [lo, hi]: from the flagged
        blocks when they are few, else from a pass over the whole kernel."""
        n = int(self.sizes[i])
        head = n // _BLOCK * _BLOCK

        def from_blocks():
            found = tf.zeros([0], tf.int32)
            if head:
                rows = _abs_bits(tf.gather(tf.reshape(flat[:head], [-1, _BLOCK]), tf.where(blocks)[:, 0]))
                found = tf.boolean_mask(rows, (rows >= lo) & (rows <= hi))
            if n > head:
                tail = _abs_bits(flat[head:])
                found = tf.concat([found, tf.boolean_mask(tail, (tail >= lo) & (tail <= hi))], 0)
            return found

        def from_kernel():
            return _abs_bits(tf.boolean_mask(flat, self.passes.window(flat, lo, hi)))

        return tf.cond(count * _BLOCK // 2 <= n, from_blocks, from_kernel)

    def _gather(self, flats, lo, hi, active, inside, blocks):
        lo_m, hi_m = (tf.unstack(tf.cast(self._per_member(x), tf.int32)) for x in (lo, hi))
        active, inside = tf.unstack(self._per_member(active)), tf.unstack(inside)
        values, owners = [], []
        for i, flat in enumerate(flats):
            found = tf.cond(active[i],
                            lambda i=i, flat=flat: self._inside(i, flat, lo_m[i], hi_m[i], inside[i], blocks[i]),
                            lambda: tf.zeros([0], tf.int32))
            values.append(found)
            owners.append(tf.fill(tf.shape(found), i))
        return tf.concat(values, 0), tf.concat(owners, 0)

    def _kth(self, values, owners, num, base, top, ranks):
        """Per segment s (the values with owners == s), its ranks[s]-th smallest
        value (1-based) and how many of its values are smaller. Every value of
        s lies in [base[s], top[s]]; a radix select over 8- or 16-bit digits."""
        digit = 16 if num <= 16 else 8
        bins = 1 << digit
        span = tf.cast(tf.maximum(top - base, 0), tf.int32)
        length = tf.reduce_sum(tf.cast(span[:, None] >= tf.bitwise.left_shift(1, tf.range(31))[None, :],
                                       tf.int32), axis=1)
        levels = (length + digit - 1) // digit
        relative = values - tf.cast(tf.gather(base, owners), tf.int32)
        ranks = tf.cast(ranks, tf.int32)
        prefix = tf.zeros([num], tf.int32)
        smaller = tf.zeros([num], tf.int32)
        for level in range(math.ceil(31 / digit)):
            shift = (levels - level - 1) * digit  # per segment; < 0 once it is resolved
            own_shift = tf.gather(shift, owners)
            digits = tf.where(own_shift >= 0, tf.bitwise.bitwise_and(
                tf.bitwise.right_shift(relative, tf.maximum(own_shift, 0)), bins - 1), 0)
            hist = tf.reshape(tf.math.bincount(owners * bins + digits, minlength=num * bins,
                                               maxlength=num * bins), [num, bins])
            cumulative = tf.cumsum(hist, axis=1)
            chosen = tf.minimum(tf.reduce_sum(tf.cast(cumulative < ranks[:, None], tf.int32), axis=1), bins - 1)
            before = tf.where(chosen > 0, tf.gather(cumulative, tf.maximum(chosen - 1, 0), batch_dims=1), 0)
            ranks, smaller = ranks - before, smaller + before
            prefix += tf.where(shift >= 0, tf.bitwise.left_shift(chosen, tf.maximum(shift, 0)), 0)
            keep = tf.equal(digits, tf.gather(chosen, owners))
            values, owners, relative = (tf.boolean_mask(t, keep) for t in (values, owners, relative))
        return tf.cast(base, tf.int64) + tf.cast(prefix, tf.int64), tf.cast(smaller, tf.int64)

    # -- 4. ties -------------------------------------------------------------------

    def _tie_limits(self, flats, value, index, ties):
        """Per kernel, the position of its `index`-th weight (0-based, in position
        order) equal to `value`: 0 when index <= 0, the kernel's size when index
        >= ties. Only kernels that split their ties run a `where`."""
        limits = []
        value, index, ties = (tf.unstack(x) for x in (value, index, ties))
        for i, flat in enumerate(flats):
            n = int(self.sizes[i])
            split = (index[i] > 0) & (index[i] < ties[i])
            found = tf.cond(split,
                            lambda i=i, flat=flat: tf.cast(tf.gather(tf.where(tf.equal(
                                _abs_bits(flat), tf.cast(value[i], tf.int32)))[:, 0], index[i]), tf.int32),
                            lambda i=i: tf.where(index[i] <= 0, 0, n))
            limits.append(found)
        return tf.stack(limits)

    # -- the whole search ------------------------------------------------------------

    def solve(self, flats, ranks, caps=None, descending=False):
        """Per kernel `(value, limit, reserve_value, reserve_limit, binding_below)`.

        A kernel's selected weights are those with magnitude < value, or = value
        at a position < limit (with `descending`: >= limit), among the weights
        that take part: magnitude < reserve_value, or = reserve_value at a
        position >= reserve_limit. `binding_below` marks capped kernels whose
        cap binds below the window: their reserve boundary is not known here
        (`DeviceCriterion` finds it with a per-kernel search).
        """
        capped = caps is not None
        sizes = tf.constant(self.sizes)
        caps = caps if capped else sizes
        ranks = tf.cast(ranks, tf.int64)
        totals = self._per_group(caps)
        none, every = ranks <= 0, ranks >= totals
        trivial = none | every
        lo, hi = self._start_windows(flats, tf.clip_by_value(ranks, 1, tf.maximum(totals, 1)),
                                     caps, totals, capped)
        lo, hi, below, inside, blocks = self._narrow(flats, ranks, caps, lo, hi, trivial)
        point = lo >= hi
        gathered = ~trivial & ~point
        values, owners = self._gather(flats, lo, hi, gathered, inside, blocks)
        m = len(self.sizes)
        owned = lambda flags: tf.math.unsorted_segment_sum(tf.cast(flags, tf.int64), owners, m)  # noqa: E731
        lo_m, hi_m, point_m = self._per_member(lo), self._per_member(hi), self._per_member(point)
        trivial_m, every_m = self._per_member(trivial), self._per_member(every)
        # A capped kernel takes part with its first `room` weights of the window
        # (ties at the boundary: the latest positions).
        room = tf.clip_by_value(caps - below, 0, inside)
        takes_part = tf.ones_like(values, tf.bool)
        boundary = tf.fill([m], tf.constant(INT_MAX + 1, tf.int64))
        at_boundary = tf.zeros([m], tf.int64)
        if capped:
            split = (room > 0) & (room < inside) & ~trivial_m
            found, smaller = self._kth(values, owners, m, lo_m, hi_m, tf.where(split, room, tf.zeros_like(room)))
            binds_below = (below >= caps) & (caps < sizes) & ~trivial_m
            boundary = tf.where(split, tf.where(point_m, lo_m, found),
                                tf.where(binds_below, tf.constant(-1, tf.int64), boundary))
            at_boundary = room - tf.where(point_m, tf.zeros_like(smaller), smaller)
            own_boundary = tf.gather(boundary, owners)
            equal = tf.cast(tf.equal(tf.cast(values, tf.int64), own_boundary), tf.int64)
            seen = tf.cumsum(equal, exclusive=True) - tf.gather(tf.cumsum(owned(equal), exclusive=True), owners)
            takes_part = (tf.cast(values, tf.int64) < own_boundary) | (
                (equal > 0) & (seen < tf.gather(at_boundary, owners)))
        before = self._per_group(tf.minimum(below, caps))
        chosen, _ = self._kth(tf.boolean_mask(values, takes_part),
                              tf.boolean_mask(tf.gather(tf.constant(self.groups), owners), takes_part),
                              self.num_groups, lo, hi, tf.where(gathered, ranks - before, tf.zeros_like(ranks)))
        value = tf.where(point, lo, chosen)
        value = tf.where(none, tf.constant(-1, tf.int64), tf.where(every, tf.constant(INT_MAX, tf.int64), value))
        self._remember(lo, hi, inside, value, ranks, trivial)
        value_m = self._per_member(value)
        # Per kernel: weights below the value, equal to it, and equal ones taking part.
        own_value = tf.gather(value_m, owners)
        less = tf.where(every_m, sizes, below + owned(tf.cast(values, tf.int64) < own_value))
        ties = tf.where(point_m, inside, owned(tf.cast(values, tf.int64) == own_value))
        ties = tf.where(trivial_m, tf.zeros_like(ties), ties)
        share = tf.clip_by_value(caps - less, 0, ties)
        wanted = self._per_member(ranks - self._per_group(tf.minimum(less, caps)))
        if descending:
            taken = tf.clip_by_value(wanted, 0, share)
            limit = self._tie_limits(flats, value_m, ties - taken, ties)
        else:
            taken = tf.clip_by_value(wanted - self._group_offsets(share), 0, share)
            limit = self._tie_limits(flats, value_m, ties - share + taken, ties)
        limit = tf.where(every_m, tf.cast(sizes, tf.int32), limit)
        if not capped:
            return value_m, limit, None, None, None
        # Where the cap binds: at the value, or inside the window below it (a cap
        # that binds below the window is marked; see `DeviceCriterion`).
        at_value = (share < ties) & (less < caps)
        inside_below = split & ~at_value & (boundary < value_m)
        zero = tf.zeros_like(ties)
        reserve_value = tf.where(at_value, value_m, tf.where(inside_below, boundary,
                                                             tf.constant(INT_MAX, tf.int64)))
        reserve_ties = tf.where(at_value, ties, tf.where(inside_below, tf.where(point_m, inside, owned(equal)),
                                                         zero))
        reserve_part = tf.where(at_value, share, tf.where(inside_below, at_boundary, zero))
        reserve_limit = self._tie_limits(flats, reserve_value, reserve_ties - reserve_part, reserve_ties)
        return value_m, limit, reserve_value, reserve_limit, binds_below | (every_m & (caps < sizes))


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
    """`criteria.erk_keep_counts` in TensorFlow ops: the same float64 operations in
    the same order, so the counts are equal. `keep` is an int64 tensor."""
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
    """`criteria.magnitude_masks` for kernels of fixed shapes, in TensorFlow ops.

    Build it once per set of kernel shapes; call `masks(kernels, sparsity)`
    inside a `tf.function`. Models of fewer than `FLAT_BELOW` weights (or
    `flat=True`) take one radix select over all their weights at once: a small
    graph, quick to trace, compiled with XLA unless `jit_compile=False`.
    Larger ones take the windowed counting search, whose passes `jit_compile`
    (default: from `XLA_FROM` weights) compiles with XLA.

    Raises:
        ValueError: bad `scope` or `floor`, or 2**31 weights or more in a kernel.
    """

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
        passes = _Passes(bool(jit_compile))
        self._passes = passes
        m = len(self.shapes)
        each = lambda i: _KERNEL_SAMPLE  # noqa: E731
        every = lambda i: max(1, int(round(_SAMPLE * self.sizes[i] / max(self.total, 1))))  # noqa: E731
        self._per_kernel = _Search(self.sizes, passes, per_kernel=True, sample=each)
        self._global = _Search(self.sizes, passes, per_kernel=False, sample=every)

    # Python loops over kernels build the graph; autograph would only slow the
    # tracing down (it converts every branch function anew).
    @tf.autograph.experimental.do_not_convert
    def masks(self, kernels, sparsity):
        """Float32 masks equal to `criteria.magnitude_masks(kernels, sparsity, scope, floor)`.

        `kernels` are tensors of the shapes given at construction; `sparsity`
        a scalar, cast to float64 as Python does.
        """
        flats = [tf.reshape(k, [-1]) for k in kernels]
        sparsity = tf.cast(sparsity, tf.float64)
        if self.flat:
            return self._flat_masks(kernels, flats, sparsity)
        sizes = tf.constant(self.sizes)
        no_reserve = (tf.fill([len(flats)], INT_MAX), tf.zeros([len(flats)], tf.int32))
        if self.scope == "layer":
            ranks = tf.cast(tf.round(sparsity * tf.cast(sizes, tf.float64)), tf.int64)
            value, limit, *_ = self._per_kernel.solve(flats, ranks)
            return self._write(kernels, flats, (value, limit), no_reserve)
        k = tf.cast(tf.round(sparsity * float(self.total)), tf.int64)
        if self.floor == 0:
            value, limit, *_ = self._global.solve(flats, k[None])
            return self._write(kernels, flats, (value, limit), no_reserve)
        caps = sizes - self._reserve_counts(k)
        value, limit, reserve_value, reserve_limit, below = self._global.solve(flats, k[None], caps)
        # Kernels whose cap binds below the global window: find their boundary.
        bound_value, bound_limit, *_ = self._per_kernel.solve(
            flats, tf.where(below, caps, tf.zeros_like(caps)), descending=True)
        reserve_value = tf.where(below, bound_value, reserve_value)
        reserve_limit = tf.where(below, bound_limit, reserve_limit)
        return self._write(kernels, flats, (value, limit), (reserve_value, reserve_limit))

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
        values = tf.concat([_abs_bits(flat) for flat in flats], 0)
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

    def _write(self, kernels, flats, selected, reserve):
        value, limit = selected
        reserve_value, reserve_limit = reserve
        clip = lambda x: tf.cast(tf.clip_by_value(tf.cast(x, tf.int64), -1, INT_MAX), tf.int32)  # noqa: E731
        value, reserve_value = clip(value), clip(reserve_value)
        masks = []
        value, limit, reserve_value, reserve_limit = (
            tf.unstack(x) for x in (value, limit, reserve_value, reserve_limit))
        for i, (kernel, flat) in enumerate(zip(kernels, flats)):
            mask = self._passes.mask(flat, value[i], tf.cast(limit[i], tf.int32),
                                     reserve_value[i], tf.cast(reserve_limit[i], tf.int32))
            masks.append(tf.reshape(mask, kernel.shape))
        return masks
