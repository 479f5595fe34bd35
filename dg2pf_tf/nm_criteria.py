"""N:M masks on the device: the pattern-bound counterpart of `device_criteria.py`.

In every block of M consecutive weights along a kernel's input axis, only the
M - N smallest magnitudes may go (`candidates`); the global (or per-kernel)
magnitude ranking of `DeviceCriterion` then removes `round(s * N)` weights
among those candidates. So the linear schedule and weight recovery work as for
single weights, and at s = 1 - N/M every block keeps exactly its N largest:
the 2:4 pattern of sparse tensor cores. `criteria.nm_masks` is the numpy
reference; the tests hold the two equal.
"""

import numpy as np
import tensorflow as tf

from dg2pf_tf.criteria import nm_violations
from dg2pf_tf.device_criteria import DeviceCriterion
from dg2pf_tf.window_search import abs_bits


def candidates(kernel, axis, n, m):
    """`criteria.nm_candidates` in TensorFlow ops: True for the m - n smallest
    magnitudes of each block of m along `axis`, ties to the earlier position."""
    rank = len(kernel.shape)
    perm = [i for i in range(rank) if i != axis] + [axis]
    moved = tf.transpose(kernel, perm)
    blocks = tf.reshape(abs_bits(tf.reshape(moved, [-1])), [-1, m])
    # Each weight's place in its block's stable order: smaller ones, and equal ones before it.
    places = tf.zeros_like(blocks)
    for j in range(m):
        other = blocks[:, j:j + 1]
        before = tf.constant([j < i for i in range(m)])
        places += tf.cast((other < blocks) | ((other == blocks) & before), tf.int32)
    chosen = tf.reshape(places < m - n, tf.shape(moved))
    return tf.transpose(chosen, np.argsort(perm).tolist())


class NMCriterion(DeviceCriterion):
    """Masks in an N:M pattern along each kernel's input axis (`axes`).

    `masks(kernels, level)` equals `criteria.nm_masks(kernels, axes, level, n,
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
        self.pattern = f"{n}:{m}"

    def removals(self, level):
        return super().removals(min(float(level), self.max_level))

    @tf.autograph.experimental.do_not_convert
    def masks(self, kernels, sparsity):
        level = tf.minimum(tf.cast(sparsity, tf.float64), self.max_level)
        bounded = [tf.where(candidates(k, axis, self.n, self.m), k, tf.constant(np.inf, k.dtype))
                   for k, axis in zip(kernels, self.axes)]
        return super().masks(bounded, level)

    def pattern_problems(self, masks):
        """`(index, blocks)` for each numpy mask with blocks of m that keep more than n."""
        return [(i, bad) for i, (mask, axis) in enumerate(zip(masks, self.axes))
                if (bad := nm_violations(mask, axis, self.n, self.m))]
