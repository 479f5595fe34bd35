"""The channel groups a pruned model can lose, as the positions of its variables that carry them."""

import dataclasses

import numpy as np

from dg2pf_tf.channels import graph
from dg2pf_tf.criteria.channel import Pair


@dataclasses.dataclass(frozen=True)
class Prunable:
    """The channel `groups` of a model that can lose channels, the `dense` ones
    (`graph.DenseGroup`s, with the reason) and the `graph.Width` of each layer
    call's tensors (a group counted there that is not in `groups` is fixed);
    `emptiable`: for each of `groups`, whether it lies inside a residual branch,
    so that losing all its channels removes that block (`blocks`)."""

    groups: list
    dense: list
    widths: dict
    emptiable: list = dataclasses.field(default_factory=list)


def prunable_groups(model, targets):
    """The `Prunable` groups of `model`: those whose kernels are all among
    `targets` (the variables being pruned)."""
    found = graph.channel_groups(model)
    ids = {id(t) for t in targets}
    groups, dense = [], list(found.dense)
    for group in found.groups:
        outside = [s.layer for s in group.slices
                   if s.role != graph.PASSES and id(s.variable) not in ids]
        if outside:
            dense.append(graph.DenseGroup(group.name, group.size,
                                          f"'{outside[0]}' is not pruned (excluded or not prunable)"))
        else:
            groups.append(group)
    inside = {id(g) for block in found.blocks for g in block.groups}
    return Prunable(groups, dense, found.widths, [id(g) in inside for g in groups])


def channel_pairs(groups):
    """The `criteria.channel.Pair` of every (variable, axis) the slices of `groups`
    touch; channels are numbered group after group, and the total marks
    positions of none."""
    sizes = [g.size for g in groups]
    starts, total = np.cumsum([0, *sizes[:-1]]), sum(sizes)
    index = {}
    for group, start in zip(groups, starts):
        for s in group.slices:
            key = (id(s.variable), s.axis)
            if key not in index:
                index[key] = Pair(s.variable, s.axis, np.full(s.variable.shape[s.axis], total, np.int32))
            index[key].channel[s.rows] = start + np.arange(group.size)[:, None]
    return list(index.values())
