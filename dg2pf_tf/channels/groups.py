"""The channel groups a pruned model can lose, as the positions of its variables that carry them."""

import numpy as np

from dg2pf_tf.channels import graph
from dg2pf_tf.criteria.channel import Pair


def prunable_groups(model, targets):
    """`(groups, dense)`: the channel groups of `model` whose kernels are all
    among `targets` (the variables being pruned), and `graph.DenseGroup`s
    for the rest, with the reason."""
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
    return groups, dense


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
