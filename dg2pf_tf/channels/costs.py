"""What channels cost: the multiply-accumulates or parameters a model spends on them, counted exactly.

A `CostModel` writes a model's cost as a sum of terms, one per weight
variable: `uses * kept(axis 1) * kept(axis 2) * ...`, where `uses` is how
often one entry of the weight is used per example (MACs: once per output
position of the layer that holds the kernel; parameters: once) and `kept` is
an axis's length after pruning: smaller along the axes that carry channels of
prunable groups. So the cost of any set of removed channels is exact (a
convolution that loses inputs and outputs loses their product), and the same
integer arithmetic runs in numpy (the reference) and in TensorFlow ops
(inside the training step, `ChannelCriterion` with a budget).

MACs count the kernels prunable layers multiply with: convolutions
(depthwise, separable and transposed ones too; at the positions they write,
transposed ones at those they read), `Dense` and `EinsumDense` layers, attention
projections (at the query's or the key's and value's positions), recurrent
kernels (once per step), and such kernels inside a layer made of others (once
per position of its input). An unknown sequence length counts once (MACs per
token). Embedding lookups, biases, normalisation, activations and the
attention scores themselves cost nothing here.
"""

import keras
import numpy as np
import tensorflow as tf

from dg2pf_tf import _compat, settings
from dg2pf_tf.channels import graph
from dg2pf_tf.model import layer_kinds, walk
from dg2pf_tf.model.layer_kinds import Uses


def _count(dims, layer, what):
    """The product of `dims`, where an unknown size is refused with `what` said."""
    if any(d is None for d in dims):
        raise ValueError(
            f"budget='macs' counts multiply-accumulates at the model's input size, and layer "
            f"'{layer.name}' ({type(layer).__name__}) has an {what} of unknown size "
            f"{tuple(dims)}. Build the model for a fixed input size (keras.Input((224, 224, 3)), "
            f"or `input_shape=` for keras.applications).")
    return int(np.prod(dims, dtype=np.int64))


def _per_position(tensor, layer, what, spatial):
    """Positions of `tensor` ([batch, *positions, channels]); for a `spatial` layer they
    must be known, elsewhere an unknown length counts once (MACs per token)."""
    first = getattr(layer, "data_format", "channels_last") == "channels_first"
    dims = tensor.shape[2:] if first else tensor.shape[1:-1]
    if spatial:
        return _count(dims, layer, what)
    return int(np.prod([1 if d is None else d for d in dims], dtype=np.int64))


def _attention_uses(node, spatial):
    """`{id(kernel): uses}` of a MultiHeadAttention call: the query and output projections
    once per query position, the key and value projections once per key and value position."""
    layer = node.operation
    query, key, value = graph.attention_inputs(node)
    reads = ((layer.query_dense, query), (layer.key_dense, key), (layer.value_dense, value),
             (layer.output_dense, query))
    return {id(dense.kernel): _per_position(x, layer, "input", spatial) for dense, x in reads}


def _layer_uses(node):
    """`{id(kernel): uses}` of one call of a layer with weights, by its kind's `Uses`
    (a layer of no listed kind: its kernels once per position of its input)."""
    layer = node.operation
    kind = layer_kinds.kind_of(layer)
    uses = Uses.INPUT_POSITIONS if kind is None else kind.uses
    spatial = kind is not None and kind.spatial
    if uses is Uses.ATTENTION and kind.follows(layer):  # a subclass may call with other arguments
        return _attention_uses(node, spatial)
    if uses is Uses.ATTENTION:
        uses = Uses.INPUT_POSITIONS
    if uses is Uses.OUTPUT_POSITIONS:
        count = _per_position(node.outputs[0], layer, "output", spatial)  # strided: where it writes
    elif node.inputs:
        count = _per_position(node.inputs[0], layer, "input", spatial)
    else:
        return {}
    return {id(v): count for v in walk.multiplying_kernels(layer)}


def kernel_uses(model):
    """`{id(variable): uses}`: how often each entry of each kernel of Sequential or
    Functional `model` is multiplied per example (nested graphs included; a layer
    called twice counts twice).

    Raises ValueError where a convolution's positions have no fixed size.
    """
    uses = {}
    for node in _compat.graph_nodes(model) or ():
        layer = node.operation
        if not isinstance(layer, keras.layers.Layer) or not layer.weights:
            continue
        if _compat.graph_nodes(layer) is not None and isinstance(layer, keras.Model):
            try:
                counts = kernel_uses(layer)
            except ValueError as error:
                raise ValueError(f"Inside model '{layer.name}': {error} (a nested model needs a fixed input "
                                 f"size of its own).") from None
        else:
            counts = _layer_uses(node)
        for key, count in counts.items():
            uses[key] = uses.get(key, 0) + count
    return uses


