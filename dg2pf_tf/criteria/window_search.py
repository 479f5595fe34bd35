"""Exact magnitude selection over many large kernels without sorting them: windows and counts.

The bits of |w| as an int32 order like the magnitudes, so "the k-th smallest
magnitude" is found by counting. Two selections run together:
- per kernel ("own"): kernel i's `own_ranks[i]` smallest magnitudes (ties to
  the earliest positions, or with `descending` to the latest): the per-layer
  scope, and the ERK floor's reserve (each kernel's free weights are its
  smallest ones, its largest are reserved);
- over all kernels ("global"): the `rank` smallest, where kernel i takes part
  with at most its `caps[i]` free weights (ties to the earliest kernel, then
  position).

Each selection keeps a window of magnitudes that should hold its answer,
carried from the previous call (training moves the answer a little each
step) or, the first time and after a jump of the rank (a schedule's next
epoch), read off a strided sample. One compiled pass over all kernels counts
the magnitudes below and up to every window; the counts prove a bracket that
holds the answer, and the next window is a secant estimate inside it (where
the answer would be if the magnitudes were spread evenly), a move past the
edge of a carried window that missed, or, once an estimate has missed far,
half the bracket; until every window holds its answer and few values
(`_step`). A sample's window that reaches past its largest value ends at twice
that, so that counts bound a tail from the first pass. With an ERK floor, the
global window stops at each kernel's settled reserve, and a kernel all
reserved takes no part in it. The values inside the windows (few) are then
gathered, by the rows of `_BLOCK` weights the pass flagged, and sorted;
that gives each answer value and how its ties split. Where ties split inside a
kernel, one more pass finds the position that separates them. A last compiled
pass writes every mask. The graph holds a handful of operations per kernel and
no branch per kernel, so it traces and compiles in seconds at any size.
"""

import functools
import typing

import numpy as np
import tensorflow as tf

INT_MAX = 0x7FFFFFFF      # above the bits of every finite |w| (inf is 0x7F800000)
_LARGEST = 0x7F7FFFFF     # the bits of the largest finite float32
_BLOCK = 16               # weights per block (< 256, see `_count_pass`): the gather reads only flagged blocks
_SAMPLE = 1 << 11         # strided sample of each kernel, for a first window
_Z = 4.5                  # first window half-width, in standard deviations of the sample quantile
_TARGET = 4096            # values the carried windows of a call hold, in all
_CROWDED = 16             # a window holding more than this many targets narrows before gathering
_WANT = 4                 # a crowded window narrows to hold about this many targets
_SHRINK = 128             # a guess keeps at least this share of a crowded window: 1 / 128
_FEW = 64                 # a bracket holding fewer than this many crowded windows is searched by estimate
_NEAR = 16               # a rank moved by more than this many targets starts from a sample
_JUMP = 64                # ... or by more than this share of its values (1 / 64), past one target
_PATIENCE = 16            # rounds after which a window that holds the answer is narrow enough
_TRUSTING = 24            # rounds after which only halvings narrow: near misses could stall estimates
_MAX_ROUNDS = 96
_SHIFT = 31               # sort keys: kernel index above the 31 bits of a magnitude


def abs_bits(flat):
    """The bits of |flat| as int32: non-negative, ordered like the magnitudes."""
    if flat.dtype != tf.float32:
        flat = tf.cast(flat, tf.float32)
    return tf.bitwise.bitwise_and(tf.bitcast(flat, tf.int32), INT_MAX)


# The passes below build a handful of operations per kernel: tracing costs
# about half a millisecond an operation, and models have hundreds of kernels.

def _block_rows(flat):
    """|flat|'s bits as [blocks, _BLOCK] rows, the last one padded with INT_MAX
    (never below a window; inside one only when it reaches INT_MAX), and the
    number of padded entries."""
    pad = -int(flat.shape[0]) % _BLOCK
    bits = abs_bits(flat)
    if pad:
        bits = tf.pad(bits, [[0, pad]], constant_values=INT_MAX)
    return tf.reshape(bits, [-1, _BLOCK]), pad


