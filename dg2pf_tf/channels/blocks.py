"""Residual blocks that can go whole: an `Add` of two tensors, one of them made by a
branch of single-input layer calls that nothing else reads.

A channel group whose every weight lies in such a branch (the inside width of a
bottleneck, the expanded width of an inverted residual) is the branch's own:
when it loses every channel, the layer reading it gets only zeros, so the
branch's output no longer depends on its input. The block is then its other
input plus what the branch adds to any input (its biases through the layers
after the cut), and `shrink` replaces the branch by that.
"""

import collections
import dataclasses

import keras

from dg2pf_tf import _compat


@dataclasses.dataclass(frozen=True, eq=False)
class ResidualBlock:
    """`add`: the name of the `Add` layer; `branch`: the names of the layers of the
    branch, input to output; `skip`: which input of the `Add` (0 or 1) is the other
    one; `groups`: the channel groups (`graph.ChannelGroup`) all of whose weights
    are in the branch: emptying any one of them makes the branch a constant."""

    add: str
    branch: tuple
    skip: int
    groups: tuple


def _branch(tensor, made_by, readers, calls):
    """The layer calls making `tensor`, last first, back to the first tensor that
    something else reads too: single-input, single-output calls of layers called
    once, each output read only by the next. Empty if `tensor` is not made so."""
    chain = []
    while readers[id(tensor)] == 1 and id(tensor) in made_by:
        node = made_by[id(tensor)]
        inputs = keras.tree.flatten(node.inputs)
        if len(inputs) != 1 or len(node.outputs) != 1 or calls[id(node.operation)] != 1:
            return []
        chain.append(node)
        tensor = inputs[0]
    return chain


def residual_blocks(model, groups):
    """The `ResidualBlock`s of Functional `model` whose branch holds at least one of
    the channel `groups` (`graph.ChannelGroup`s) entirely."""
    nodes = _compat.graph_nodes(model)
    made_by = {id(t): node for node in nodes for t in node.outputs}
    readers = collections.Counter(id(t) for node in nodes for t in keras.tree.flatten(node.inputs))
    readers.update(id(t) for t in keras.tree.flatten(model.outputs))
    calls = collections.Counter(id(node.operation) for node in nodes)
    found = []
    for node in nodes:
        merged = keras.tree.flatten(node.inputs)
        if type(node.operation) is not keras.layers.Add or len(merged) != 2:
            continue
        for side, tensor in enumerate(merged):
            chain = _branch(tensor, made_by, readers, calls)
            names = {n.operation.name for n in chain}
            inside = tuple(g for g in groups if {s.layer for s in g.slices} <= names)
            if inside:
                branch = tuple(n.operation.name for n in reversed(chain))
                found.append(ResidualBlock(node.operation.name, branch, 1 - side, inside))
                break
    return tuple(found)
