"""Whether a weightless operation keeps channels apart, found by running it.

`structure` knows layers by type. Anything else without weights (the
`keras.ops` calls of a functional graph, such as MobileNetV3's `x + 3.0`, or a
Lambda layer) is run on random values instead: it keeps channels apart when
keeping a subset of its inputs' channels, in any order, keeps the same subset
of its output's channels and changes nothing else. A constant or a shape that
counts the channels (which `shrink()` could not cut) fails that test.
"""

import keras
import numpy as np

_UNKNOWN_SIZE = 3  # what the probe puts for each unknown dimension (the batch included)


def keeps_channels_apart(node):
    """True if `node` (a call in a layer graph, see `_compat.graph_nodes`) runs a
    weightless operation whose output's last axis maps one to one to its
    inputs' last axes (inputs of one channel broadcast), for any subset of them."""
    if getattr(node.operation, "weights", None) or len(node.outputs) != 1:
        return False
    tensors, out = node.input_tensors, node.outputs[0]
    channels = out.shape[-1] if len(out.shape) >= 2 else None
    if not channels or channels < 2 or not tensors:
        return False
    widths = [t.shape[-1] if len(t.shape) >= 2 else None for t in tensors]
    if channels not in widths or any(w not in (1, channels) for w in widths) \
            or not all(keras.backend.is_float_dtype(t.dtype) for t in tensors):
        return False
    rng = np.random.default_rng(0)
    values = {id(t): rng.standard_normal([_UNKNOWN_SIZE if d is None else d for d in t.shape])
              .astype("float32") for t in tensors}
    try:
        full = _run(node, values)
        for _ in range(2):
            keep = rng.permutation(channels)[: max(1, channels // 2)]
            part = _run(node, {k: v[..., keep] if v.shape[-1] == channels else v
                               for k, v in values.items()})
            if part.shape != full[..., keep].shape \
                    or not np.allclose(part, full[..., keep], rtol=1e-5, atol=1e-6, equal_nan=True):
                return False
    except Exception:  # an operation that cannot take fewer channels does not keep them apart
        return False
    return True


def _run(node, values):
    """`node`'s operation on `values` (by id of its symbolic inputs), as numpy."""
    def fill(x):
        return values[id(x)] if isinstance(x, keras.KerasTensor) else x
    args = keras.tree.map_structure(fill, list(node.arguments.args))
    kwargs = keras.tree.map_structure(fill, dict(node.arguments.kwargs))
    return keras.ops.convert_to_numpy(node.operation(*args, **kwargs))
