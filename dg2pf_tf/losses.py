"""Per-example cross-entropy and KD terms, in float32, for logits or probabilities."""

import keras
from keras import ops

_EPS = 1e-7


def output_is_probability(model):
    """True if `model`'s (first) output comes out of a softmax, i.e. is not logits."""
    layer = _output_layer(model)
    while True:
        if isinstance(layer, keras.Model):
            layer = _output_layer(layer)
        elif hasattr(layer, "layer") and isinstance(layer, keras.layers.Wrapper):
            layer = layer.layer
        else:
            break
    if isinstance(layer, keras.layers.Softmax):
        return True
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", None) == "softmax"


def _output_layer(model):
    outputs = getattr(model, "outputs", None)
    if outputs:
        history = getattr(outputs[0], "_keras_history", None)
        if history is not None:
            return history.operation
    layers = getattr(model, "layers", None)
    return layers[-1] if layers else model


def _log_probs(output, is_probability, temperature=1.0):
    output = ops.cast(output, "float32")
    if is_probability:
        output = ops.log(ops.clip(output, _EPS, 1.0))
    return ops.log_softmax(output / temperature, axis=-1)


def is_one_hot(y, output):
    """True if labels `y` are one-hot rows over `output`'s classes (static shapes)."""
    return len(y.shape) == len(output.shape) and y.shape[-1] == output.shape[-1] != 1


def cross_entropy(y, output, is_probability):
    """Per-example cross-entropy; `y` sparse integer labels or one-hot rows."""
    log_p = _log_probs(output, is_probability)
    if is_one_hot(y, log_p):
        return -ops.sum(ops.cast(y, "float32") * log_p, axis=-1)
    labels = ops.reshape(ops.cast(y, "int32"), (-1, 1))
    return -ops.take_along_axis(log_p, labels, axis=-1)[:, 0]


def kd_terms(y, student_out, teacher_out, *, temperature, student_probs, teacher_probs):
    """Per-example `(T^2 * KL(teacher || student), CE(y, student))`.

    The KD term is None when `teacher_out` is None.
    """
    ce = cross_entropy(y, student_out, student_probs)
    if teacher_out is None:
        return None, ce
    log_q = _log_probs(student_out, student_probs, temperature)
    log_p = _log_probs(teacher_out, teacher_probs, temperature)
    kl = ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)
    return kl * (temperature**2), ce
