"""Channel masks on the device: the structured counterpart of `device_criteria.py`.

Every channel of a prunable group (`structure.ChannelGroup`) is scored by the
L2 norm of all the weights coupled to it (kernels, biases, BatchNorm
parameters), over the square root of their number: a root mean square, so
that a channel read by many layers does not outrank one read by few only for
having more weights (inside a group the order is the L2 order). The same channels as `criteria.channel_keep` stay, computed in
TensorFlow ops inside the training step; each channel's 0 or 1 is then spread
over every kernel entry that belongs to it, producer columns and consumer rows.
"""

import numpy as np
import tensorflow as tf

from dg2pf_tf import criteria, structure


class ChannelCriterion:
    """Channel selection over `groups` for the masks of `targets` (the pruned variables)."""

    def __init__(self, groups, targets, floor):
        self.sizes = [g.size for g in groups]
        self.floor = float(floor)
        self.total = total = sum(self.sizes)
        starts = np.cumsum([0, *self.sizes[:-1]])
        group_of = np.repeat(np.arange(len(groups)), self.sizes)
        self._group_of = tf.constant(group_of, tf.int32)
        self._group_start = tf.constant(starts[group_of], tf.int32)
        self._sizes = tf.constant(self.sizes, tf.float64)
        # Per (variable, axis): the channel (0..total-1) at each position, `total` for none.
        index = {}
        for group, start in zip(groups, starts):
            for s in group.slices:
                key = (id(s.variable), s.axis)
                if key not in index:
                    index[key] = (s.variable, s.axis, np.full(s.variable.shape[s.axis], total, np.int32))
                index[key][2][s.rows] = start + np.arange(group.size)[:, None]
        scored = [(v, a, i) for v, a, i in index.values() if v.trainable]
        self._scored = [(v, a, tf.constant(i)) for v, a, i in scored]
        counts = np.zeros(total + 1)
        for v, a, i in scored:
            np.add.at(counts, i, np.prod(v.shape) // v.shape[a])
        self._counts = tf.constant(np.maximum(counts[:total], 1), tf.float32)
        self.positions = [[(a, i) for v, a, i in index.values() if v is t] for t in targets]
        self.shapes = [tuple(t.shape) for t in targets]

    def scores(self):
        """Each channel's root mean square over its trainable coupled weights (float32)."""
        sums = []
        for variable, axis, index in self._scored:
            value = tf.cast(tf.convert_to_tensor(variable.value), tf.float32)
            others = [d for d in range(len(variable.shape)) if d != axis]
            per_position = tf.reduce_sum(tf.square(value), axis=others)
            sums.append(tf.math.unsorted_segment_sum(per_position, index, self.total + 1))
        return tf.sqrt(tf.add_n(sums)[:self.total] / self._counts)

    def keep(self, scores, level):
        """True for the channels `criteria.channel_keep` keeps at sparsity `level`."""
        level = tf.cast(level, tf.float64)
        floors = tf.maximum(tf.constant(1.0, tf.float64), tf.math.ceil(self.floor * (1.0 - level) * self._sizes))
        removals = tf.minimum(tf.round(level * self.total), self.total - tf.reduce_sum(floors))
        # Rank inside each group, lowest score (then earliest) first.
        by_score = tf.argsort(scores, stable=True)
        order = tf.gather(by_score, tf.argsort(tf.gather(self._group_of, by_score), stable=True))
        rank = _inverse(order, tf.range(self.total) - tf.gather(self._group_start, order))
        eligible = rank < tf.cast(tf.gather(self._sizes - floors, self._group_of), tf.int32)
        candidates = tf.where(eligible, scores, np.inf)
        overall = _inverse(tf.argsort(candidates, stable=True), tf.range(self.total))
        return overall >= tf.cast(removals, tf.int32)

    def masks(self, values, level):
        """The masks of the targets at sparsity `level` (the values are read from the variables)."""
        del values  # scores also need the coupled weights that are not targets
        keep = tf.concat([tf.cast(self.keep(self.scores(), level), tf.float32), [1.0]], 0)
        masks = []
        for shape, positions in zip(self.shapes, self.positions):
            mask = tf.ones(shape, tf.float32)
            for axis, index in positions:
                along = tf.gather(keep, index)
                mask *= tf.reshape(along, [-1 if d == axis else 1 for d in range(len(shape))])
            masks.append(mask)
        return masks

    unit = "channels"
    max_level = 1.0

    def removals(self, level):
        """How many channels `level` removes (`criteria.channel_removals`)."""
        return criteria.channel_removals(self.sizes, level, self.floor)

    def realised(self, level):
        """The share of channels removed at `level`: exact, from the group sizes."""
        return self.removals(level) / max(1, self.total)

    def removed(self, masks):
        """How many channels numpy `masks` (of the targets) remove."""
        gone = set()
        for mask, positions in zip(masks, self.positions):
            for axis, index in positions:
                rows = np.moveaxis(mask, axis, 0).reshape(mask.shape[axis], -1)
                gone.update(index[(rows == 0).all(axis=1) & (index < self.total)].tolist())
        return len(gone)

    def pattern_problems(self, masks):
        """None: whole channels are what `removed` counts."""
        return []


def _inverse(order, values):
    """`out[order[i]] = values[i]`."""
    return tf.scatter_nd(order[:, None], values, tf.shape(values))


def prunable_groups(model, targets):
    """`(groups, dense)`: the channel groups of `model` whose kernels are all
    among `targets` (the variables being pruned), and `structure.DenseGroup`s
    for the rest, with the reason."""
    found = structure.channel_groups(model)
    ids = {id(t) for t in targets}
    groups, dense = [], list(found.dense)
    for group in found.groups:
        outside = [s.layer for s in group.slices
                   if s.role != structure.PASSES and id(s.variable) not in ids]
        if outside:
            dense.append(structure.DenseGroup(group.name, group.size,
                                              f"'{outside[0]}' is not pruned (excluded or not prunable)"))
        else:
            groups.append(group)
    return groups, dense
