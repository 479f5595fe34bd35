"""Magnitude pruning criteria on plain arrays (no Keras here).

A mask is a float32 array of 0s and 1s shaped like its weight. The number of
zeros is exact (``round(sparsity * n)``) and ties in magnitude are broken by
position: among equal magnitudes, the weight that comes first (in the order
the weights are given, then in C order inside each array) is pruned first.
"""

import numpy as np

from dg2pf_tf.checks import check_floor, check_scope, check_sparsity
from dg2pf_tf.counting import zero_count


def erk_keep_counts(shapes, keep):
    """How many of `keep` weights each kernel gets under Erdos-Renyi-kernel
    allocation (density proportional to sum(shape) / prod(shape), capped at 1).
    """
    counts = np.array([int(np.prod(s, dtype=np.int64)) for s in shapes], np.int64)
    sums = np.array([sum(s) for s in shapes], np.int64)
    sizes = counts.astype(np.float64)
    raw = sums / np.maximum(sizes, 1)
    dense = np.zeros(len(shapes), bool)
    while True:
        # Integer sums, then one division: the device version repeats these
        # exact float64 operations and gets the same counts.
        budget = int(keep) - int(counts[dense].sum())
        weight = int(sums[~dense].sum())
        eps = budget / weight if weight > 0 else 0.0
        density = np.where(dense, 1.0, eps * raw)
        over = (density > 1.0) & ~dense
        if not over.any():
            break
        dense |= over
    return np.minimum(sizes, np.floor(density * sizes)).astype(np.int64)


def magnitude_masks(weights, sparsity, scope="global", floor=0.0):
    """Masks that zero the smallest-magnitude fraction `sparsity` of `weights`.

    `weights` is a sequence of array-likes with a `.shape` (numpy arrays,
    tensors, Keras variables). With scope 'global' one threshold spans all of
    them; with 'layer' each array gets `sparsity` on its own. With scope
    'global' and `floor` > 0, each array first keeps its largest weights up to
    `floor` times its Erdos-Renyi-kernel share, so no small layer is pruned
    away entirely at extreme sparsity; one threshold then ranks the rest.
    Returns a list of float32 masks. This is the reference: training computes
    the same masks on the device (`magnitude`).
    Raises ValueError for a bad `sparsity`, `scope` or `floor`.
    """
    sparsity = check_sparsity(sparsity)
    check_scope(scope)
    floor = check_floor(floor)
    weights = list(weights)
    if scope == "layer":
        return [mask for weight in weights for mask in _masks_global([weight], sparsity, 0.0)]
    return list(_masks_global(weights, sparsity, floor))


def _magnitudes(weight, reserve):
    """|weight| as a flat float32 array, its `reserve` largest set to +inf."""
    values = np.abs(np.asarray(weight, dtype=np.float32).reshape(-1))
    if reserve > 0:
        # A stable sort makes the reserved set deterministic among ties.
        top = np.argsort(-values, kind="stable")[:reserve]
        values[top] = np.inf
    return values


def _masks_global(weights, sparsity, floor):
    shapes = [tuple(int(d) for d in w.shape) for w in weights]
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    total = sum(sizes)
    k = zero_count(sparsity, total)
    if k == 0:
        for shape in shapes:
            yield np.ones(shape, np.float32)
        return
    reserves = [0] * len(shapes)
    if floor > 0:
        reserves = [int(floor * n) for n in erk_keep_counts(shapes, total - k)]

    scores = np.empty(total, np.float32)
    offset = 0
    for weight, size, reserve in zip(weights, sizes, reserves):
        scores[offset : offset + size] = _magnitudes(weight, reserve)
        offset += size
    # After partition the k smallest magnitudes sit in scores[:k]; the k-th
    # is the threshold and everything strictly below it is pruned.
    scores.partition(k - 1)
    threshold = scores[k - 1]
    ties_to_prune = k - int(np.count_nonzero(scores[:k] < threshold))
    del scores

    for weight, shape, reserve in zip(weights, shapes, reserves):
        magnitude = _magnitudes(weight, reserve)
        keep = magnitude > threshold
        tied = np.flatnonzero(magnitude == threshold)
        # Ties beyond the quota stay: the earliest positions go first.
        keep[tied[ties_to_prune:]] = True
        ties_to_prune = max(0, ties_to_prune - tied.size)
        yield keep.reshape(shape).astype(np.float32)


def channel_floor_keeps(sizes, sparsity, floor, least=None, round_to=1):
    """How many channels each group keeps at least: `floor` of its uniform
    share `(1 - sparsity) * size`, rounded up, and never fewer than `least`
    (per group; default one each: a group that may lose every channel has 0);
    with `round_to`, rounded up to what whole chunks leave (`channel_chunks`)."""
    keep = 1.0 - float(sparsity)
    least = [1] * len(sizes) if least is None else least
    keeps = [max(low, int(np.ceil(floor * keep * n))) for n, low in zip(sizes, least)]
    return [n - _chunked(n - k, n % round_to or round_to, round_to) for n, k in zip(sizes, keeps)]


def _chunked(removable, first, round_to):
    """The most of `removable` channels whole chunks take: `first`, then `round_to` at a time."""
    return 0 if removable < first else first + (removable - first) // round_to * round_to


