"""What a model's output means, and so how to train, distill and score it.

- `Categorical`: one class per example (softmax or logits over classes;
  labels sparse integers or one-hot). Label loss cross-entropy, distillation
  `T^2 * KL` between the softened distributions, metric top-1 accuracy.
- `Binary`: independent yes/no per output (sigmoid or logits; a binary
  classifier has one output, a multi-label one several; labels 0/1, multi-hot
  or soft). Label loss binary cross-entropy, distillation `T^2 * KL` between
  the softened Bernoulli distributions of each output, metric the share of
  outputs on the right side of 0.5.
- `Regression`: real-valued outputs. Label loss and distillation mean squared
  error (to the labels, to the teacher's outputs; no temperature), metric MSE.

All terms are per example, in float32, computed from logits (`Task.logits`
turns probability outputs into logits first).
"""

import keras
import numpy as np
from keras import ops

from dg2pf_tf import _compat

_EPS = 1e-7
TASKS = ("categorical", "binary", "regression")


class Task:
    """Base class. `metric` names the validation metric; `higher_is_better` orders it."""

    name = None
    metric = None
    higher_is_better = True

    def logits(self, output, probabilities):
        return ops.cast(output, "float32")

    def score(self, metric):
        """`metric` as a score to maximise."""
        return metric if self.higher_is_better else -metric

    def near_chance(self, metric, outputs):
        """Why `metric` of a model with `outputs` outputs is little better than a
        uniform guess (a phrase), or None: below 1.5 times what a guess scores."""
        chance = self.chance(outputs)
        if chance is None or metric >= 1.5 * chance[0]:
            return None
        return f"near chance ({chance[0]:.4f} for a guess among {chance[1]})"

    def chance(self, outputs):
        """`(metric, among what)` of a uniform guess, or None where the task has none."""
        return None

    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self))

    def __repr__(self):
        return f"{type(self).__name__}()"


def _one_hot_labels(y, logits):
    return len(y.shape) == len(logits.shape) and y.shape[-1] == logits.shape[-1] != 1


class Categorical(Task):
    name, metric = "categorical", "accuracy"

    def chance(self, outputs):
        return (1.0 / outputs, f"{outputs} classes") if outputs > 1 else None

    def logits(self, output, probabilities):
        output = ops.cast(output, "float32")
        return ops.log(ops.clip(output, _EPS, 1.0)) if probabilities else output

    def label_loss(self, y, logits):
        log_p = ops.log_softmax(logits, axis=-1)
        if _one_hot_labels(y, logits):
            return -ops.sum(ops.cast(y, "float32") * log_p, axis=-1)
        labels = ops.reshape(ops.cast(y, "int32"), (-1, 1))
        return -ops.take_along_axis(log_p, labels, axis=-1)[:, 0]

    def distill_loss(self, teacher, student, temperature):
        log_p = ops.log_softmax(teacher / temperature, axis=-1)
        log_q = ops.log_softmax(student / temperature, axis=-1)
        return ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1) * temperature**2

    def metric_values(self, y, logits):
        predicted = ops.argmax(logits, axis=-1)
        labels = ops.argmax(y, axis=-1) if _one_hot_labels(y, logits) else ops.reshape(y, (-1,))
        return ops.cast(ops.equal(ops.cast(predicted, "int32"), ops.cast(labels, "int32")), "float32")

    def check_labels(self, y, outputs, name):
        if outputs < 2:
            raise ValueError(
                f"`{name}`: a categorical model needs 2 or more outputs, this one has {outputs}. "
                f"A yes/no model is task='binary' (one sigmoid or logit output).")
        one_hot = y.ndim == 2 and y.shape[-1] == outputs
        if not one_hot and (y.ndim > 2 or (y.ndim == 2 and y.shape[-1] != 1)):
            raise ValueError(
                f"`{name}`: labels of shape {y.shape[1:]} fit neither sparse class indices nor "
                f"one-hot rows over the model's {outputs} classes.")
        labels = y.argmax(-1) if one_hot else y.reshape(-1)
        if labels.size and (labels.min() < 0 or labels.max() >= outputs or
                            not np.all(np.equal(np.mod(labels, 1), 0))):
            raise ValueError(
                f"`{name}`: labels range over [{labels.min()}, {labels.max()}] but the model "
                f"has {outputs} outputs, so labels must be integers in [0, {outputs - 1}].")


def _matching(y, logits):
    """Labels shaped like the outputs: a flat `y` for a single output gets its axis."""
    y = ops.cast(y, "float32")
    return ops.reshape(y, ops.shape(logits)) if len(y.shape) < len(logits.shape) else y


class Binary(Task):
    name, metric = "binary", "accuracy"

    def logits(self, output, probabilities):
        output = ops.cast(output, "float32")
        if not probabilities:
            return output
        p = ops.clip(output, _EPS, 1.0 - _EPS)
        return ops.log(p) - ops.log(1.0 - p)

    def label_loss(self, y, logits):
        y = _matching(y, logits)
        return _mean_over_outputs(ops.softplus(logits) - y * logits)

    def distill_loss(self, teacher, student, temperature):
        t, s = teacher / temperature, student / temperature
        p = ops.sigmoid(t)
        kl = (p * (ops.log_sigmoid(t) - ops.log_sigmoid(s))
              + (1.0 - p) * (ops.log_sigmoid(-t) - ops.log_sigmoid(-s)))
        return _mean_over_outputs(kl) * temperature**2

    def metric_values(self, y, logits):
        y = _matching(y, logits)
        return _mean_over_outputs(ops.cast(ops.equal(logits > 0, y > 0.5), "float32"))

    def check_labels(self, y, outputs, name):
        _check_shape(y, outputs, name, "0/1 (or multi-hot) labels")
        if y.size and (y.min() < 0 or y.max() > 1):
            raise ValueError(
                f"`{name}`: binary labels must lie in [0, 1] (0/1, multi-hot or soft), got "
                f"values in [{y.min()}, {y.max()}].")


