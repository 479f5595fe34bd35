"""N:M masks on the device: the pattern-bound counterpart of `magnitude.py`.

In every block of M consecutive weights along a kernel's input axis, only the
M - N smallest magnitudes may go (`candidates`); the global (or per-kernel)
magnitude ranking of `DeviceCriterion` then removes `round(s * N)` weights
among those candidates. So the linear schedule and weight recovery work as for
single weights, and at s = 1 - N/M every block keeps exactly its N largest:
the 2:4 pattern of sparse tensor cores. `reference.nm_masks` is the numpy
reference; the tests hold the two equal.
"""

import numpy as np
import tensorflow as tf

from dg2pf_tf.criteria.magnitude import XLA_FROM, DeviceCriterion
from dg2pf_tf.criteria.reference import nm_violations
from dg2pf_tf.criteria.window_search import abs_bits


def candidates(kernel, axis, n, m):
    """`reference.nm_candidates` in TensorFlow ops: True for the m - n smallest
    magnitudes of each block of m along `axis`, ties to the earlier position."""
    shape = [int(d) for d in kernel.shape]
    # Blocks as axis 2 of [before, blocks, m, after]: no transposed copy.
    grouped = [int(np.prod(shape[:axis])), shape[axis] // m, m, int(np.prod(shape[axis + 1:]))]
    bits = tf.reshape(abs_bits(tf.reshape(kernel, [-1])), grouped)
    # Each weight's place in its block's stable order: smaller ones, and equal ones before it.
    places = tf.zeros_like(bits)
    for j in range(m):
        other = bits[:, :, j:j + 1, :]
        before = tf.reshape(tf.constant([j < i for i in range(m)]), [1, 1, m, 1])
        places += tf.cast((other < bits) | ((other == bits) & before), tf.int32)
    return tf.reshape(places < m - n, shape)


class NMCriterion(DeviceCriterion):
    """Masks in an N:M pattern along each kernel's input axis (`axes`).

    `masks(kernels, level)` equals `reference.nm_masks(kernels, axes, level, n,
    m, scope)`; levels above `max_level` (1 - n/m) act as `max_level`, and
    `MaskSet.update` refuses them. `options` go to `DeviceCriterion`.

    Raises:
        ValueError: a kernel whose input axis is not a multiple of `m` long.
    """

    def __init__(self, shapes, axes, n, m, scope="global", **options):
        super().__init__(shapes, scope, 0.0, **options)  # `flat`, `jit_compile`
        for shape, axis in zip(self.shapes, axes):
            if shape[axis] % m:
                raise ValueError(
                    f"A kernel of shape {shape} has {shape[axis]} inputs along axis {axis}, not a "
                    f"multiple of {m}: it cannot take an {n}:{m} pattern. Keep its layer dense.")
        self.axes, self.n, self.m = list(axes), n, m
        self.max_level = 1.0 - n / m
        # XLA fuses the block comparisons into one pass over the weights (as `DeviceCriterion`
        # compiles its own passes), from the same size on.
        self._bounded = tf.function(self._bound, jit_compile=self.total >= XLA_FROM, autograph=False)

    def describe(self):
        return f"{super().describe()} in a {self.n}:{self.m} pattern"

    def removals(self, level):
        return super().removals(min(float(level), self.max_level))

    @tf.autograph.experimental.do_not_convert
    def masks(self, kernels, sparsity):
        level = tf.minimum(tf.cast(sparsity, tf.float64), self.max_level)
        return super().masks(self._bounded(list(kernels)), level)

    def _bound(self, kernels):
        """The kernels with every weight that is no candidate set to +inf (never pruned)."""
        return [tf.where(candidates(k, axis, self.n, self.m), k, tf.constant(np.inf, k.dtype))
                for k, axis in zip(kernels, self.axes)]

    def pattern_problems(self, masks):
        """`(index, blocks)` for each numpy mask with blocks of m that keep more than n."""
        return [(i, bad) for i, (mask, axis) in enumerate(zip(masks, self.axes))
                if (bad := nm_violations(mask, axis, self.n, self.m))]
