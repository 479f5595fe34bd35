"""`shrink()`: a channel-pruned model rebuilt physically smaller, as plain Keras layers."""

import collections

import keras
import numpy as np

from dg2pf_tf.channels import graph
from dg2pf_tf.core import masking
from dg2pf_tf.core.strip import strip
from dg2pf_tf.model import clone, fold


def _unread(group):
    """Which channels of `group` (a `graph.ChannelGroup`) no layer reads any more:
    every kernel row consuming them is exactly zero."""
    readers = [s for s in group.slices if s.role == graph.CONSUMES]
    unread = np.full(group.size, bool(readers))
    for s in readers:
        unread &= ~np.any(s.per_channel() != 0, axis=1)
    return unread


def _removed(unread):
    """The positions of the `unread` channels of a group, one always kept (a layer needs one)."""
    unread = unread.copy()
    if unread.all():
        unread[0] = False
    return np.flatnonzero(unread)


def shrink(model, *, fold_batchnorm=False):
    """A smaller plain Keras copy of `model` without its pruned channels.

    A channel goes when nothing reads it any more: every kernel row that
    consumes it (in any layer `graph.channel_groups` couples to it) is
    exactly zero, as channel pruning leaves it. Its filters (units, attention
    heads, feed-forward units), BatchNorm parameters and statistics go with
    it, so the copy computes what `model` computes at inference, and it
    loads without dg2pf_tf. A pruned model is stripped first. A residual
    block one of whose own groups lost every channel (`floor=0`) goes whole:
    its branch then adds the same numbers to any input, and becomes a
    `Rescaling` of the other input by 1 with those numbers as its offset.
    `fold_batchnorm=True` also folds each BatchNormalization that follows a
    linear convolution or Dense layer into it (an inference model: same
    outputs to float32 rounding, one memory-bound pass less each). Raises
    ValueError for a model that is not a layer graph.
    """
    plain = strip(model) if masking.pruned_models(model) else model
    found = graph.channel_groups(plain)
    unread = {id(group): _unread(group) for group in found.groups}
    cut = collections.defaultdict(set)  # (id(variable), axis) -> positions removed
    for group in found.groups:
        removed = _removed(unread[id(group)])
        for s in group.slices:
            cut[(id(s.variable), s.axis)].update(s.rows[removed].reshape(-1).tolist())
    sizes = collections.defaultdict(dict)  # layer name -> {config key: channels left}
    for layer, key, size in found.pinned:
        sizes[layer][key] = size
    for group in found.groups:
        for s in group.slices:
            if s.role == graph.PRODUCES:
                sizes[s.layer][s.size_key] = s.variable.shape[s.axis] - len(cut[(id(s.variable), s.axis)])

    def rebuilt(layer):
        reshaped = layer.name in found.reshapes
        if not getattr(layer, "weights", None) and layer.name not in sizes and not reshaped:
            return None  # nothing to resize: a plain copy
        config = layer.get_config()
        for key, size in sizes.get(layer.name, {}).items():
            config[key] = clone.resized(config[key], int(size))
        if reshaped:  # (1, ..., 1, channels): the channels are what is left
            config["target_shape"] = (*config["target_shape"][:-1], -1)
        return clone.Rebuilt(type(layer).from_config(config), [_cut(w, cut) for w in layer.weights])

    smaller = clone.copy(plain, rebuilt)
    emptied = [b for b in found.blocks if any(unread[id(g)].all() for g in b.groups)]
    smaller = blocks_removed(smaller, emptied)
    return fold.fold_batchnorm(smaller)[0] if fold_batchnorm else smaller


def _cut(variable, cut):
    value = keras.ops.convert_to_numpy(variable)
    for axis in range(value.ndim):
        positions = cut.get((id(variable), axis))
        if positions:
            value = np.delete(value, sorted(positions), axis=axis)
    return value


def _constant(model, block):
    """What `block`'s branch in `model` adds: its output on zeros, one value per
    channel, or None where it varies along the other axes (a padded convolution
    after the emptied group: then the branch stays, one channel wide)."""
    first = model.get_layer(block.branch[0])
    shape = [1] + [8 if d is None else d for d in first.input.shape[1:]]
    x = np.zeros(shape, np.float32)
    for name in block.branch:
        x = model.get_layer(name)(x)
    x = keras.ops.convert_to_numpy(x)
    flat = x.reshape(-1, x.shape[-1])
    if not np.allclose(flat, flat[:1], rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(flat).max()))):
        return None
    return flat[0]


def blocks_removed(model, emptied):
    """`model` without the branches of the `blocks.ResidualBlock`s `emptied`, whose
    output does not depend on their input: each `Add` becomes its other input
    plus the branch's constant (an `Identity` where that is zero)."""
    replaced, branches = {}, set()
    for block in emptied:
        offset = _constant(model, block)
        if offset is None:
            continue
        replaced[block.add] = (block.skip, offset)
        branches.update(block.branch)
    if not replaced:
        return model

    def rebuild(layer):
        if layer.name in branches:  # still called while copying, read by nothing kept
            return clone.Rebuilt(keras.layers.Identity(name=layer.name), None, inputs_only=True)
        if layer.name in replaced:
            skip, offset = replaced[layer.name]
            new = (keras.layers.Identity(name=layer.name) if not offset.any() else
                   keras.layers.Rescaling(1.0, offset=offset.tolist(), name=layer.name))
            return clone.Rebuilt(new, None, only_input=skip)
        return None
    return clone.copy(model, rebuild)
