"""Mask state of a pruned model: its wrappers, and setting a sparsity level on the device."""

import weakref

import numpy as np
import tensorflow as tf

from dg2pf_tf import criteria
from dg2pf_tf.device_criteria import DeviceCriterion
from dg2pf_tf.wrapper import PruneWrapper


def find_wrappers(model):
    """Every `PruneWrapper` inside `model` (nested models included), in layer order."""
    if isinstance(model, PruneWrapper):
        return [model]
    seen, found = set(), []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, PruneWrapper) and id(layer) not in seen:
            seen.add(id(layer))
            found.append(layer)
    return found


def require_wrappers(model, what):
    """`find_wrappers(model)`, raising ValueError if there are none."""
    wrappers = find_wrappers(model)
    if not wrappers:
        raise ValueError(
            f"{what}: model '{model.name}' has no pruned layers. Call "
            f"`dg2pf_tf.prune(model)` first (or wrap layers with "
            f"`dg2pf_tf.PruneWrapper` in a subclassed model)."
        )
    unbuilt = [w.name for w in wrappers if not w.built]
    if unbuilt:
        raise ValueError(
            f"{what}: layers {unbuilt} of model '{model.name}' are not built, "
            f"so their masks cannot be set. Build the model first: call it on "
            f"a batch (`model(x[:1])`) or `model.build(input_shape)`."
        )
    return wrappers


class MaskSet:
    """The pruned kernels of a model, their masks, and the device code that sets them.

    `assign(level)` recomputes every mask from the kernels' current values
    (masked ones included, so pruned weights can return: weight recovery) with
    `DeviceCriterion`, in TensorFlow ops; call it inside a compiled training
    step. `update(level)` is the same, compiled on its own, for callbacks and
    custom loops. Kernels of wrappers in hard mode are zeroed where masked, so
    hard-pruned weights are exactly 0 at once.
    """

    def __init__(self, wrappers):
        self.wrappers = list(wrappers)
        self.scope = self.wrappers[0].scope
        self.floor = self.wrappers[0].floor
        self.entries = [(w, k, m) for w in self.wrappers for k, m in zip(w.kernels, w.masks)]
        self.sizes = [int(np.prod(m.shape)) for _, _, m in self.entries]
        self._criteria = {}
        self._update = tf.function(self.assign)

    def criterion(self, scope=None, floor=None):
        """The `DeviceCriterion` for `scope`/`floor` (default: the wrappers' own)."""
        key = (self.scope if scope is None else criteria.check_scope(scope),
               self.floor if floor is None else criteria.check_floor(floor))
        if key not in self._criteria:
            shapes = [tuple(m.shape) for _, _, m in self.entries]
            self._criteria[key] = DeviceCriterion(shapes, *key)
        return self._criteria[key]

    def assign(self, level, scope=None, floor=None):
        """Sets the masks to sparsity `level` (a float64 scalar tensor), in graph code."""
        masks = self.criterion(scope, floor).masks([k.value for _, k, _ in self.entries], level)
        for (_, _, variable), mask in zip(self.entries, masks):
            variable.assign(mask)
        def zero_masked(kernel, mask):
            kernel.assign(kernel.value * tf.cast(mask, kernel.dtype))
            return tf.constant(True)

        for (wrapper, kernel, variable), mask in zip(self.entries, masks):
            tf.cond(wrapper.hard > 0.5, lambda kernel=kernel, mask=mask: zero_masked(kernel, mask),
                    lambda: tf.constant(False))

    def update(self, level, scope=None, floor=None):
        """`assign(level)` as its own compiled call; returns the realised sparsity
        (computed from the shapes, without waiting for the device).

        Raises ValueError for a bad `level`, `scope` or `floor`.
        """
        level = criteria.check_sparsity(level)
        self.criterion(scope, floor)  # its variables are made here, not while tracing
        self._update(tf.constant(level, tf.float64), scope, floor)
        return self.realised(level, scope)

    def realised(self, level, scope=None):
        """The fraction of zeros the masks hold at `level`: exact, from the shapes."""
        scope = self.scope if scope is None else scope
        total = sum(self.sizes)
        if scope == "layer":
            return sum(criteria.zero_count(level, n) for n in self.sizes) / max(1, total)
        return criteria.zero_count(level, total) / max(1, total)

    def sparsity(self):
        """Fraction of zeros in the masks, counted on the device."""
        return mask_sparsity(self.wrappers)


_SETS = weakref.WeakKeyDictionary()


def mask_set(model, what="update_masks()"):
    """The `MaskSet` of pruned `model`, kept while the model lives.

    Raises ValueError if `model` has no pruned layers or they are not built.
    """
    wrappers = require_wrappers(model, what)
    cached = _SETS.get(model)
    if cached is None or [id(w) for w in cached.wrappers] != [id(w) for w in wrappers]:
        cached = _SETS[model] = MaskSet(wrappers)
    return cached


def update_masks(model, sparsity, scope=None, floor=None):
    """Sets the masks of pruned `model` to `sparsity` by global (or per-layer)
    magnitude, on the device, for custom training loops. Returns the realised
    sparsity. `scope` and `floor` default to the ones given to `prune()`.

    Raises ValueError if `model` has no pruned layers or `sparsity` is bad.
    """
    return mask_set(model).update(sparsity, scope, floor)


def set_hard(wrappers, hard=True):
    """Switches wrappers to hard masks (masked weights zeroed) or back to recovery."""
    for wrapper in wrappers:
        wrapper.hard.assign(1.0 if hard else 0.0)
        if hard:
            for kernel, mask in zip(wrapper.kernels, wrapper.masks):
                kernel.assign(kernel.value * tf.cast(mask.value, kernel.dtype))


def mask_sparsity(wrappers):
    """Fraction of zeros in the wrappers' masks, over all their prunable weights."""
    masks = [m for w in wrappers for m in w.masks]
    if not masks:
        return 0.0
    zeros = tf.add_n([tf.size(m, out_type=tf.int64) - tf.math.count_nonzero(m, dtype=tf.int64) for m in masks])
    return float(zeros) / sum(int(np.prod(m.shape)) for m in masks)


def check_invariant(wrappers, sparsity, source="the model"):
    """Raises ValueError unless the masked weights of hard-masked `wrappers`
    are exactly 0 and the masks hold exactly the zeros the criterion gives
    `sparsity` (`round(sparsity * n)` globally, or per kernel with scope 'layer')."""
    masks = [m.numpy() for w in wrappers for m in w.masks]
    total = sum(m.size for m in masks)
    zeros = total - sum(int(np.count_nonzero(m)) for m in masks)
    if wrappers[0].scope == "layer":
        expected = sum(criteria.zero_count(sparsity, m.size) for m in masks)
    else:
        expected = criteria.zero_count(sparsity, total)
    if zeros != expected:
        raise ValueError(
            f"Sparsity invariant broken in {source}: the masks hold {zeros} zeros, "
            f"the target {sparsity} needs {expected} of {total}.")
    for wrapper in wrappers:
        if float(wrapper.hard.numpy()) != 1.0:
            continue
        for kernel, mask in zip(wrapper.kernels, wrapper.masks):
            leaked = int(np.count_nonzero(kernel.numpy()[mask.numpy() == 0]))
            if leaked:
                raise ValueError(
                    f"Sparsity invariant broken in {source}: {leaked} pruned weights of "
                    f"'{wrapper.name}' are not zero.")
