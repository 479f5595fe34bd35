"""Mask state of a pruned model: finding it, and setting a sparsity level on the device."""

import weakref

import numpy as np
import tensorflow as tf

from dg2pf_tf import checks, settings
from dg2pf_tf.channels import budgets, groups
from dg2pf_tf.core.pruned_model import PrunedModel
from dg2pf_tf.criteria.channel import ChannelCriterion
from dg2pf_tf.criteria.magnitude import DeviceCriterion
from dg2pf_tf.criteria.nm import NMCriterion
from dg2pf_tf.model import walk


def pruned_models(model):
    """Every `PrunedModel` in `model` (itself included), each once, in layer order."""
    return walk.layers_of(model, PrunedModel)


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
    the model's `Criterion` (by its structure), in TensorFlow ops; call it inside a compiled training
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
        self._criteria = {}
        self._update = tf.function(self.assign)

    @property
    def pruned(self):
        """The `PrunedModel` these masks belong to."""
        return self._pruned()

    def criterion(self, scope=None, floor=None):
        """The `criteria.protocol.Criterion` for `scope`/`floor` (default: the model's own)."""
        key = (self.scope if scope is None else checks.check_scope(scope),
               self.floor if floor is None else checks.check_floor(floor))
        if key not in self._criteria:
            pruned = self.pruned
            self._criteria[key] = _CRITERIA[type(pruned.structure)](pruned, *key)
        return self._criteria[key]

    def settle(self, criterion):
        """Uses `criterion` for the model's own scope and floor from now on (a
        latency budget's, calibrated on the model it selects)."""
        self._criteria[(self.scope, self.floor)] = criterion

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
        level = checks.check_sparsity(level)
        # Its variables are made here, not while tracing.
        ceiling = self.criterion(scope, floor).max_level
        if level > ceiling + 1e-12:
            raise ValueError(
                f"Sparsity {level} is above what structure '{self.pruned.structure}' can reach "
                f"({ceiling:g}).")
        self._update(tf.constant(level, tf.float64), scope, floor)
        return self.realised(level, scope, floor)

    def realised(self, level, scope=None, floor=None):
        """What `level` removes, exactly, from the shapes: the fraction of zeros
        the masks hold, or of channels with structure 'channel'."""
        return self.criterion(scope, floor).realised(level)

    def sparsity(self):
        """Fraction of zeros in the masks, counted on the device."""
        return mask_sparsity(self.pruned)


def _weight_criterion(pruned, scope, floor):
    return DeviceCriterion([tuple(m.shape) for m in pruned.masks], scope, floor)


def _channel_criterion(pruned, scope, floor):
    if scope != "global":
        raise ValueError(
            "Channel pruning ranks channels globally; for the same share in every group, "
            "use scope='global' with floor=1.0.")
    targets, model = pruned.targets, pruned.model
    prunable = groups.prunable_groups(model, targets)
    found = prunable.groups
    if not found:
        raise ValueError(
            f"Model '{model.name}' has no channel group that can be pruned; "
            f"`dg2pf_tf.channel_groups(model)` lists them and why each stays dense.")
    pairs, sizes = groups.channel_pairs(found), [g.size for g in found]
    cost = budgets.cost_model(model, prunable, sum(sizes), pruned.budget) if pruned.budget.counts_cost else None
    # floor=0: a group inside a residual branch may lose every channel, and the block goes.
    least = [0 if floor == 0 and inside else 1 for inside in prunable.emptiable]
    return ChannelCriterion(sizes, pairs, targets, floor, cost, least, pruned.budget.round_to)


def _nm_criterion(pruned, scope, floor):
    if floor:
        raise ValueError("An N:M pattern takes no `floor`: every block keeps the same share.")
    targets, pattern = pruned.targets, pruned.structure
    axes = walk.input_axes(pruned.model, targets)
    return NMCriterion([tuple(t.shape) for t in targets], axes, pattern.n, pattern.m, scope)


# The `Criterion` that computes masks, by the type of `PrunedModel.structure`.
_CRITERIA = {settings.Unstructured: _weight_criterion, settings.Channels: _channel_criterion,
             settings.NM: _nm_criterion}

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
    """Raises ValueError unless the masks of `pruned` remove exactly what the
    criterion removes at `sparsity` (`round(sparsity * n)` weights, per weight
    with scope 'layer', channels, or a share of the cost) and, in hard mode,
    the masked weights are 0."""
    masks = [m.numpy() for m in pruned.masks]
    problem = mask_set(pruned, source).criterion().problem(masks, sparsity, [t.path for t in pruned.targets])
    if problem:
        raise ValueError(f"Sparsity invariant broken in {source}: {problem}.")
    if float(pruned.hard.numpy()) != 1.0:
        return
    for weight, mask in zip(pruned.targets, masks):
        leaked = int(np.count_nonzero(weight.numpy()[mask == 0]))
        if leaked:
            raise ValueError(
                f"Sparsity invariant broken in {source}: {leaked} pruned weights of "
                f"'{weight.path}' are not zero.")
