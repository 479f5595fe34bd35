"""Counting zeros: in arrays, and how many a sparsity level removes."""

import numpy as np


def zero_count(sparsity, size):
    """The exact number of weights pruned from `size` at `sparsity`: `round(sparsity * size)`."""
    return int(round(sparsity * size))


def count_zeros(array):
    """The number of entries of `array` (anything numpy reads) that are exactly 0."""
    array = np.asarray(array)
    return int(array.size - np.count_nonzero(array))


def zero_fraction(array):
    """The share of `array`'s entries that are exactly 0 (0.0 for an empty array)."""
    array = np.asarray(array)
    return count_zeros(array) / array.size if array.size else 0.0
