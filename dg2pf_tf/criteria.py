"""Magnitude pruning criteria on plain arrays (no Keras here).

A mask is a float32 array of 0s and 1s shaped like its weight. The number of
zeros is exact (``round(sparsity * n)``) and ties in magnitude are broken by
position: among equal magnitudes, the weight that comes first (in the order
the weights are given, then in C order inside each array) is pruned first.
"""

import numpy as np

SCOPES = ("global", "layer")


def check_sparsity(sparsity, name="sparsity"):
    """Returns `sparsity` as a float; raises ValueError unless it is in [0, 1)."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise TypeError(
            f"`{name}` must be a number in [0, 1), got {sparsity!r}."
        ) from None
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"`{name}` must be in [0, 1): it is the fraction of prunable "
            f"weights set to zero (0.9 keeps 10%). Got {sparsity!r}."
        )
    return value


def check_scope(scope):
    """Raises ValueError unless `scope` is 'global' or 'layer'."""
    if scope not in SCOPES:
        raise ValueError(
            f"`scope` must be one of {SCOPES} ('global': one magnitude "
            f"threshold over every prunable weight; 'layer': the same "
            f"sparsity in each kernel). Got {scope!r}."
        )
    return scope


def zero_count(sparsity, size):
    """The exact number of weights pruned from `size` at `sparsity`."""
    return int(round(sparsity * size))


def magnitude_masks(weights, sparsity, scope="global"):
    """Masks that zero the smallest-magnitude fraction `sparsity` of `weights`.

    `weights` is a sequence of array-likes with a `.shape` (numpy arrays,
    tensors, Keras variables). With scope 'global' one threshold spans all of
    them; with 'layer' each array gets `sparsity` on its own. Returns a list
    of float32 masks; see `iter_magnitude_masks` to hold one at a time.
    Raises ValueError for a bad `sparsity` or `scope`.
    """
    return list(iter_magnitude_masks(weights, sparsity, scope))


def iter_magnitude_masks(weights, sparsity, scope="global"):
    """`magnitude_masks`, yielded one mask at a time in the order of `weights`.

    Weights are read one at a time, so large networks need no concatenated
    copy: besides the masks the caller keeps, at most one float32 copy of all
    magnitudes exists, and only while the threshold is found.
    Raises ValueError for a bad `sparsity` or `scope`.
    """
    sparsity = check_sparsity(sparsity)
    check_scope(scope)
    weights = list(weights)
    if scope == "layer":
        for weight in weights:
            yield from _masks_global([weight], sparsity)
    else:
        yield from _masks_global(weights, sparsity)


def _abs32(weight):
    return np.abs(np.asarray(weight, dtype=np.float32))


def _masks_global(weights, sparsity):
    shapes = [tuple(int(d) for d in w.shape) for w in weights]
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    total = sum(sizes)
    k = zero_count(sparsity, total)
    if k == 0:
        for shape in shapes:
            yield np.ones(shape, np.float32)
        return

    scores = np.empty(total, np.float32)
    offset = 0
    for weight, size in zip(weights, sizes):
        scores[offset : offset + size] = _abs32(weight).ravel()
        offset += size
    # After partition the k smallest magnitudes sit in scores[:k]; the k-th
    # is the threshold and everything strictly below it is pruned.
    scores.partition(k - 1)
    threshold = scores[k - 1]
    ties_to_prune = k - int(np.count_nonzero(scores[:k] < threshold))
    del scores

    for weight, shape in zip(weights, shapes):
        magnitude = _abs32(weight).ravel()
        keep = magnitude > threshold
        tied = np.flatnonzero(magnitude == threshold)
        # Ties beyond the quota stay: the earliest positions go first.
        keep[tied[ties_to_prune:]] = True
        ties_to_prune = max(0, ties_to_prune - tied.size)
        yield keep.reshape(shape).astype(np.float32)