class Regression(Task):
    name, metric, higher_is_better = "regression", "mse", False

    def label_loss(self, y, logits):
        return _mean_over_outputs(ops.square(logits - _matching(y, logits)))

    def distill_loss(self, teacher, student, temperature):
        return _mean_over_outputs(ops.square(student - teacher))

    def metric_values(self, y, logits):
        return self.label_loss(y, logits)

    def check_labels(self, y, outputs, name):
        _check_shape(y, outputs, name, "targets")
        if np.issubdtype(y.dtype, np.floating) and not np.isfinite(y).all():
            raise ValueError(f"`{name}`: {int(np.size(y) - np.isfinite(y).sum())} targets are NaN or infinite.")


def _mean_over_outputs(values):
    return ops.mean(ops.reshape(values, (ops.shape(values)[0], -1)), axis=-1)


def _check_shape(y, outputs, name, what):
    allowed = {(outputs,)} | ({(), (1,)} if outputs == 1 else set())
    if tuple(y.shape[1:]) not in allowed:
        raise ValueError(
            f"`{name}`: {what} of shape {y.shape[1:]} do not fit the model's {outputs} outputs; "
            f"give one value per output, shape (batch, {outputs}).")


_BY_NAME = {cls.name: cls for cls in (Categorical, Binary, Regression)}


def get(name):
    """The `Task` called `name` ('categorical', 'binary', 'regression'). Raises ValueError."""
    if name not in _BY_NAME:
        raise ValueError(
            f"`task` must be 'auto' or one of {TASKS} ('categorical': one class per example; "
            f"'binary': yes/no per output, multi-label included; 'regression'), got {name!r}.")
    return _BY_NAME[name]()


def final_activation(model):
    """'softmax', 'sigmoid' or None: the activation that makes `model`'s first output,
    looking through PrunedModels, nested models and layer wrappers."""
    layer, seen = model, set()
    while id(layer) not in seen:
        seen.add(id(layer))
        held = getattr(layer, "model", None)  # a PrunedModel holds the model it prunes
        if isinstance(held, keras.Model):
            layer = held
        elif isinstance(layer, keras.Model):
            outputs = getattr(layer, "outputs", None)
            made_by = _compat.producer(outputs[0]) if outputs else None
            layers = getattr(layer, "layers", None) or []
            layer = made_by or (layers[-1] if layers else layer)
        elif isinstance(layer, keras.layers.Wrapper):
            layer = layer.layer
        else:
            break
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    name = getattr(getattr(layer, "activation", None), "__name__", None)
    return name if name in ("softmax", "sigmoid") else None


def infer(model, outputs, y, task="auto"):
    """`(task, probabilities)` for a model whose outputs on a batch are `outputs`
    and whose labels are `y` (numpy).

    With `task='auto'`: a softmax output (or rows of probabilities) is
    categorical; a sigmoid output binary; logits are categorical for class
    indices or one-hot rows, binary for 0/1 labels with one output or
    multi-hot rows, and regression for other real-valued labels.

    Raises ValueError for an unknown `task`, or a model with several outputs.
    """
    leaves = keras.tree.flatten(outputs)
    if len(leaves) != 1:
        raise ValueError(
            f"Model '{model.name}' has {len(leaves)} outputs; run() and evaluate() handle "
            f"models with one. Prune it with dg2pf_tf.prune() and train it with "
            f"dg2pf_tf.UpdateMasks and its own losses, or give it a single output.")
    outputs = np.asarray(leaves[0])
    activation = final_activation(model)
    width = outputs.shape[-1] if outputs.ndim > 1 else 1
    distributions = (width > 1 and outputs.ndim == 2 and outputs.min() >= 0
                     and np.allclose(outputs.sum(-1), 1.0, atol=1e-3))
    if task != "auto":
        chosen = get(task)
    elif activation == "softmax" or distributions:
        chosen = Categorical()
    elif activation == "sigmoid":
        chosen = Binary()
    else:
        chosen = _from_labels(y, width)
    probabilities = (activation == "softmax" or distributions) if isinstance(chosen, Categorical) \
        else activation == "sigmoid" and isinstance(chosen, Binary)
    return chosen, bool(probabilities)


def _from_labels(y, width):
    integral = y.size == 0 or bool(np.all(np.equal(np.mod(y, 1), 0)))
    zero_one = integral and (y.size == 0 or (y.min() >= 0 and y.max() <= 1))
    flat = y.ndim == 1 or (y.ndim == 2 and y.shape[-1] == 1)
    if width > 1 and integral and flat:
        return Categorical()
    if width > 1 and zero_one and y.ndim == 2 and y.shape[-1] == width:
        return Categorical() if np.all(y.sum(-1) == 1) else Binary()
    if width == 1 and zero_one:
        return Binary()
    return Regression()
