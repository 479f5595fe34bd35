"""Channel masks on the device: the structured counterpart of `magnitude.py`.

Every channel of a prunable group (`graph.ChannelGroup`) is scored by the
L2 norm of all the weights coupled to it (kernels, biases, BatchNorm
parameters), over the square root of their number: a root mean square, so
that a channel read by many layers does not outrank one read by few only for
having more weights (inside a group the order is the L2 order). The same
channels as `reference.channel_keep` stay (or, with a cost budget,
`reference.channel_keep_within`), computed in TensorFlow ops inside the
training step; each channel's 0 or 1 is then spread
over every kernel entry that belongs to it, producer columns and consumer rows.
"""

import copy
import dataclasses

import numpy as np
import tensorflow as tf

from dg2pf_tf.criteria import reference


@dataclasses.dataclass(frozen=True)
class Pair:
    """An axis of a variable that carries channels: `channel[p]` is the channel
    (0..total-1) at position p along it, `total` where none is."""

    variable: object
    axis: int
    channel: np.ndarray


class ChannelCriterion:
    """Channel selection over groups of `sizes` channels for the masks of `targets`
    (the pruned variables); `pairs` say which positions of which variables carry
    each channel (channels numbered group after group).

    Without `costs`, `level` is the share of channels removed; with a cost
    model (`channels.costs.CostModel`: MACs, parameters), the share of that
    cost: channels then go in order of score per first-order cost (the most
    expensive for what they are worth first, each group's own ranking kept)
    until the exact cost removed reaches `level`. `least`: the fewest channels
    each group keeps whatever the floor (default one; 0 lets a group go whole).
    `round_to` (cost budgets only): channels go in chunks of that many, so that
    each group keeps a multiple of it (or all its channels), the widths a
    runtime's kernels tile best (`reference.channel_chunks`).

    Raises ValueError for `round_to` other than 1 without a cost budget.
    """

    def __init__(self, sizes, pairs, targets, floor, costs=None, least=None, round_to=1):
        self.sizes = list(sizes)
        self.floor = float(floor)
        self.least = [1] * len(self.sizes) if least is None else [int(n) for n in least]
        self._least = tf.constant(self.least, tf.float64)
        self.total = total = sum(self.sizes)
        starts = np.cumsum([0, *self.sizes[:-1]])
        group_of = np.repeat(np.arange(len(self.sizes)), self.sizes)
        self._group_of = tf.constant(group_of, tf.int32)
        self._group_start = tf.constant(starts[group_of], tf.int32)
        self._sizes = tf.constant(self.sizes, tf.float64)
        self._chunking(int(round_to), group_of, costs)
        self.pairs = list(pairs)
        scored = [p for p in self.pairs if p.variable.trainable]
        self._scored = [(p.variable, p.axis, tf.constant(p.channel, tf.int32)) for p in scored]
        counts = np.zeros(total + 1)
        for p in scored:
            np.add.at(counts, p.channel, np.prod(p.variable.shape) // p.variable.shape[p.axis])
        self._counts = tf.constant(np.maximum(counts[:total], 1), tf.float32)
        self.positions = [[(p.axis, p.channel) for p in self.pairs if p.variable is t] for t in targets]
        self.shapes = [tuple(t.shape) for t in targets]
        self.costs = costs
        if costs is not None:
            self.unit, self._per_cost = costs.unit, tf.constant(costs.first_order, tf.float64)

    unit = "channels"
    max_level = 1.0

    def with_costs(self, costs):
        """This criterion with `costs` in place of its cost model (of the same channels)."""
        other = copy.copy(self)
        other.costs, other._per_cost = costs, tf.constant(costs.first_order, tf.float64)
        return other

    def _chunking(self, round_to, group_of, costs):
        """Each channel's chunk (numbered group after group, in each group's rank
        order): `rank + offset` over `round_to`, the first chunk holding what is
        left over, so that removing whole chunks leaves a multiple."""
        if round_to < 1 or (round_to > 1 and costs is None):
            raise ValueError(f"round_to={round_to}: channels go in chunks only under a cost budget "
                             f"(e.g. dg2pf_tf.Latency(round_to=8)), and a chunk holds at least one.")
        self.round_to = round_to
        offsets = np.array([-n % round_to for n in self.sizes])
        chunks = np.array([-(-n // round_to) for n in self.sizes])
        self.chunks = int(chunks.sum())
        self._offset = tf.constant(offsets[group_of], tf.int32)
        self._chunk_start = tf.constant(np.cumsum([0, *chunks[:-1]])[group_of], tf.int32)

    def describe(self):
        """What the masks remove, in words: '1,184 channels in 9 groups'."""
        return f"{self.total:,} channels in {len(self.sizes)} groups"

    def scores(self):
        """Each channel's root mean square over its trainable coupled weights (float32)."""
        sums = []
        for variable, axis, index in self._scored:
            value = tf.cast(tf.convert_to_tensor(variable.value), tf.float32)
            others = [d for d in range(len(variable.shape)) if d != axis]
            per_position = tf.reduce_sum(tf.square(value), axis=others)
            sums.append(tf.math.unsorted_segment_sum(per_position, index, self.total + 1))
        return tf.sqrt(tf.add_n(sums)[:self.total] / self._counts)

    def _ranks(self, scores, level):
        """`(floors, rank, removable)`: the channels each group keeps at least at
        `level`, each channel's place in its group (lowest score, then earliest,
        first) and how many of its group's may go."""
        floors = tf.maximum(self._least, tf.math.ceil(self.floor * (1.0 - level) * self._sizes))
        by_score = tf.argsort(scores, stable=True)
        order = tf.gather(by_score, tf.argsort(tf.gather(self._group_of, by_score), stable=True))
        rank = _inverse(order, tf.range(self.total) - tf.gather(self._group_start, order))
        return floors, rank, tf.cast(tf.gather(self._sizes - floors, self._group_of), tf.int32)

    def keep(self, scores, level):
        """True for the channels `reference.channel_keep` (or, with a cost budget,
        `reference.channel_keep_within`) keeps at `level`."""
        level = tf.cast(level, tf.float64)
        if self.costs is not None:
            return self._keep_within(scores, level)
        floors, rank, removable = self._ranks(scores, level)
        overall = _inverse(tf.argsort(tf.where(rank < removable, scores, np.inf), stable=True),
                           tf.range(self.total))
        removals = tf.minimum(tf.round(level * self.total), self.total - tf.reduce_sum(floors))
        return overall >= tf.cast(removals, tf.int32)

    def _keep_within(self, scores, level):
        """The channels that stay under a cost budget: whole chunks go, in order of their
        summed score per summed first-order cost (float64), until enough cost is saved."""
        _, rank, removable = self._ranks(scores, level)
        local = (rank + self._offset) // self.round_to
        chunk = self._chunk_start + local
        eligible = (local + 1) * self.round_to - self._offset <= removable
        summed = lambda v: tf.math.unsorted_segment_sum(v, chunk, self.chunks)  # noqa: E731
        key = summed(tf.cast(scores, tf.float64)) / summed(self._per_cost)
        eligible_chunk = summed(tf.cast(eligible, tf.float64)) > 0
        overall = _inverse(tf.argsort(tf.where(eligible_chunk, key, np.inf), stable=True),
                           tf.range(self.chunks))
        place = tf.gather(overall, chunk)
        count = tf.reduce_sum(tf.cast(eligible_chunk, tf.int32))
        return place >= self._removals_within(place, count, level)

    def _removals_within(self, overall, eligible, level):
        """The fewest chunks, taken in the order `overall` (each channel's chunk's
        place), whose removal saves `ceil(level * total cost)`; all `eligible` ones
        where that is not enough."""
        need = tf.cast(tf.math.ceil(level * float(self.costs.total_cost)), tf.int64)
        saved = lambda k: self.costs.total_cost - self.costs.cost(overall < k)  # noqa: E731

        def halve(low, high):
            middle = (low + high) // 2
            enough = saved(middle) >= need
            return tf.where(enough, low, middle + 1), tf.where(enough, middle, high)

        low, _ = tf.while_loop(lambda low, high: low < high, halve, (tf.constant(0), eligible))
        return low

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

    def removals(self, level):
        """How many channels `level` removes (`reference.channel_removals`); None with a
        cost budget, where that depends on the scores."""
        if self.costs is not None:
            return None
        return reference.channel_removals(self.sizes, level, self.floor, self.least)

    def realised(self, level):
        """The share of channels removed at `level`: exact, from the group sizes; with a
        cost budget `level` (the masks remove at least that share of the cost), or
        less where the floors allow no more."""
        if self.costs is not None:
            return min(float(level), self.most_saved(level))
        return self.removals(level) / max(1, self.total)

    def removed_flags(self, masks):
        """Which channels numpy `masks` (of the targets) remove: bool [total]."""
        gone = np.zeros(self.total + 1, bool)
        for mask, positions in zip(masks, self.positions):
            for axis, index in positions:
                rows = np.moveaxis(mask, axis, 0).reshape(mask.shape[axis], -1)
                gone[index[(rows == 0).all(axis=1)]] = True
        return gone[:self.total]

    def removed(self, masks):
        """How many channels numpy `masks` (of the targets) remove."""
        return int(self.removed_flags(masks).sum())

    def saved_share(self, masks):
        """The share of the model's cost (MACs or parameters) numpy `masks` remove."""
        return 1.0 - self.costs.cost_numpy(self.removed_flags(masks)) / self.costs.total_cost

    def most_saved(self, level):
        """The largest share of the cost that `level`'s floors let go: every group
        down to its floor (its channels cost alike, so which ones does not matter)."""
        keeps = reference.channel_floor_keeps(self.sizes, level, self.floor, self.least, self.round_to)
        removed = np.concatenate([np.arange(n) < n - keep for n, keep in zip(self.sizes, keeps)])
        return 1.0 - self.costs.cost_numpy(removed) / self.costs.total_cost

    def report(self, masks):
        """What numpy `masks` remove, for `run()`'s report: channels, and with a cost
        budget its name, the share of the cost removed, the cost of the dense model
        (and both costs in words: for a latency budget, the predicted milliseconds)."""
        found = {"channels_removed": self.removed(masks), "channels_total": self.total}
        if self.costs is not None:
            amount, left = self.costs.budget.amount, self.costs.cost_numpy(self.removed_flags(masks))
            found.update(budget=str(self.costs.budget), budget_removed=self.saved_share(masks),
                         budget_total=self.costs.total_cost, budget_dense=amount(self.costs.total_cost),
                         budget_pruned=amount(left))
        return found

    def unreachable(self, level):
        """Why the floors keep `level` of the cost from going (saying the most that can), or None."""
        if self.costs is None:
            return None  # fewer channels go where the floors allow no more (`realised`)
        most = self.most_saved(level)
        if most + 1e-12 >= level:
            return None
        total = self.costs.budget.amount(self.costs.total_cost)
        return (f"budget={str(self.costs.budget)!r}: sparsity {level:g} asks for {level:.1%} of the "
                f"model's {self.unit} ({total}), but removing every channel the floors allow (floor="
                f"{self.floor:g}: each group keeps at least that share of 1 - sparsity of its channels, "
                f"and one) saves {most:.1%}; the rest is in layers whose channels stay dense "
                f"(`dg2pf_tf.channel_groups` lists them). Ask for at most {most:.1%}, or lower `floor`")

    def problem(self, masks, level, names=None):
        """Why numpy `masks` are not what this criterion makes at `level`, or None
        (`names` of the masked weights: unused, channels are named by their count)."""
        if self.costs is None:
            found, expected = self.removed(masks), self.removals(level)
            return None if found == expected else (
                f"the masks remove {found} channels, the target {level} needs {expected} of {self.total}")
        saved = self.saved_share(masks)
        # At least the budget; a chunk more than needed at most.
        chunk = self.round_to * float(self.costs.first_order.max())
        if saved + 1e-12 < level or saved - chunk / self.costs.total_cost > level:
            return (f"the masks remove {saved:.4%} of the model's {self.unit}, the target is {level:.4%}")
        return None


def _inverse(order, values):
    """`out[order[i]] = values[i]`."""
    return tf.scatter_nd(order[:, None], values, tf.shape(values))