def model_macs(model):
    """Multiply-accumulates of one example through Sequential or Functional `model`,
    counted as `CostModel` counts them. Raises ValueError as `kernel_uses` does."""
    uses = kernel_uses(model)
    return sum(uses.get(id(v), 0) * int(np.prod(v.shape, dtype=np.int64)) for v in model.weights)


class CostModel:
    """The exact cost of a model with some of its `total` channels removed.

    The cost is a sum of `terms`, each `(constant, axes)`: an integer constant
    times the length each of `axes` keeps. `axes` index `channels`: one int
    array per axis, the channel (0..total-1) at each of its positions, `total`
    where none is, so an axis keeps its positions whose channel stays. `cost(removed)`
    (TensorFlow, int64) and `cost_numpy(removed)` give the cost with the channels
    flagged in `removed` gone; `first_order` is what removing each channel alone
    saves; `budget` (a `settings.Budget`) says what is counted.
    """

    def __init__(self, channels, terms, total, budget):
        self.budget, self.unit = budget, budget.unit
        sentinel = len(channels)  # an axis of length 1 that never shrinks
        self.sizes = np.array([len(c) for c in channels] + [1], np.int64)
        width = max([1] + [len(axes) for _, axes in terms])
        self.slots = np.array([list(axes) + [sentinel] * (width - len(axes)) for _, axes in terms],
                              np.int64).reshape(-1, width)
        self.constants = np.array([int(c) for c, _ in terms], np.int64)
        # Position -> (channel, axis), over all axes: what removing channels takes from each axis.
        self._channel = np.concatenate([np.asarray(c) for c in channels] or [np.zeros(0, np.int64)]).astype(np.int64)
        self._pair = np.repeat(np.arange(len(channels)), [len(c) for c in channels]).astype(np.int64)
        self.total_cost = self.cost_numpy(np.zeros(total, bool))
        self.first_order = self._first_order(total)

    def _kept_numpy(self, removed):
        flags = np.append(np.asarray(removed, bool), False)
        lost = np.bincount(self._pair, weights=flags[self._channel], minlength=len(self.sizes) - 1)
        return np.append(self.sizes[:-1] - lost.astype(np.int64), 1)

    def cost_numpy(self, removed):
        """The cost (a Python int) with the channels where `removed` is True gone."""
        kept = self._kept_numpy(removed)
        return int(np.sum(self.constants * np.prod(kept[self.slots], axis=1)))

    def cost(self, removed):
        """`cost_numpy` in TensorFlow ops: `removed` a bool [total] tensor; int64 scalar."""
        flags = tf.concat([tf.cast(removed, tf.int64), [0]], 0)
        lost = tf.math.unsorted_segment_sum(tf.gather(flags, self._channel), self._pair, len(self.sizes) - 1)
        kept = tf.concat([self.sizes[:-1] - lost, [1]], 0)
        return tf.reduce_sum(self.constants * tf.reduce_prod(tf.gather(kept, self.slots), axis=1))

    def _first_order(self, total):
        """What removing each channel alone saves (float64 [total]), never below 1."""
        saved = np.zeros(total + 1)
        full = self.sizes[self.slots]
        for j in range(self.slots.shape[1]):
            others = np.prod(np.delete(full, j, axis=1), axis=1) * self.constants
            per_pair = np.zeros(len(self.sizes))
            np.add.at(per_pair, self.slots[:, j], others)
            np.add.at(saved, self._channel, per_pair[self._pair])
        return np.maximum(saved[:total], 1.0)


def weight_terms(factors, pairs):
    """`(channels, terms)` of a `CostModel` counting `factors`, `(variable, uses)`:
    each entry of `variable` costs `uses`; `pairs` (`criteria.channel.Pair`s) list
    every (variable, axis) that carries channels."""
    by_pair = {(id(p.variable), p.axis): i for i, p in enumerate(pairs)}
    terms = []
    for variable, uses in factors:
        shape = [int(d) for d in variable.shape]
        mine = tuple(by_pair[(id(variable), a)] for a in range(len(shape)) if (id(variable), a) in by_pair)
        rest = [d for a, d in enumerate(shape) if (id(variable), a) not in by_pair]
        terms.append((uses * int(np.prod(rest, dtype=np.int64)), mine))
    return [p.channel for p in pairs], terms


def _mac_factors(model):
    uses = kernel_uses(model)
    return [(v, uses[id(v)]) for v in model.weights if uses.get(id(v))]


def _param_factors(model):
    return [(v, 1) for v in model.weights]


# What each budget counts, by its type.
_FACTORS = {settings.MACs: _mac_factors, settings.Params: _param_factors}


def weight_cost_model(model, pairs, total, budget):
    """The `CostModel` of `budget` (`settings.MACs` or `settings.Params`) for Sequential
    or Functional `model`, whose prunable groups carry `total` channels along `pairs`.

    Raises ValueError where MACs cannot be counted (see `kernel_uses`).
    """
    return CostModel(*weight_terms(_FACTORS[type(budget)](model), pairs), total, budget)
