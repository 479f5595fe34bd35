"""Mask state of a pruned model: finding it, and setting a sparsity level on the device."""

import weakref

import numpy as np
import tensorflow as tf

from dg2pf_tf import _compat, criteria
from dg2pf_tf.device_criteria import DeviceCriterion
from dg2pf_tf.pruned_model import PrunedModel


def pruned_models(model):
    """Every `PrunedModel` in `model` (itself included), each once, in layer order."""
    found = [model] if isinstance(model, PrunedModel) else []
    found += [l for l in _compat.sublayers(model, recursive=True) if isinstance(l, PrunedModel)]
    return list({id(m): m for m in found}.values())


def require_pruned(model, what):
    """The one `PrunedModel` in `model` (itself, or e.g. a `Distiller`'s student).

    Raises ValueError if there is none, or several.
    """
    found = pruned_models(model)
    if not found:
        raise ValueError(
            f"{what}: model '{model.name}' has no pruned weights. Call "
            f"`dg2pf_tf.prune(model)` first and train the model it returns.")
    if len(found) > 1:
        raise ValueError(
            f"{what}: model '{model.name}' holds {len(found)} pruned models "
            f"({[m.name for m in found]}); give it the one to update.")
    return found[0]


class MaskSet:
    """The pruned weights of a `PrunedModel`, their masks, and the device code that sets them.

    `assign(level)` recomputes every mask from the weights' current values
    (masked ones included, so pruned weights can return: weight recovery) with
    `DeviceCriterion`, in TensorFlow ops; call it inside a compiled training
    step. `update(level)` is the same, compiled on its own, for callbacks and
    custom loops. In hard mode masked weights are zeroed at once.
    """

    def __init__(self, pruned):
        # Weakly: `_SETS` keys on the model, and a strong reference here would keep both alive.
        self._pruned = weakref.ref(pruned)
        self.hard = pruned.hard
        self.scope = pruned.scope
        self.floor = pruned.floor
        self.entries = list(zip(pruned.targets, pruned.masks))
        self.sizes = [int(np.prod(m.shape)) for _, m in self.entries]
        self._criteria = {}
        self._update = tf.function(self.assign)

    @property
    def pruned(self):
        """The `PrunedModel` these masks belong to."""
        return self._pruned()

    def criterion(self, scope=None, floor=None):
        """The `DeviceCriterion` for `scope`/`floor` (default: the model's own)."""
        key = (self.scope if scope is None else criteria.check_scope(scope),
               self.floor if floor is None else criteria.check_floor(floor))
        if key not in self._criteria:
            shapes = [tuple(m.shape) for _, m in self.entries]
            self._criteria[key] = DeviceCriterion(shapes, *key)
        return self._criteria[key]

    def assign(self, level, scope=None, floor=None):
        """Sets the masks to sparsity `level` (a float64 scalar tensor), in graph code."""
        masks = self.criterion(scope, floor).masks([v.value for v, _ in self.entries], level)
        for (_, variable), mask in zip(self.entries, masks):
            variable.assign(mask)

        def zero_masked():
            for (weight, _), mask in zip(self.entries, masks):
                weight.assign(weight.value * tf.cast(mask, weight.dtype))
            return tf.constant(True)

        tf.cond(self.hard > 0.5, zero_masked, lambda: tf.constant(False))

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
        return mask_sparsity(self.pruned)


_SETS = weakref.WeakKeyDictionary()


def mask_set(model, what="update_masks()"):
    """The `MaskSet` of the pruned model in `model`, kept while the model lives.

    Raises ValueError if `model` holds no pruned model (or several).
    """
    pruned = require_pruned(model, what)
    cached = _SETS.get(pruned)
    if cached is None:
        cached = _SETS[pruned] = MaskSet(pruned)
    return cached


def update_masks(model, sparsity, scope=None, floor=None):
    """Sets the masks of pruned `model` to `sparsity` by global (or per-layer)
    magnitude, on the device, for custom training loops. Returns the realised
    sparsity. `scope` and `floor` default to the ones given to `prune()`.

    Raises ValueError if `model` has no pruned weights or `sparsity` is bad.
    """
    return mask_set(model).update(sparsity, scope, floor)


def set_hard(pruned, hard=True):
    """Switches a `PrunedModel` to hard masks (masked weights zeroed) or back to recovery."""
    pruned.hard.assign(1.0 if hard else 0.0)
    if hard:
        for weight, mask in zip(pruned.targets, pruned.masks):
            weight.assign(weight.value * tf.cast(mask.value, weight.dtype))


def mask_sparsity(pruned):
    """Fraction of zeros in the masks of a `PrunedModel`, over all its pruned weights."""
    masks = pruned.masks
    zeros = tf.add_n([tf.size(m, out_type=tf.int64) - tf.math.count_nonzero(m, dtype=tf.int64)
                      for m in masks])
    return float(zeros) / sum(int(np.prod(m.shape)) for m in masks)


def check_invariant(pruned, sparsity, source="the model"):
    """Raises ValueError unless the masks of `pruned` hold exactly the zeros the
    criterion gives `sparsity` (`round(sparsity * n)` globally, or per weight
    with scope 'layer') and, in hard mode, the masked weights are exactly 0."""
    masks = [m.numpy() for m in pruned.masks]
    total = sum(m.size for m in masks)
    zeros = sum(criteria.count_zeros(m) for m in masks)
    if pruned.scope == "layer":
        expected = sum(criteria.zero_count(sparsity, m.size) for m in masks)
    else:
        expected = criteria.zero_count(sparsity, total)
    if zeros != expected:
        raise ValueError(
            f"Sparsity invariant broken in {source}: the masks hold {zeros} zeros, "
            f"the target {sparsity} needs {expected} of {total}.")
    if float(pruned.hard.numpy()) != 1.0:
        return
    for weight, mask in zip(pruned.targets, masks):
        leaked = int(np.count_nonzero(weight.numpy()[mask == 0]))
        if leaked:
            raise ValueError(
                f"Sparsity invariant broken in {source}: {leaked} pruned weights of "
                f"'{weight.path}' are not zero.")