def _count_pass(flats, own_lo, own_hi, own_ranks, lo, tops, own_gathers, gathers, *, own=True, shared=True):
    """Per kernel: magnitudes below its own window, inside it, below the global one
    and inside it ([m, 4] int32); and per kernel, which blocks of `_BLOCK` weights
    hold a value inside a window to gather ([blocks] bool): kernel i's own one
    where `own_gathers[i]`, the global one where `gathers` (up to the own
    window's end where that holds the kernel's `own_ranks[i]`-th value, its last
    free one: the weights above are reserved). The global window starts at `lo`
    for all and ends at `tops[i]` in kernel i. A window switched off (`own`,
    `shared`) is not counted: zeros.

    Every indicator (below a window, up to its top) of a block takes 8 bits of
    one int32, so one reduction over [blocks, _BLOCK] rows counts them all: XLA
    then reads the weights once (it does not fuse sibling reductions: one per
    count read them once each, 3x slower here)."""
    own_lo, own_hi, own_ranks, tops, own_gathers = (
        tf.unstack(x) for x in (own_lo, own_hi, own_ranks, tops, own_gathers))
    counts, blocks = [], []
    for i, flat in enumerate(flats):
        rows, pad = _block_rows(flat)
        edges = (([rows < own_lo[i], rows <= own_hi[i]] if own else [])
                 + ([rows < lo, rows <= tops[i]] if shared else []))
        packed = tf.reduce_sum(tf.add_n([tf.cast(edge, tf.int32) * (1 << 8 * j) for j, edge in enumerate(edges)]),
                               axis=1)
        fields = [tf.bitwise.bitwise_and(tf.bitwise.right_shift(packed, 8 * j), 255) for j in range(len(edges))]
        flagged = tf.zeros([int(rows.shape[0])], tf.bool)
        zero = tf.zeros([], tf.int32)
        below_own = upto_own = zero
        if own:
            below, upto = fields[0], fields[1]
            below_own = tf.reduce_sum(below)
            upto_own = tf.reduce_sum(upto) - pad * tf.cast(own_hi[i] >= INT_MAX, tf.int32)
            flagged |= (upto > below) & own_gathers[i]
        counts += [below_own, upto_own - below_own]
        if shared:
            below, upto = fields[-2], fields[-1]
            counts += [tf.reduce_sum(below), tf.reduce_sum(upto - below) - pad * tf.cast(tops[i] >= INT_MAX, tf.int32)]
            if own:
                # Where the own window holds the kernel's last free weight, the
                # weights above its end are reserved: no gather needs them.
                holds = (below_own < own_ranks[i]) & (own_ranks[i] <= upto_own) & (own_hi[i] < tops[i])
                upto = tf.where(holds, fields[1], upto)
            flagged |= (upto > below) & gathers
        else:
            counts += [zero, zero]
        blocks.append(flagged)
    return tf.reshape(tf.stack(counts), [len(flats), 4]), blocks


def _block_values(flat, ids):
    """The `_BLOCK` values of each block `ids` (int32) of `flat` ([len(ids), _BLOCK];
    past its end, zeros), read as rows: many times faster than one value at a time."""
    n = int(flat.shape[0])
    full = n // _BLOCK
    rest = tf.reshape(tf.pad(flat[full * _BLOCK:], [[0, (_BLOCK - n % _BLOCK) % _BLOCK]]), [-1, _BLOCK])
    if not full:
        return tf.broadcast_to(rest, [tf.size(ids), _BLOCK])
    whole = tf.gather(tf.reshape(flat[:full * _BLOCK], [full, _BLOCK]), tf.minimum(ids, full - 1))
    if n % _BLOCK == 0:
        return whole
    return tf.where((ids == full)[:, None], rest, whole)


def _mask_pass(flats, cuts):
    """Masks: pruned where (value < t, or = t at a position < b) and (value < v, or
    = v at a position >= c), with (t, b, v, c) the rows of `cuts`."""
    masks = []
    for flat, cut in zip(flats, tf.unstack(cuts)):
        t, b, v, c = tf.unstack(cut)
        bits = abs_bits(flat)
        positions = tf.range(int(flat.shape[0]), dtype=tf.int32)
        pruned = ((bits < t) | ((bits == t) & (positions < b))) & ((bits < v) | ((bits == v) & (positions >= c)))
        masks.append(tf.cast(~pruned, tf.float32))
    return masks


def _tie_positions(flats, values, indices):
    """Per kernel i and query j, the position of its `indices[i, j]`-th weight (0-based,
    in position order) whose magnitude bits equal `values[i, j]`; its size if none."""
    rows = []
    for flat, value, index in zip(flats, tf.unstack(values), tf.unstack(indices)):
        bits = abs_bits(flat)
        end = tf.constant([int(flat.shape[0])], tf.int64)
        row = []
        for j in range(2):
            where = tf.concat([tf.where(tf.equal(bits, value[j]))[:, 0], end], 0)
            row.append(tf.gather(where, tf.minimum(index[j], tf.shape(where, tf.int64)[0] - 1)))
        rows.append(tf.stack(row))
    return tf.stack(rows)


class _Search(typing.NamedTuple):
    """Where one selection stands, per group: the window `lo..hi` to count next;
    the bracket `bottom..top` that the counts proved to hold the answer, with
    the values below `bottom` (`under_bottom`) and up to `top` (`upto_top`);
    `guessed`: the window is an estimate; `secant`: estimates are trusted (none
    has missed far since a window that was not one held the answer); `done`."""

    lo: tf.Tensor
    hi: tf.Tensor
    bottom: tf.Tensor
    top: tf.Tensor
    under_bottom: tf.Tensor
    upto_top: tf.Tensor
    guessed: tf.Tensor
    secant: tf.Tensor
    done: tf.Tensor

    @classmethod
    def start(cls, window, done, total):
        """A search from `window`; `total`: the values up to INT_MAX (all of them)."""
        lo, hi = window
        return cls(lo, hi, tf.zeros_like(lo), tf.fill(tf.shape(lo), tf.constant(INT_MAX, tf.int64)),
                   tf.zeros_like(lo), tf.cast(total, tf.int64), tf.zeros_like(done), tf.ones_like(done), done)


