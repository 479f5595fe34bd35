"""Where masks go into a model (`prune`) and are made final (`finalize`)."""

import warnings

from dg2pf_tf import settings
from dg2pf_tf.checks import check_model, check_schedule, check_scope
from dg2pf_tf.core import calibration, masking, schedules
from dg2pf_tf.core.pruned_model import PrunedModel
from dg2pf_tf.model import clone, layer_kinds, walk
from dg2pf_tf.model.walk import find_prunable


def _exclusion(model, exclude):
    """A predicate telling which layers `exclude` keeps dense.

    Raises TypeError for an `exclude` of the wrong type and ValueError for a
    name that is no layer of `model` (at any depth).
    """
    if exclude is None:
        return lambda layer: False
    if callable(exclude):
        return exclude
    names = [exclude] if isinstance(exclude, str) else list(exclude)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"`exclude` takes layer names or a predicate `fn(layer) -> bool`, "
            f"got {exclude!r}.")
    unknown = sorted(set(names) - {layer.name for layer in walk.layers(model)})
    if unknown:
        offered = sorted({w.layer.name for w in find_prunable(model).chosen})
        shown = ", ".join(offered[:30]) + (", ..." if len(offered) > 30 else "")
        raise ValueError(
            f"`exclude` names layers that are not in model '{model.name}': {unknown}. "
            f"Layers holding prunable weights: {shown}.")
    names = set(names)
    return lambda layer: layer.name in names


def _warn_unknown(model, found):
    if not found.unknown:
        return
    total = max(1, model.count_params())
    share = sum(int(v.numpy().size) for v in found.unknown) / total
    names = ", ".join(v.path for v in found.unknown[:8]) + (", ..." if len(found.unknown) > 8 else "")
    warnings.warn(
        f"prune(): {len(found.unknown)} weight matrices ({share:.1%} of the parameters) stay "
        f"dense because no layer offers them for pruning: {names}. To prune one, give the "
        f"layer that owns it a `get_prunable_weights()` method returning it; to keep it dense "
        f"and silence this, exclude that layer.", stacklevel=3)


def _eligible(chosen, structure):
    """`chosen` without the weights `structure` cannot take (with an N:M pattern, those
    without inputs in blocks of M), which are named in a warning (they stay dense).
    Raises ValueError if none is left."""
    pattern = structure.pattern
    if pattern is None:
        return chosen
    kept, left = [], []
    for weight in chosen:
        axis, why = layer_kinds.pattern_axis(weight, pattern.m)
        if axis is None:
            left.append(f"{weight.variable.path} ({why})")
        else:
            kept.append(weight)
    if not kept:
        raise ValueError(
            f"No prunable weight can take the {structure} pattern: it needs the kernel of a Dense, "
            f"EinsumDense, convolution or recurrent layer whose inputs are a multiple of {pattern.m}.")
    if left:
        names = ", ".join(left[:8]) + (", ..." if len(left) > 8 else "")
        warnings.warn(
            f"prune(): {len(left)} prunable weights stay dense: the {structure} pattern runs along "
            f"a kernel's inputs in blocks of {pattern.m}, which these lack: {names}.", stacklevel=3)
    return tuple(kept)


