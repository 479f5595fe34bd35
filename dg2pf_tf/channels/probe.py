"""Whether a weightless operation keeps channels apart, found by running it.

`structure` knows layers by type. Anything else without weights (the
`keras.ops` calls of a functional graph, such as MobileNetV3's `x + 3.0`, or a
Lambda layer) is run on random values instead: it keeps channels apart when
keeping a subset of its inputs' channels, in any order, keeps the same subset
of its output's channels and changes nothing else, and its symbolic output
(what `shrink()` rebuilds from) is as narrow. A constant or a shape that
counts the channels fails that test. Layers that make a Keras mask (Masking)
are not probed: the mask they pass on reads every channel. Activation
functions (of any layer) are probed the same way by `elementwise`.
"""

import warnings

import keras
import numpy as np

_UNKNOWN_SIZE = 3  # what the probe puts for each unknown dimension (the batch included)


def keeps_channels_apart(node):
    """True if `node` (a call in a layer graph, see `_compat.graph_nodes`) runs a
    weightless operation whose output's last axis maps one to one to its
    inputs' last axes (inputs of one channel broadcast), for any subset of them."""
    op = node.operation
    if getattr(op, "weights", None) or len(node.outputs) != 1 or _makes_masks(op):
        return False
    tensors, out = node.inputs, node.outputs[0]
    channels = out.shape[-1] if len(out.shape) >= 2 else None
    if not channels or channels < 2 or not tensors:
        return False
    widths = [t.shape[-1] if len(t.shape) >= 2 else None for t in tensors]
    if channels not in widths or any(w not in (1, channels) for w in widths) \
            or not all(keras.backend.is_float_dtype(t.dtype) for t in tensors):
        return False
    rng = np.random.default_rng(0)
    values = {id(t): _values(rng, [_UNKNOWN_SIZE if d is None else d for d in t.shape]) for t in tensors}

    def narrowed(keep):
        part = {k: v[..., keep] if v.shape[-1] == channels else v for k, v in values.items()}
        symbolic = {k: keras.KerasTensor((None, *v.shape[1:])) for k, v in part.items()}
        if _call(node, symbolic, spec=True).shape[-1] != len(keep):
            return None  # it would rebuild claiming its old width
        return _call(node, part)

    return _subsets_agree(lambda: _call(node, values), narrowed, channels, rng)


def elementwise(function, channels):
    """True if activation `function` maps each of `channels` channels on its
    own and alike (not a softmax, which mixes them)."""
    rng = np.random.default_rng(0)
    x = _values(rng, (_UNKNOWN_SIZE, max(2, channels)))
    return _subsets_agree(lambda: function(x), lambda keep: function(x[:, keep]), x.shape[-1], rng)


def _values(rng, shape):
    # Rounded, with zeros: ties and exact zeros are where thresholds show.
    return np.round(rng.standard_normal(shape), 1).astype("float32")


def _subsets_agree(full, narrowed, channels, rng):
    """True if `narrowed(keep)` equals `full()[..., keep]` for subsets of 1,
    half and all but one of `channels` (random, in random order; and the
    first and the last channel alone)."""
    subsets = [np.array([0]), np.array([channels - 1])]
    subsets += [rng.permutation(channels)[:size] for size in (1, max(1, channels // 2), channels - 1)
                for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. Keras' note on a softmax over one channel
        try:
            whole = keras.ops.convert_to_numpy(full())
            for keep in subsets:
                got = narrowed(keep)
                if got is None:
                    return False
                got = keras.ops.convert_to_numpy(got)
                if got.shape != whole[..., keep].shape or not np.allclose(
                        got, whole[..., keep], rtol=1e-5, atol=1e-6, equal_nan=True):
                    return False
        except Exception:  # an operation that cannot take fewer channels does not keep them apart
            return False
    return True


def _makes_masks(op):
    """True for a layer whose own `compute_mask` may make a mask from its input."""
    if not isinstance(op, keras.layers.Layer):
        return False
    if isinstance(op, keras.layers.Lambda):
        return op.mask is not None
    return type(op).compute_mask is not keras.layers.Layer.compute_mask


def _call(node, values, spec=False):
    """`node`'s operation on `values` (by id of its symbolic inputs); with
    `spec`, its symbolic output, as Keras infers it when it rebuilds a graph."""
    def fill(x):
        return values[id(x)] if isinstance(x, keras.KerasTensor) else x
    args = keras.tree.map_structure(fill, list(node.args))
    kwargs = keras.tree.map_structure(fill, dict(node.kwargs))
    run = node.operation.compute_output_spec if spec else node.operation
    return run(*args, **kwargs)
