"""Mask state of a pruned model: find its wrappers, set a sparsity level, measure it."""

import numpy as np

from dg2pf_tf import criteria
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


def update_masks(model, sparsity, scope=None, floor=None):
    """Sets the masks of pruned `model` to `sparsity` by global (or per-layer)
    magnitude, for custom training loops. Returns the realised sparsity.
    `scope` and `floor` default to the ones given to `prune()`.

    Raises ValueError if `model` has no pruned layers or `sparsity` is bad.
    """
    return set_level(require_wrappers(model, "update_masks()"), sparsity, scope, floor)


def set_level(wrappers, sparsity, scope=None, floor=None):
    """Masks the smallest-|w| fraction `sparsity` of the wrappers' kernels.

    Scores are the kernels' current values, masked ones included, so weights
    pruned earlier can return (weight recovery). Kernels of wrappers in hard
    mode are zeroed where masked, so hard-pruned weights are exactly 0 at once.
    `scope`/`floor` default to the wrappers' own. Returns the realised
    sparsity over the prunable weights.
    """
    scope = wrappers[0].scope if scope is None else scope
    floor = wrappers[0].floor if floor is None else floor
    pairs = [(w, k, m) for w in wrappers for k, m in zip(w.kernels, w.masks)]
    masks = criteria.iter_magnitude_masks([k for _, k, _ in pairs], sparsity, scope, floor)
    zeros = total = 0
    # One mask at a time: peak memory stays near one float32 copy of the weights.
    for (wrapper, kernel, mask_var), mask in zip(pairs, masks):
        mask_var.assign(mask)
        if float(wrapper.hard.numpy()) == 1.0:
            kernel.assign(kernel.numpy() * mask.astype(kernel.dtype))
        total += mask.size
        zeros += mask.size - int(np.count_nonzero(mask))
    return zeros / max(1, total)


def set_hard(wrappers, hard=True):
    """Switches wrappers to hard masks (masked weights zeroed) or back to recovery."""
    for wrapper in wrappers:
        wrapper.hard.assign(1.0 if hard else 0.0)
        if hard:
            for kernel, mask in zip(wrapper.kernels, wrapper.masks):
                kernel.assign(kernel.numpy() * mask.numpy().astype(kernel.dtype))


def mask_sparsity(wrappers):
    """Fraction of zeros in the wrappers' masks, over all their prunable weights."""
    total = zeros = 0
    for wrapper in wrappers:
        for mask in wrapper.masks:
            values = mask.numpy()
            total += values.size
            zeros += values.size - int(np.count_nonzero(values))
    return zeros / max(1, total)


def check_invariant(wrappers, sparsity, source="the model"):
    """Raises ValueError unless the masked weights of hard-masked `wrappers`
    are exactly 0 and the masks hold exactly the zeros `set_level` gives
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
