"""Re-estimating BatchNorm statistics after the weights under them changed."""

import keras

from dg2pf_tf.model import walk


def batchnorm_layers(model):
    """Every BatchNormalization layer inside `model`, nested models included."""
    return walk.layers_of(model, keras.layers.BatchNormalization)


def reestimate_batchnorm(model, data, max_batches=50):
    """Recomputes the moving mean and variance of `model`'s BatchNorm layers
    as the plain average over up to `max_batches` batches of `data`.

    Pruning changes the activations under every BatchNorm layer, while their
    moving statistics (momentum ~0.99) lag many steps behind, so a freshly
    pruned model evaluates worse than it is. Only the statistics change.
    `data` yields `x` or `(x, y, ...)` batches. Returns the number of batches
    used (0 if the model has no BatchNorm layer).

    Raises:
        ValueError: `data` yields no batch.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    saved = [(layer.momentum, layer.synchronized) for layer in layers]
    used = 0
    try:
        for batch in data:
            if used >= max_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            # momentum k/(k+1) at batch k makes the moving value the running
            # mean of the batch statistics seen so far.
            for layer in layers:
                layer.momentum = used / (used + 1.0)
                layer.synchronized = False  # a whole local batch, no replica context
            model(x, training=True)
            used += 1
    finally:
        for layer, (momentum, synchronized) in zip(layers, saved):
            layer.momentum, layer.synchronized = momentum, synchronized
    if used == 0:
        raise ValueError("reestimate_batchnorm(): `data` yielded no batch.")
    return used
