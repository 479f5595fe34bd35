"""BatchNormalization folded into the convolution or Dense layer that feeds it.

At inference a BatchNormalization layer is a per-channel scale and shift,
`gamma * (x - mean) / sqrt(var + epsilon) + beta`, so when it reads a linear
layer's output and nothing else reads that output, the scale goes into the
layer's kernel and the shift into its bias, and the BatchNormalization layer
becomes `keras.layers.Identity`. The folded copy computes the same outputs
(to float32 rounding) with one memory-bound pass less per BatchNormalization;
it is for inference: training it would no longer normalise batches.
"""

import collections

import keras
import numpy as np

from dg2pf_tf import _compat
from dg2pf_tf.model import clone, layer_kinds, walk

L = keras.layers


def _made_by(layer):
    """`(kernel attribute, n)` of `layer` when a BatchNormalization after it can fold
    into it (`LayerKind.makes_channels`, for its own class only, not a subclass's)."""
    kind = layer_kinds.kind_of(layer)
    if kind is None or type(layer) not in kind.types:
        return ()
    return kind.makes_channels


def _graphs(model):
    """`model` and the layer graphs nested in it."""
    found = [model]
    for layer in walk.layers(model):
        if isinstance(layer, keras.Model) and _compat.graph_nodes(layer) is not None:
            found.append(layer)
    return found


def _foldable_pairs(model):
    """{id of a BatchNormalization layer: the layer it folds into}, for every pair whose
    fold keeps the outputs: a linear layer called once, read only by a
    BatchNormalization over its channels (last axis), itself called once."""
    pairs = {}
    for graph in _graphs(model):
        calls = _compat.graph_nodes(graph) or []
        readers = collections.Counter(id(t) for call in calls for t in keras.tree.flatten(call.inputs))
        readers.update(id(t) for t in keras.tree.flatten(graph.outputs))
        times_called = collections.Counter(id(call.operation) for call in calls)
        for call in calls:
            bn = call.operation
            if type(bn) is not L.BatchNormalization or len(call.inputs) != 1 or times_called[id(bn)] != 1:
                continue
            source = _compat.producer(call.inputs[0])
            if (source is None or not _made_by(source) or times_called[id(source)] != 1
                    or readers[id(call.inputs[0])] != 1
                    or keras.activations.serialize(source.activation) not in ("linear", None)
                    or bn.axis not in (-1, len(call.inputs[0].shape) - 1)):
                continue
            pairs[id(bn)] = source
    return pairs


def _numpy(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable), np.float64)


def _scale_and_shift(bn):
    mean, var = _numpy(bn.moving_mean), _numpy(bn.moving_variance)
    gamma = _numpy(bn.gamma) if bn.scale else np.ones_like(mean)
    beta = _numpy(bn.beta) if bn.center else np.zeros_like(mean)
    scale = gamma / np.sqrt(var + bn.epsilon)
    return scale, beta - mean * scale


def _folded_weights(layer, bn):
    """`layer`'s weights, in its order (a separable layer's depthwise kernel
    first), with `bn` folded into its kernel and a bias."""
    scale, shift = _scale_and_shift(bn)
    name, axes = _made_by(layer)
    kernel = getattr(layer, name)
    folded = _numpy(kernel)
    folded = folded * scale.reshape(folded.shape[-axes:])
    bias = (_numpy(layer.bias) if layer.use_bias else 0.0) * scale + shift
    others = [_numpy(w) for w in layer.weights if w is not kernel and w is not layer.bias]
    return [v.astype(np.float32) for v in (*others, folded, bias)]


def fold_batchnorm(model):
    """A copy of layer-graph `model` with each BatchNormalization that follows a
    linear Conv, SeparableConv, DepthwiseConv or Dense layer folded into it
    (see the module's docstring); the others are kept. Returns `(copy, count)`:
    the copy and how many were folded; `(model, 0)` itself when none can be
    (a subclassed model's calls cannot be read, so none of its can).
    """
    pairs = _foldable_pairs(model)
    if not pairs:
        return model, 0
    bns = {id(layer): layer for layer in walk.layers(model)}
    sources = {id(source): bns[bn] for bn, source in pairs.items()}

    def rebuilt(layer):
        if id(layer) in pairs:
            return clone.Rebuilt(L.Identity(name=layer.name, dtype=layer.dtype_policy.name), [], inputs_only=True)
        bn = sources.get(id(layer))
        if bn is None:
            return None
        config = {**layer.get_config(), "use_bias": True}
        return clone.Rebuilt(type(layer).from_config(config), _folded_weights(layer, bn))

    return clone.copy(model, rebuilt), len(pairs)
