"""Latency as a function of the channels kept: a table of timings per layer call, interpolated.

Each call (a layer and what the runtime fuses into it) has its time measured
at three widths of its input and three of its output (fewer where a width
cannot change), and is predicted at any other pair of widths by bilinear
interpolation between the nearest of them (below the narrowest, along the
first step). A table, not a fitted formula: a layer's time is not one smooth
function of its widths (a 1x1 convolution from 8 channels to 144 is bound by
writing the 144 and costs nearly what it does from 24), and a table gives
each timing back exactly where the pruned widths land on it.

The widths are linear in the channels each group keeps (`graph.Width`), so the
whole model's time, for any set of removed channels, is computed alike in numpy
(the reference) and in TensorFlow ops (inside the training step): each call's
prediction rounded to whole picoseconds, summed as integers.
"""

import numpy as np
import tensorflow as tf

PICOSECONDS = 1e12
NODES = 3  # timed widths along each axis of a table


class Axis:
    """One width of every call, linear in the channels the groups keep:
    `fixed[c]` plus `repeat * kept[group]` for each entry `(c, group, repeat)`;
    `nodes[c]`: the NODES widths call c was timed at, increasing."""

    def __init__(self, fixed, entries, nodes):
        self.fixed = np.asarray(fixed, np.float64)
        entries = np.asarray(entries, np.int64).reshape(-1, 3)
        self.call, self.group = entries[:, 0], entries[:, 1]
        self.repeat = entries[:, 2].astype(np.float64)
        self.nodes = np.asarray(nodes, np.float64).reshape(-1, NODES)

    def width(self, kept, ops):
        """Each call's width (float64) when the groups keep `kept` channels."""
        if ops is tf:
            parts = self.repeat * tf.gather(kept, self.group)
            return self.fixed + tf.math.unsorted_segment_sum(parts, self.call, len(self.fixed))
        parts = self.repeat * kept[self.group]
        return self.fixed + np.bincount(self.call, weights=parts, minlength=len(self.fixed))

    def cell(self, width, ops):
        """`(step, share)`: the node each width lies past (0 or 1), and how far it is
        towards the next one (below 0 under the narrowest)."""
        step = ops.where(width > self.nodes[:, 1], 1, 0)
        low, high = _pick(self.nodes, step, ops), _pick(self.nodes, step + 1, ops)
        return step, (width - low) / (high - low)

    def slope_at_full(self, values):
        """Per call: what one channel of this width costs at full width, `values`
        [calls, NODES] being its times along this axis."""
        return (values[:, -1] - values[:, -2]) / (self.nodes[:, -1] - self.nodes[:, -2])


def _pick(values, index, ops):
    """`values[c, index[c]]` for each call c (a row, for a table of tables)."""
    if ops is tf:
        return tf.gather(values, tf.cast(index, tf.int32), batch_dims=1)
    index = np.asarray(index).reshape(-1, *[1] * (values.ndim - 1))
    return np.take_along_axis(values, index, axis=1)[:, 0]


