"""Where masks go out of a model again: `strip`, a plain Keras copy of what a pruned model computes."""

from dg2pf_tf import _compat
from dg2pf_tf.checks import check_model
from dg2pf_tf.core import masking
from dg2pf_tf.core.pruned_model import PrunedModel
from dg2pf_tf.model import clone


def _stripped(pruned):
    plain = clone.copy(pruned.model)
    weights = plain.weights
    for i, variable, mask in zip(pruned.target_indices, pruned.targets, pruned.masks):
        weights[i].assign((variable.numpy() * mask.numpy()).astype(weights[i].dtype))
    return plain


def strip(model):
    """Returns a plain Keras copy of `model` without masks: the pruned weights
    hold `weight * mask`, so it computes what the pruned model computes and
    loads where dg2pf_tf is not installed.

    `model` is a `PrunedModel` (the model it holds comes back: same class,
    same layer names), a Sequential/Functional model with `PrunedModel`s
    inside (each is replaced by its stripped model), or a model without any
    (copied as is).

    Raises:
        TypeError: a subclassed model with a `PrunedModel` inside (strip that
            `PrunedModel` itself).
    """
    check_model(model, "strip()")
    if isinstance(model, PrunedModel):
        return _stripped(model)
    if masking.pruned_models(model) and not _compat.is_graph_model(model):
        raise TypeError(
            f"strip(): '{model.name}' is a subclassed model with a PrunedModel inside; call "
            f"dg2pf_tf.strip() on that PrunedModel and put the result in its place.")
    if not masking.pruned_models(model):
        return clone.copy(model)
    return clone.copy(model, lambda l: clone.Rebuilt(_stripped(l)) if isinstance(l, PrunedModel) else None)