def prune(
    model,
    sparsity=None,
    pruning_epochs=10,
    *,
    schedule=None,
    scope="global",
    exclude=None,
    recovery=True,
    floor=None,
    structure="unstructured",
    budget="channels",
):
    """Returns a `PrunedModel`: a copy of `model` whose prunable weights carry masks.

    Works on any built Keras model: Sequential, Functional (ops in the graph
    and nested models included) and subclassed (copied through its
    `get_config()`). Prunable weights: the kernels of Dense, EinsumDense
    (attention projections) and convolution layers, Embedding tables, and
    the input and recurrent kernels of recurrent layers, at any depth; a
    layer of your own offers weights by a `get_prunable_weights()` method.
    All masks start at 1, so the outputs equal the original's until
    `UpdateMasks` (or `update_masks`) sets a level. `model` is not modified.

    Args:
        model: a built Keras model.
        sparsity: final fraction of zeros over the pruned weights, in [0, 1)
            (default 0.9); with an N:M structure 1 - N/M, its only value.
        pruning_epochs: epochs of the linear schedule (`s_e` in DG2PF).
        schedule: a `dg2pf_tf.schedules` object, used instead of the linear
            schedule that `sparsity` and `pruning_epochs` describe.
        scope: 'global' (one magnitude threshold over every pruned weight)
            or 'layer' (each weight pruned to the same level).
        exclude: layer names (at any depth: a layer inside
            `MultiHeadAttention` too), or a predicate `fn(layer) -> bool`, to
            keep dense with everything inside them.
        recovery: simulated pruning with weight recovery (DG2PF's gradual
            phase) if True, hard pruning if False.
        floor: with scope 'global', each weight keeps at least this share of
            what an Erdos-Renyi-kernel allocation would give it (default 1.0,
            as in `run`, keeps small layers from being pruned away at high
            sparsity; 0 is pure global magnitude). With structure 'channel',
            each channel group keeps at least this share of `1 - sparsity` of
            its channels (default 0.5), and always one; with 0, the groups
            inside a residual branch may lose all (`shrink` then removes the
            block).
        structure: 'unstructured' (single weights) or 'channel': whole
            output channels of convolutions, units of Dense and EinsumDense
            layers and heads of MultiHeadAttention, with every weight coupled
            to them (`dg2pf_tf.channel_groups` lists the
            groups and the ones that stay dense), ranked globally by the L2
            norm of those weights; `sparsity` is then the share of channels
            removed, and `dg2pf_tf.shrink` turns the result into a smaller model.
            Or an N:M pattern such as '2:4' (NVIDIA's sparse tensor cores):
            at the end at most N nonzeros in every M consecutive inputs of each
            kernel (Dense, EinsumDense, convolution and recurrent kernels whose
            inputs are a multiple of M; the others stay dense, with a warning),
            reached by the same schedule, ranking and recovery; no `floor`.
        budget: with structure 'channel', what `sparsity` is a share of:
            'channels' (default), 'macs' (the model's multiply-accumulates at
            its input size: convolutions, Dense, EinsumDense and attention
            layers) or 'params' (all its parameters). Channels are then ranked
            by score per unit of the cost their removal saves, and removed
            until that exact share of the cost is gone: 'macs' makes the
            model faster, where 'channels' ranks by magnitude alone and tends
            to keep the costly high-resolution layers. Or 'latency' (a
            `dg2pf_tf.Latency`): the time the model takes in the runtime it
            ships to, measured on this machine (each layer at a few widths,
            cached); the channels selected at `sparsity` are then shrunk and
            timed beside the dense model, and the model of time calibrated on
            that measurement (`dg2pf_tf.channels.latency`, `core.calibration`).

    Raises:
        TypeError: not a Keras model, `exclude` or `schedule` of the wrong
            type, a subclassed model without `get_config()`.
        ValueError: bad `sparsity`, `pruning_epochs`, `scope`, `floor`,
            `structure`, `budget` or `exclude` name; an unbuilt or already
            pruned model; nothing left to prune (for 'channel': no channel
            group that can be); a `budget` share no allocation can remove (the
            floors keep too much, or too much of the cost is in dense layers);
            'macs' on convolutions of no fixed input size.
    """
    check_model(model, "prune()")
    structure = settings.structure(structure)
    budget = settings.budget(budget, structure)
    if check_schedule(schedule, schedules.Schedule) is None:
        schedule = schedules.Linear(structure.sparsity(sparsity), pruning_epochs)
    else:
        structure.sparsity(schedule.sparsity)  # an N:M pattern has one target
    check_scope(scope)
    floor = structure.floor(floor)
    if masking.pruned_models(model):
        raise ValueError(
            f"Model '{model.name}' is already pruned. Prune the original model again, or "
            f"call dg2pf_tf.strip(model) first to start from this one.")
    # The walk sees the user's own layers (a predicate may test identity);
    # the copy has the same weights in the same order.
    found = find_prunable(model, _exclusion(model, exclude))
    if not found.chosen:
        raise ValueError(
            f"Model '{model.name}' has no prunable weight left to prune (prunable: kernels of "
            f"Dense, EinsumDense and convolution layers, Embedding tables, recurrent kernels, "
            f"and what layers return from get_prunable_weights(); excluded: {exclude!r}).")
    _warn_unknown(model, found)
    chosen = _eligible(found.chosen, structure)
    index = {id(v): i for i, v in enumerate(model.weights)}
    pruned = PrunedModel(clone.copy(model), [index[id(w.variable)] for w in chosen],
                         recovery=recovery, schedule=schedule, scope=scope, floor=floor,
                         structure=structure, budget=budget)
    # Refuses a structure the model cannot take, and a target the floors keep from going.
    masks = masking.mask_set(pruned, "prune()")
    why = masks.criterion().unreachable(schedule.sparsity)
    if why:
        raise ValueError(f"{why}.")
    if isinstance(budget, settings.Latency):
        masks.settle(calibration.calibrated(pruned, masks.criterion(), schedule.sparsity))
    return pruned


def finalize(model):
    """Makes the masks of a pruned model final: masked weights become exactly 0
    and stay 0 through any optimizer step (DG2PF after the gradual phase).

    Works in place (also on a model that is already compiled or inside a
    `Distiller`) and returns `model`.

    Raises:
        ValueError: `model` has no pruned weights.
    """
    masking.set_hard(masking.require_pruned(model, "finalize()"), True)
    return model