def channel_chunks(values, keep, round_to=1):
    """The chunks a group's channels (scores `values`) may go in: positions, lowest
    score (then earliest) first, `round_to` at a time, the first chunk holding the
    remainder so that what stays is a multiple of `round_to`; only the chunks that
    leave at least `keep` channels."""
    order = np.argsort(np.asarray(values), kind="stable")
    n = len(order)
    bounds = list(range(n % round_to or round_to, n + 1, round_to))
    return [order[a:b] for a, b in zip([0, *bounds], bounds) if b <= n - keep]


def channel_removals(sizes, sparsity, floor, least=None):
    """The exact number of channels removed over all groups: `round(s * N)`,
    or fewer where the floors allow no more."""
    total = sum(sizes)
    return min(zero_count(sparsity, total), total - sum(channel_floor_keeps(sizes, sparsity, floor, least)))


def channel_keep(scores, sparsity, floor=0.0, least=None):
    """Which channels stay, one bool array per group of `scores` (each group's
    channel scores, e.g. L2 norms of their coupled weights).

    The `channel_removals` lowest-scoring channels go, ranked over all groups;
    each group keeps its `channel_floor_keeps` highest (`least`: see there). Ties go by position,
    as for weights: the channel that comes first is removed first.
    """
    sizes = [len(s) for s in scores]
    keeps = channel_floor_keeps(sizes, sparsity, floor, least)
    removals = channel_removals(sizes, sparsity, floor, least)
    eligible = []
    offset = 0
    for values, keep in zip(scores, keeps):
        order = np.argsort(np.asarray(values), kind="stable")
        eligible += [(values[i], offset + i) for i in order[:len(values) - keep]]
        offset += len(values)
    removed = {position for _, position in sorted(eligible)[:removals]}
    flags, offset = [], 0
    for n in sizes:
        flags.append(np.array([offset + i not in removed for i in range(n)]))
        offset += n
    return flags


def channel_keep_within(scores, costs, cost_of, total_cost, sparsity, floor=0.0, least=None, round_to=1):
    """`channel_keep` with a cost budget: `sparsity` is the share of `total_cost`
    to remove. Each group's channels may go in its `channel_chunks` (lowest
    score first, beyond its floor; one channel each unless `round_to`); over all
    groups chunks go in order of float64 summed score / summed cost (`costs`:
    each channel's cost alone; ties by position) until `cost_of(removed)` (the
    cost left with the flagged channels gone) has fallen by
    `ceil(sparsity * total_cost)`, or all eligible ones are gone."""
    sizes = [len(s) for s in scores]
    keeps = channel_floor_keeps(sizes, sparsity, floor, least)
    flat_costs = np.asarray(costs, np.float64)
    eligible, offset = [], 0
    for values, keep in zip(scores, keeps):
        values = np.asarray(values, np.float32)
        for chunk in channel_chunks(values, keep, round_to):
            key = values[chunk].astype(np.float64).sum() / flat_costs[offset + chunk].sum()
            eligible.append((key, len(eligible), offset + chunk))
        offset += len(values)
    need = int(np.ceil(float(sparsity) * float(total_cost)))
    removed = np.zeros(sum(sizes), bool)
    for _, _, positions in sorted(eligible, key=lambda e: e[:2]):
        if total_cost - cost_of(removed) >= need:
            break
        removed[positions] = True
    return np.split(~removed, np.cumsum(sizes)[:-1])


def nm_candidates(weight, axis, n, m):
    """Where N:M pruning may remove weights: True for the `m - n` smallest
    magnitudes of every block of `m` consecutive weights along `axis` (ties:
    the earlier position). Raises ValueError unless `weight.shape[axis]` is a multiple of `m`."""
    if np.shape(weight)[axis] % m:
        raise ValueError(f"{np.shape(weight)[axis]} inputs along axis {axis} do not split into blocks of {m}.")
    moved = np.moveaxis(np.abs(np.asarray(weight, np.float32)), axis, -1)
    blocks = moved.reshape(-1, m)
    order = np.argsort(blocks, axis=1, kind="stable")
    chosen = np.zeros(blocks.shape, bool)
    np.put_along_axis(chosen, order[:, :m - n], True, axis=1)
    return np.moveaxis(chosen.reshape(moved.shape), -1, axis)


def nm_masks(weights, axes, sparsity, n, m, scope="global"):
    """Masks for N:M pruning at `sparsity` (at most 1 - n/m): the
    `round(sparsity * N)` smallest magnitudes among the `nm_candidates` of
    `weights` (inputs along `axes`), ranked globally or per weight (`scope`);
    at 1 - n/m every block of `m` keeps exactly its `n` largest.

    Raises ValueError for a `sparsity` above 1 - n/m.
    """
    if check_sparsity(sparsity) > 1.0 - n / m + 1e-12:
        raise ValueError(f"An {n}:{m} pattern removes at most {1 - n / m:g} of the weights; got {sparsity}.")
    bounded = [np.where(nm_candidates(w, axis, n, m), np.abs(np.asarray(w, np.float32)), np.inf)
               for w, axis in zip(weights, axes)]
    return magnitude_masks(bounded, sparsity, scope)


def nm_violations(weight, axis, n, m):
    """How many blocks of `m` consecutive entries of `weight` along `axis` hold
    more than `n` nonzeros."""
    blocks = np.moveaxis(np.asarray(weight), axis, -1).reshape(-1, m)
    return int(np.count_nonzero(np.count_nonzero(blocks, axis=1) > n))