class LatencyCosts:
    """The latency (picoseconds) of a model with some of its channels removed,
    with the interface of `costs.CostModel` (`cost`, `cost_numpy`, `total_cost`,
    `first_order`, `budget`, `unit`).

    `tables` [calls, NODES, NODES]: each call's picoseconds at the widths
    `x.nodes` (its input) by `y.nodes` (its output); `sizes`: each group's
    channel count (channels numbered group after group); `offset`: picoseconds
    paid once per run of the model. `latency.latency_costs` also sets
    `measured` (seconds of the whole model), `layers` (its layers' sum alone,
    before scaling), `fixed_layers` (names timed at their own width only) and
    `cached` (read from disk).
    """

    def __init__(self, tables, x, y, sizes, offset, budget):
        self.budget, self.unit = budget, budget.unit
        self.tables = np.maximum(np.asarray(tables, np.float64).reshape(-1, NODES, NODES), 0.0)
        self.x, self.y = x, y
        self.sizes = np.asarray(sizes, np.int64)
        self._group_of = np.repeat(np.arange(len(self.sizes)), self.sizes)
        self.offset = int(round(offset))
        self.total_cost = self.cost_numpy(np.zeros(int(self.sizes.sum()), bool))
        self.first_order = self._first_order()

    def _per_call(self, kept, ops):
        """Each call's interpolated picoseconds (float64) when the groups keep `kept`."""
        (i, u), (j, v) = self.x.cell(self.x.width(kept, ops), ops), self.y.cell(self.y.width(kept, ops), ops)
        low, high = _pick(self.tables, i, ops), _pick(self.tables, i + 1, ops)
        along = [(1 - v) * _pick(row, j, ops) + v * _pick(row, j + 1, ops) for row in (low, high)]
        return ops.maximum((1 - u) * along[0] + u * along[1], 0.0)

    def cost_numpy(self, removed):
        """The cost (a Python int) with the channels where `removed` is True gone."""
        lost = np.bincount(self._group_of, weights=np.asarray(removed, np.float64), minlength=len(self.sizes))
        per_call = np.round(self._per_call(self.sizes - lost, np)).astype(np.int64)
        return int(per_call.sum()) + self.offset

    def cost(self, removed):
        """`cost_numpy` in TensorFlow ops: `removed` a bool [total] tensor; int64 scalar."""
        lost = tf.math.unsorted_segment_sum(tf.cast(removed, tf.float64), self._group_of, len(self.sizes))
        per_call = tf.cast(tf.round(self._per_call(tf.constant(self.sizes, tf.float64) - lost, tf)), tf.int64)
        return tf.reduce_sum(per_call) + self.offset

    def seconds(self, removed):
        """The predicted latency (seconds) with the channels flagged in `removed` gone."""
        return self.cost_numpy(removed) / PICOSECONDS

    def calibrated(self, measured):
        """A copy fitted to `measured`, pairs `(removed, share)`: with the channels of
        `removed` gone the model ran `share` of its dense time. The layers' tables
        are scaled (least squares over the pairs) and the rest of the same dense
        total counted as time no channel saves. The scale stays within [1/2, 2]: a
        measurement further off is taken as noise. Returns self where no pair
        removes anything."""
        pairs = [(self.total_cost - self.cost_numpy(r), (1.0 - s) * self.total_cost)
                 for r, s in measured if 0.0 < s < 1.0]
        saved, wanted = np.array([p for p in pairs if p[0] > 0], np.float64).reshape(-1, 2).T
        if not len(saved):
            return self
        scale = float(np.clip(np.dot(saved, wanted) / np.dot(saved, saved), 0.5, 2.0))
        found = LatencyCosts(self.tables * scale, self.x, self.y, self.sizes,
                             self.total_cost - scale * (self.total_cost - self.offset), self.budget)
        for name in ("measured", "layers", "fixed_layers", "cached"):
            if hasattr(self, name):
                setattr(found, name, getattr(self, name))
        return found

    def _first_order(self):
        """What removing each channel alone saves (float64 [total], never below 1):
        each table's last step, along every width the channel's group is part of."""
        per_group = np.zeros(len(self.sizes))
        for axis, values in ((self.x, self.tables[:, :, -1]), (self.y, self.tables[:, -1, :])):
            np.add.at(per_group, axis.group, axis.repeat * axis.slope_at_full(values)[axis.call])
        return np.maximum(per_group[self._group_of], 1.0)


def table(xs, ys, times):
    """`(x nodes, y nodes, table)` of one call from its timings `times` at the
    widths `xs` by `ys` (every pair of the distinct ones timed once or more:
    their mean). An axis timed at one width gets NODES around it alike; at two,
    a node half way. No entry is below one at narrower widths: timing noise
    never makes a wider layer look faster."""
    dx, dy = sorted(set(xs)), sorted(set(ys))
    sums, counts = np.zeros((len(dx), len(dy))), np.zeros((len(dx), len(dy)))
    for x, y, t in zip(xs, ys, times):
        sums[dx.index(x), dy.index(y)] += t
        counts[dx.index(x), dy.index(y)] += 1
    if not counts.all():
        raise ValueError(f"timings at widths {list(zip(xs, ys))} do not cover every pair")
    values = sums / counts
    dx, values = _three(dx, values, 0)
    dy, values = _three(dy, values, 1)
    return dx, dy, np.maximum.accumulate(np.maximum.accumulate(values, axis=0), axis=1)


def _three(nodes, values, axis):
    """`nodes` and `values` along `axis` made NODES long (see `table`)."""
    if len(nodes) == NODES:
        return list(nodes), values
    if len(nodes) == 1:
        return [nodes[0] - 2, nodes[0] - 1, nodes[0]], np.repeat(values, NODES, axis)
    low, high = np.take(values, 0, axis), np.take(values, 1, axis)
    return [nodes[0], (nodes[0] + nodes[1]) / 2, nodes[1]], np.stack([low, (low + high) / 2, high], axis)