def _below_ceiling(search, ceiling):
    """`search` ([1] groups) with its window and bracket ending at `ceiling` at
    the latest: no value above it counts (each kernel's free weights end in its
    settled own window), so the count up to it is the total already."""
    ceiling = tf.maximum(ceiling, search.bottom)
    clip = lambda x: tf.where(search.done, x, tf.minimum(x, ceiling))  # noqa: E731
    return search._replace(lo=clip(search.lo), hi=clip(search.hi), top=clip(search.top))


def _magnitude(bits):
    """The float64 magnitude of int64 `bits` (those of |w|; above the finite ones: the largest)."""
    finite = tf.clip_by_value(bits, 0, _LARGEST)
    return tf.cast(tf.bitcast(tf.cast(finite, tf.int32), tf.float32), tf.float64)


def _bits(magnitude):
    """The int64 bits of the float32 nearest float64 `magnitude` (clipped to the finite ones)."""
    value = tf.cast(tf.clip_by_value(magnitude, 0.0, float(np.finfo(np.float32).max)), tf.float32)
    return tf.cast(tf.bitcast(value, tf.int32), tf.int64)


def _step(search, below, upto, inside, rank, total, crowded_at, want, patient=True, trusting=True):
    """The next `_Search` of every unfinished group, from the counts of its
    window: values below `lo`, up to `hi`, and `inside` (the values that make it
    crowded: all of them, or for the global window its free ones).

    A group is finished when `below < rank <= upto` and its window holds at
    most `crowded_at` values (or one value; or any number, once not `patient`:
    many ties take a bisection per bit to part, and the gather is exact at any
    size). After `trusting` ends, no estimate is made: halvings bound the
    rounds left. Otherwise the counts shrink the
    bracket, and the next window is, in this order: the whole bracket, if it
    holds few enough values; once an estimate has missed by more than its
    window held (values bunched, not spread evenly: ties, exact zeros, a thin
    tail), and until a window that was not an estimate holds the answer, half
    the bracket (from 0: zero alone); past the edge that missed, four widths
    (or twice the distance the counts suggest) away, while that is short of the
    bracket's end and the bracket holds many values (a carried window that
    missed a little); else about `want` values (a 128th of a crowded window's
    at least) around where the answer would be if the bracket's values were
    spread evenly (a secant step, by magnitude within a few powers of two, else
    by bits), widened past the middle of the `total` values to a second
    estimate that takes them to thin out like a normal's tail.
    """
    lo, hi = search.lo, search.hi
    under, over = rank <= below, rank > upto
    missed = under | over
    crowded = ~missed & (inside > crowded_at) & (lo < hi) & patient
    finished = search.done | ~(missed | crowded)
    bottom = tf.where(over, hi + 1, tf.where(under, search.bottom, lo))
    under_bottom = tf.where(over, upto, tf.where(under, search.under_bottom, below))
    top = tf.where(under, lo - 1, tf.where(over, search.top, hi))
    upto_top = tf.where(under, below, tf.where(over, search.upto_top, upto))
    # An estimate that missed by more than the values it held is not trusted
    # (values bunch there: ties, exact zeros, a thin tail) until a window that
    # was not an estimate holds the answer: in a narrower bracket values spread
    # more evenly.
    gap = tf.where(under, below - rank + 1, rank - upto)
    far = gap > tf.maximum(upto - below, tf.cast(want, tf.int64))
    secant = (search.secant | (~search.guessed & ~missed)) & ~(search.guessed & missed & far) & trusting
    f64 = lambda x: tf.cast(x, tf.float64)  # noqa: E731
    clip = lambda x: tf.cast(tf.clip_by_value(x, f64(bottom), f64(top)), tf.int64)  # noqa: E731
    held = f64(upto_top - under_bottom)
    # Past the edge that missed, by the window's own density.
    width = f64(hi - lo + 1)
    reach = tf.maximum(4.0 * width, 2.0 * f64(gap) * width / tf.maximum(f64(upto - below), 1.0) + width)
    past_lo = tf.where(under, clip(f64(lo) - reach), bottom)
    past_hi = tf.where(under, top, clip(f64(hi) + reach))
    short = missed & ((past_lo > bottom) | (past_hi < top)) & (held > _FEW * f64(crowded_at))
    # A secant estimate in the bracket: by magnitude within a few powers of two
    # (the bits' scale doubles at each, magnitudes spread smoothly), by bits
    # across more (an outlier or no upper bound yet: the bits' log-like scale).
    low, high = _magnitude(bottom), _magnitude(top)
    linear = high <= 4.0 * low
    low, high = tf.where(linear, low, f64(bottom)), tf.where(linear, high, f64(top))
    at = low + (f64(rank - under_bottom) - 0.5) * (high - low) / tf.maximum(held, 1.0)
    values = tf.maximum(tf.where(crowded, f64(inside), held), 1.0)
    half = 0.5 * (high - low) * tf.minimum(tf.maximum(want / values, 1.0 / _SHRINK), 0.5)
    # Past the middle of the values they thin out like a normal's tail: there a
    # second estimate takes the counts above as log-linear in the squared
    # magnitude, and the window spans both.
    above = lambda count: f64(total - count) + 0.5  # noqa: E731
    share = tf.math.log(above(under_bottom) / above(rank)) / tf.maximum(
        tf.math.log(above(under_bottom) / above(upto_top)), 1e-12)
    tail_at = tf.sqrt(low * low + tf.clip_by_value(share, 0.0, 1.0) * (high * high - low * low))
    tail = linear & (2 * rank > total)
    first, last = tf.where(tail, tf.minimum(at, tail_at), at), tf.where(tail, tf.maximum(at, tail_at), at)
    to_bits = lambda x: tf.where(linear, f64(_bits(x)), x)  # noqa: E731
    guess_lo, guess_hi = clip(tf.floor(to_bits(first - half))), clip(tf.math.ceil(to_bits(last + half)))
    at = to_bits(0.5 * (first + last))
    # Halves of the bracket: the one that holds the estimate; zero alone first.
    middle = tf.where(bottom > 0, bottom + (top - bottom) // 2, 0)
    lower = (at <= f64(middle)) | (bottom == 0)
    whole = held <= f64(crowded_at)
    bisect = ~whole & (~secant | (guess_hi - guess_lo >= top - bottom))
    new_lo = tf.where(whole, bottom, tf.where(bisect, tf.where(lower, bottom, middle + 1),
                                              tf.where(short, past_lo, guess_lo)))
    new_hi = tf.where(whole, top, tf.where(bisect, tf.where(lower, middle, top),
                                           tf.where(short, past_hi, guess_hi)))
    guessed = ~whole & ~bisect & ~short
    keep = lambda now, new: tf.where(finished, now, new)  # noqa: E731
    return _Search(keep(lo, new_lo), keep(hi, new_hi), bottom, top, under_bottom, upto_top,
                   keep(search.guessed, guessed), secant, finished)


class _Memory:
    """Per group, the last answer, its rank, the density of values around it and how
    far it moved beyond what the change of rank explains (signed): where the next
    window starts."""

    def __init__(self, target, totals):
        self.target = float(target)
        groups = len(totals)
        # A move of the rank by more than this starts from a sample: a carried
        # window would be widened by twice the move, past the values' end in a
        # small kernel (in one of a few hundred values, any window is cheap).
        self.reach = np.clip(np.asarray(totals) // _JUMP, self.target, _NEAR * self.target).astype(np.int64)
        with tf.init_scope():
            self.value = tf.Variable(tf.fill([groups], tf.constant(-1, tf.int64)), trainable=False)
            self.rank = tf.Variable(tf.zeros([groups], tf.int64), trainable=False)
            self.density = tf.Variable(tf.ones([groups], tf.float64), trainable=False)
            self.drift = tf.Variable(tf.zeros([groups], tf.float64), trainable=False)

    def near(self, rank):
        """True for groups whose last answer is a good start for `rank`: one
        known, for a rank that moved by little (as a training step moves it,
        not as a jump of the schedule from one epoch to the next does)."""
        return (self.value >= 0) & (tf.abs(rank - self.rank) <= self.reach)

    def known(self, rank, active):
        """True for groups that need no sample: inactive, or `near` their last answer."""
        return self.near(rank) | ~active

    def window(self, rank, active, fresh):
        """`(lo, hi)` around the last answers, moved by the change of rank; from
        `fresh()` (a sample) for active groups not `near` their last answer."""
        known = self.known(rank, active)
        shift = tf.cast(rank - self.rank, tf.float64) / self.density
        # Training moves the answer about as far each step: expect that move again.
        half = self.target / 2.0 / self.density + 2.0 * tf.abs(shift) + 0.5 * tf.abs(self.drift)
        centre = tf.cast(self.value, tf.float64) + shift + self.drift
        clip = lambda x: tf.cast(tf.clip_by_value(x, 0.0, float(INT_MAX)), tf.int64)  # noqa: E731
        carried = clip(tf.floor(centre - half)), clip(tf.math.ceil(centre + half))
        lo, hi = tf.cond(tf.reduce_all(known), lambda: carried, fresh)
        return tf.where(known, carried[0], lo), tf.where(known, carried[1], hi)

    def keep(self, value, rank, window, inside, solved):
        lo, hi = window
        density = tf.maximum(tf.cast(inside, tf.float64), 1.0) / tf.cast(hi - lo + 1, tf.float64)
        moved = tf.cast(value - self.value, tf.float64) - tf.cast(rank - self.rank, tf.float64) / density
        # After a jump the move says nothing of the next step's: no drift then.
        self.drift.assign(tf.where(solved, tf.where(self.near(rank), moved, 0.0), self.drift))
        self.density.assign(tf.where(solved, density, self.density))
        self.value.assign(tf.where(solved, value, self.value))
        self.rank.assign(tf.where(solved, rank, self.rank))


def _doubled(bits):
    """The bits of twice the magnitude of `bits` (INT_MAX past the finite ones): a
    window's end past the largest sampled value, where the counts start to bound
    a tail (from INT_MAX, only halvings of the bits would)."""
    return tf.where(bits < _LARGEST - (1 << 23), bits + (1 << 23), tf.constant(INT_MAX, tf.int64))


def _weighted_window(values, weights, rank):
    """`(lo, hi)` ([1] int64) around where the cumulative `weights` of sorted sample
    `values` reach `rank`: `_Z` standard deviations of that count either side (a
    value standing for w weights adds w^2 to the variance: at most the largest w
    times the binomial variance of the rank), and two of the largest weights."""
    spent = tf.cumsum(weights)
    count = tf.shape(values, tf.int64)[0]
    total, heaviest = spent[-1], tf.reduce_max(weights)
    rank = tf.cast(rank, tf.float64)
    spread = _Z * tf.sqrt(heaviest * rank * tf.maximum(total - rank, 0.0) / total) + 2.0 * heaviest
    at = tf.searchsorted(spent, tf.stack([rank - spread, rank + spread]), out_type=tf.int64)
    edge = lambda j: tf.cast(tf.gather(values, tf.clip_by_value(j, 0, count - 1)), tf.int64)  # noqa: E731
    lo = tf.where(at[0] <= 0, tf.constant(0, tf.int64), edge(at[0] - 1))
    hi = tf.where(at[1] >= count, _doubled(edge(count - 1)), edge(at[1]))
    return lo[None], hi[None]


def _rank_window(rows, counts, totals, ranks):
    """`(lo, hi)` per row holding the `ranks`-th of `totals` values with high
    probability, from sorted strided samples `rows` ([groups, width], padded with
    INT_MAX) of `counts` values; exact where the sample is the whole."""
    width = int(rows.shape[1])
    n = tf.cast(counts, tf.float64)
    p = tf.cast(ranks, tf.float64) / tf.cast(tf.maximum(totals, 1), tf.float64)
    spread = _Z * tf.sqrt(n * p * (1.0 - p)) + 2.0
    whole = counts == totals
    low = tf.where(whole, tf.cast(ranks - 1, tf.float64), tf.floor(n * p - spread))
    high = tf.where(whole, tf.cast(ranks - 1, tf.float64), tf.math.ceil(n * p + spread))
    at = lambda j: tf.cast(tf.gather(rows, tf.clip_by_value(tf.cast(j, tf.int32), 0, width - 1),  # noqa: E731
                                     batch_dims=1), tf.int64)
    lo = tf.where(low < 0, tf.zeros_like(counts), at(low))
    hi = tf.where(high >= n, _doubled(at(n - 1)), at(high))
    return lo, hi


def _gathered(active, window):
    """Which windows (`(lo, hi)` pairs or `_Search`es) have their values gathered:
    active ones of more than one value (a single value's ties are parted by
    `_tie_positions`). The last pass flags blocks for these."""
    lo, hi = window[:2]
    return active & (lo < hi)


def _counts(counts):
    """`(below_own, upto_own, below, upto)` (int64 [m]) from `_count_pass` counts."""
    below_own, inside_own, below, inside = tf.unstack(tf.cast(counts, tf.int64), axis=1)
    return below_own, below_own + inside_own, below, below + inside


def _positions(sorted_keys, keys, side="left"):
    return tf.searchsorted(sorted_keys, keys, side=side, out_type=tf.int64)


class WindowSearch:
    """Masks of kernels of fixed `sizes` by exact magnitude selection (see the module).

    `jit_compile` compiles the counting and the writing pass with XLA: one
    compilation each, for all kernels.
    """

    def __init__(self, sizes, *, jit_compile):
        self.sizes = np.asarray(sizes, np.int64)
        options = {"jit_compile": bool(jit_compile), "reduce_retracing": False, "autograph": False}
        self._counts = {(own, shared): tf.function(functools.partial(_count_pass, own=own, shared=shared),
                                                   **options)
                        for own in (False, True) for shared in (False, True)}
        self._write = tf.function(_mask_pass, **options)
        # Compiled, the gathers of all samples take one launch (not the sort: XLA's
        # sorts these rows a few times slower here).
        self._sample_bits = tf.function(self._strided, **options)
        self._sample_at = [np.unique(np.linspace(0, n - 1, min(int(n), _SAMPLE)).astype(np.int64))
                           for n in self.sizes]
        self._sample_counts = np.array([len(p) for p in self._sample_at], np.int64)
        m = len(self.sizes)
        self._own = _Memory(max(256, _TARGET // max(m, 1)), self.sizes)
        self._global = _Memory(_TARGET, [self.sizes.sum()])

    def masks(self, flats, *, own_ranks=None, descending=False, rank=None, caps=None):
        """Flat float32 masks of `flats`, 0 where pruned.

        `own_ranks` (int64 [m]) alone: each kernel's `own_ranks[i]` smallest are
        pruned. `rank` (an int64 scalar): the `rank` smallest over all kernels,
        kernel i taking part with its `caps[i]` smallest only; give
        `own_ranks=caps, descending=True` too, which finds where they end.
        """
        m = len(self.sizes)
        sizes = tf.constant(self.sizes)
        own, selects_globally = own_ranks is not None, rank is not None
        if selects_globally and own and not descending:
            raise ValueError("A global selection takes per-kernel ranks only as its caps (descending=True).")
        own_ranks = tf.cast(own_ranks, tf.int64) if own else tf.zeros([m], tf.int64)
        caps = sizes if caps is None else tf.cast(caps, tf.int64)
        rank = tf.zeros([1], tf.int64) if rank is None else tf.reshape(tf.cast(rank, tf.int64), [1])
        own_active = (own_ranks > 0) & (own_ranks < sizes)
        global_active = (rank > 0) & (rank < tf.reduce_sum(caps))
        empty = lambda k: (tf.ones([k], tf.int64), tf.zeros([k], tf.int64))  # noqa: E731
        # One sample for both selections, taken only when one of them jumped.
        sampled = ~tf.reduce_all(self._global.known(rank, global_active))
        if own:
            sampled |= ~tf.reduce_all(self._own.known(own_ranks, own_active))
        rows = tf.cond(sampled, lambda: self._samples(flats),
                       lambda: tf.zeros([m, int(self._sample_counts.max())], tf.int32))
        own_window = self._own.window(own_ranks, own_active, lambda: self._own_sample(rows, own_ranks)) \
            if own else empty(m)
        window = self._global.window(rank, global_active, lambda: self._global_sample(rows, caps, rank))
        own_window, window, tops, counts, blocks = self._narrow(
            flats, own_ranks, own_active, own_window, caps, rank, global_active, window,
            own=own, shared=selects_globally)
        below_own, upto_own, below, upto = _counts(counts)
        gathered = self._gather(flats, own_window, _gathered(own_active, own_window), (window[0], tops),
                                _gathered(global_active, window), blocks)
        value_own, *own_ties = self._own_answer(gathered, own_window, below_own, upto_own, own_ranks,
                                                 own_active, descending)
        value, *global_ties = self._global_answer(gathered, window, below, upto, caps, rank, global_active)
        self._own.keep(value_own, own_ranks, own_window, upto_own - below_own, own_active)
        self._global.keep(value, rank, window, tf.reduce_sum(upto - below, keepdims=True), global_active)
        limits = self._tie_limits(flats, tf.stack([tf.broadcast_to(value, [m]), value_own], 1),
                                  *(tf.stack(pair, 1) for pair in zip(global_ties, own_ties)))
        clip = lambda x: tf.cast(tf.clip_by_value(x, -1, INT_MAX), tf.int32)  # noqa: E731
        none, zero = tf.fill([m], INT_MAX), tf.zeros([m], tf.int32)
        if not own:
            cuts = [clip(tf.broadcast_to(value, [m])), tf.cast(limits[:, 0], tf.int32), none, zero]
        elif descending:
            cuts = [clip(tf.broadcast_to(value, [m])), tf.cast(limits[:, 0], tf.int32), clip(value_own),
                    tf.cast(limits[:, 1], tf.int32)]
        else:
            cuts = [clip(value_own), tf.cast(limits[:, 1], tf.int32), none, zero]
        return self._write(flats, tf.stack(cuts, 1))

    # -- first windows, from samples -------------------------------------------------

    def _samples(self, flats):
        """Sorted strided samples of every kernel's magnitudes, [m, width] padded with
        the bits of inf."""
        return tf.sort(self._sample_bits(flats), axis=-1)

    def _strided(self, flats):
        width = int(self._sample_counts.max())
        rows = [tf.pad(tf.gather(f, p), [[0, width - len(p)]], constant_values=np.inf)
                for f, p in zip(flats, self._sample_at)]
        return abs_bits(tf.stack(rows))

    def _own_sample(self, rows, ranks):
        counts = tf.constant(self._sample_counts)
        return _rank_window(rows, counts, tf.constant(self.sizes), ranks)

    def _global_sample(self, rows, caps, rank):
        """A window for the global selection from the `_samples` rows: each sample
        value stands for size/count weights, and a capped kernel offers only the
        smallest share of its sample."""
        counts = tf.constant(self._sample_counts)
        share = tf.cast(caps, tf.float64) / tf.constant(self.sizes, tf.float64)
        offered = tf.cast(tf.math.ceil(tf.cast(counts, tf.float64) * share), tf.int64)
        taken = tf.range(int(rows.shape[1]), dtype=tf.int64)[None, :] < offered[:, None]
        weight = tf.constant(self.sizes / self._sample_counts, tf.float64)[:, None] * tf.ones_like(rows, tf.float64)
        values, weights = tf.boolean_mask(rows, taken), tf.boolean_mask(weight, taken)
        order = tf.argsort(values)
        return _weighted_window(tf.gather(values, order), tf.gather(weights, order), rank[0])

    # -- counting until every window holds its answer -------------------------------

    def _narrow(self, flats, own_ranks, own_active, own_window, caps, rank, global_active, window, *,
                own, shared):
        """Counts until every active window holds its answer and few values. Returns the
        windows, where the global one ends in each kernel (`tops`), the last counts
        ([m, 4], as `_count_pass` gives them) and, per kernel, the blocks the last
        pass flagged for the gather."""
        m = len(self.sizes)
        int32 = lambda x: tf.cast(x, tf.int32)  # noqa: E731
        count = self._counts[own, shared]
        sizes = tf.constant(self.sizes)

        def ends(own_search, search):
            # Where a kernel's free weights are known to end (its own window,
            # settled), values above count for nothing: the global window stops
            # there, so the weights its caps reserve never crowd it; a kernel
            # without free weights takes no part.
            settled = own_active & own_search.done
            return tf.where(caps <= 0, search.lo - 1,
                            tf.where(settled, tf.clip_by_value(own_search.hi, search.lo - 1, search.hi), search.hi))

        def body(rounds, own_search, search, *_):
            settled = own_active & own_search.done
            search = _below_ceiling(search, tf.reduce_max(tf.where(
                caps > 0, tf.where(settled, own_search.hi, INT_MAX), -1)))
            tops = ends(own_search, search)
            # The windows of the pass that ends the search are the ones gathered.
            counts, blocks = count(flats, int32(own_search.lo), int32(own_search.hi), int32(own_ranks),
                                   int32(search.lo[0]), int32(tops), _gathered(own_active, own_search),
                                   _gathered(global_active, search)[0])
            below_own, upto_own, below, upto = _counts(counts)
            patient, trusting = rounds < _PATIENCE, rounds < _TRUSTING
            own_search = _step(own_search, below_own, upto_own, upto_own - below_own, own_ranks, sizes,
                               int(self._own.target * _CROWDED), self._own.target * _WANT, patient, trusting)
            # Crowded or not by the free values only: the reserved ones inside the
            # own windows are gathered for those anyway.
            capped = lambda x: tf.reduce_sum(tf.minimum(caps, x), keepdims=True)  # noqa: E731
            search = _step(search, capped(below), capped(upto), capped(upto) - capped(below), rank, capped(sizes),
                           int(self._global.target * _CROWDED), self._global.target * _WANT, patient, trusting)
            return rounds + 1, own_search, search, counts, blocks

        no_blocks = [tf.zeros([-(-int(n) // _BLOCK)], tf.bool) for n in self.sizes]
        start = (tf.constant(0), _Search.start(own_window, ~own_active, self.sizes),
                 _Search.start(window, ~global_active, tf.reduce_sum(caps, keepdims=True)),
                 tf.zeros([m, 4], tf.int32), no_blocks)
        _, own_search, search, counts, blocks = tf.while_loop(
            lambda rounds, own_search, search, *_: ~(tf.reduce_all(own_search.done) & tf.reduce_all(search.done)),
            body, start, maximum_iterations=_MAX_ROUNDS)
        tf.debugging.assert_equal(tf.reduce_all(own_search.done) & tf.reduce_all(search.done), True, message=(
            "dg2pf_tf: the device mask search did not converge; please report this."))
        # The values a gather takes end where the settled own windows end: the
        # capped counts of the last pass stay those of these ends.
        return (own_search.lo, own_search.hi), (search.lo, search.hi), ends(own_search, search), counts, blocks

    # -- the values inside the windows -------------------------------------------------

    def _gather(self, flats, own_window, use_own, window, use_global, blocks):
        """The magnitudes inside the windows to gather (read from the blocks the last
        pass flagged), in kernel and then position order: `(values, owners,
        positions, in_own, in_global)`. `window` is the global window's start and
        its end in each kernel."""
        ids = [tf.cast(tf.where(flags)[:, 0], tf.int32) for flags in blocks]
        # Float32 rows (a no-op for float32 kernels): all kernels' are read as one.
        rows = [tf.cast(_block_values(flat, at), tf.float32) for flat, at in zip(flats, ids)]
        # Once the blocks are read, one set of operations for all kernels: each
        # costs about as much to launch as a small kernel's work.
        owners = tf.repeat(tf.range(len(flats)), tf.stack([tf.size(x) for x in ids]))
        ids, bits = tf.concat(ids, 0), abs_bits(tf.concat(rows, 0))
        edges = tf.cast(tf.stack([own_window[0], own_window[1], tf.broadcast_to(window[0], tf.shape(use_own)),
                                  window[1]], 1), tf.int32)
        uses = tf.stack([use_own, tf.broadcast_to(use_global, tf.shape(use_own))], 1)
        edge, use = tf.gather(edges, owners), tf.gather(uses, owners)
        within = [tf.reshape((bits >= edge[:, 2 * j, None]) & (bits <= edge[:, 2 * j + 1, None]) & use[:, j, None],
                             [-1]) for j in range(2)]
        keep = tf.where(within[0] | within[1])[:, 0]
        row, column = keep // _BLOCK, keep % _BLOCK
        owners = tf.cast(tf.gather(owners, row), tf.int64)
        positions = tf.cast(tf.gather(ids, row), tf.int64) * _BLOCK + column
        values = tf.cast(tf.gather(tf.reshape(bits, [-1]), keep), tf.int64)
        in_own, in_global = (tf.gather(flags, keep) for flags in within)
        # The last block of a kernel reaches past its end: those are not weights.
        real = tf.where(positions < tf.gather(tf.constant(self.sizes), owners))[:, 0]
        return tuple(tf.gather(x, real) for x in (values, owners, positions, in_own, in_global))

    def _sorted(self, values, owners, positions, selected):
        """Keys `owner * 2**31 + value` of the selected values, sorted (stably: ties stay
        in position order), a sentinel last; the positions in the same order."""
        sentinel = tf.constant(len(self.sizes) << _SHIFT, tf.int64)
        # Only the selected ones: the other selection's values would be sorted for nothing.
        keys = tf.concat([tf.boolean_mask(tf.bitwise.left_shift(owners, _SHIFT) + values, selected), [sentinel]], 0)
        order = tf.argsort(keys, stable=True)
        return tf.gather(keys, order), tf.gather(tf.concat([tf.boolean_mask(positions, selected), [0]], 0), order), \
            sentinel

    def _base(self):
        return tf.bitwise.left_shift(tf.range(len(self.sizes), dtype=tf.int64), _SHIFT)

    def _position(self, keys, positions, value, index, ties):
        """Per kernel, the position of its `index`-th weight of magnitude `value` among
        the sorted gathered ones; 0 for index 0, the kernel size past the last."""
        sizes = tf.constant(self.sizes)
        first = _positions(keys, self._base() + value)
        found = tf.gather(positions, tf.clip_by_value(first + index, 0, tf.shape(keys, tf.int64)[0] - 1))
        return tf.where(index >= ties, sizes, tf.where(index <= 0, tf.zeros_like(sizes), found))

    # -- the answers ---------------------------------------------------------------------

    def _own_answer(self, gathered, window, below, upto, ranks, active, descending):
        """Per kernel: the value of its `ranks`-th smallest magnitude, the index (among
        the weights of that value, in position order) of the first one not selected
        (`descending`: the first one free), how many have that value, and the
        position of that first one where the gathered values tell it."""
        values, owners, positions, in_own, _ = gathered
        sizes = tf.constant(self.sizes)
        keys, order, _ = self._sorted(values, owners, positions, in_own)
        base = self._base()
        start = _positions(keys, base)
        point = window[0] >= window[1]
        within = ranks - below  # 1-based, inside the window
        last = tf.shape(keys, tf.int64)[0] - 1
        kth = tf.gather(keys, tf.clip_by_value(start + within - 1, 0, last)) - base
        value = tf.where(point, window[0], kth)
        first = _positions(keys, base + value)
        less = below + tf.where(point, tf.zeros_like(below), first - start)
        ties = tf.where(point, upto - below, _positions(keys, base + value, "right") - first)
        value = tf.where(active, value, tf.where(ranks <= 0, tf.constant(-1, tf.int64), INT_MAX))
        less = tf.where(active, less, tf.where(ranks <= 0, tf.zeros_like(sizes), sizes))
        ties = tf.where(active, ties, tf.zeros_like(ties))
        chosen_ties = ranks - less
        index = tf.maximum(ties - chosen_ties if descending else chosen_ties, 0)
        return value, index, ties, self._position(keys, order, value, index, ties), active & point

    def _global_answer(self, gathered, window, below, upto, caps, rank, active):
        """The value of the `rank`-th smallest free magnitude over all kernels; per
        kernel the index (among its weights of that value, in position order) of the
        first one not pruned, how many have that value, and the position of that
        first one where the gathered values tell it."""
        values, owners, positions, _, in_global = gathered
        m = len(self.sizes)
        keys, order, sentinel = self._sorted(values, owners, positions, in_global)
        owner = tf.minimum(tf.bitwise.right_shift(keys, _SHIFT), m)
        value_of = tf.bitwise.bitwise_and(keys, INT_MAX)
        start = tf.concat([_positions(keys, self._base()), [0]], 0)
        within = tf.range(tf.shape(keys, tf.int64)[0], dtype=tf.int64) - tf.gather(start, owner)
        capped_below = tf.minimum(caps, below)
        offered = tf.minimum(caps, upto) - capped_below  # free values each kernel has in the window
        free = (owner < m) & (within < tf.gather(tf.concat([offered, [0]], 0), owner))
        free_values = tf.sort(tf.where(free, value_of, sentinel))
        wanted = rank[0] - tf.reduce_sum(capped_below)  # 1-based, among the free values in the window
        point = window[0][0] >= window[1][0]
        kth = tf.gather(free_values, tf.clip_by_value(wanted - 1, 0, tf.shape(free_values, tf.int64)[0] - 1))
        value = tf.where(point, window[0][0], kth)
        need = wanted - tf.where(point, tf.constant(0, tf.int64), _positions(free_values, value[None])[0])
        count = lambda flags: tf.math.unsorted_segment_sum(tf.cast(flags, tf.int64), owner, m + 1)[:m]  # noqa: E731
        free_ties = tf.where(point, offered, count(free & tf.equal(value_of, value)))
        ties = tf.where(point, upto - below, count((owner < m) & tf.equal(value_of, value)))
        taken = tf.clip_by_value(need - tf.cumsum(free_ties, exclusive=True), 0, free_ties)
        index = ties - free_ties + taken
        inactive = ~active[0]
        value = tf.where(inactive, tf.where(rank[0] <= 0, tf.constant(-1, tf.int64), INT_MAX), value)
        index = tf.where(inactive, tf.where(rank[0] <= 0, tf.zeros_like(index), tf.constant(self.sizes)), index)
        ties = tf.where(inactive, tf.zeros_like(ties), ties)
        found = self._position(keys, order, tf.broadcast_to(value, [m]), index, ties)
        return value, index, ties, found, tf.broadcast_to(active & point, [m])

    def _tie_limits(self, flats, values, indices, ties, found, point):
        """Positions separating tied weights ([m, 2]): what the gathered values told
        (`found`), and where a window was a single crowded value, one pass over the
        kernels for the kernels that split their ties there."""
        split = (indices > 0) & (indices < ties) & point
        values = tf.cast(tf.clip_by_value(values, -1, INT_MAX), tf.int32)
        return tf.cond(tf.reduce_any(split),
                       lambda: tf.where(split, _tie_positions(flats, values, indices), found),
                       lambda: found)
