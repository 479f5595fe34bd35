"""Re-estimating BatchNorm statistics after the weights under them changed."""

import keras
import numpy as np
import tensorflow as tf

from dg2pf_tf.model import walk


def batchnorm_layers(model):
    """Every BatchNormalization layer inside `model`, nested models included."""
    return walk.layers_of(model, keras.layers.BatchNormalization)


class BatchNormEstimator:
    """Re-estimates the moving statistics of `model`'s BatchNorm layers. From
    the second batch on the forward pass is compiled, once for every call: a run
    re-estimates after each epoch, and eagerly that took longer than the epoch's
    training. A single batch stays eager, where tracing would cost more."""

    def __init__(self, model):
        self.model, self.layers = model, batchnorm_layers(model)
        self._forward = tf.function(self._train_forward, reduce_retracing=True)

    def _train_forward(self, x):
        self.model(x, training=True)

    def __call__(self, data, max_batches=50):
        """Sets each moving mean and variance to the plain average of the batch
        statistics over up to `max_batches` batches of `data` (`x` or `(x, y, ...)`
        batches). Returns the number of batches used (0 without BatchNorm layers).

        Raises:
            ValueError: `data` yields no batch.
        """
        if not self.layers:
            return 0
        saved = [(layer.momentum, layer.synchronized) for layer in self.layers]
        sums = [np.zeros((2, *layer.moving_mean.shape)) for layer in self.layers]
        used = 0
        try:
            # Momentum 0 leaves each batch's own statistics in the moving
            # variables; they are averaged here. The trace reads these
            # attributes, so every call sets them alike.
            for layer in self.layers:
                layer.momentum, layer.synchronized = 0.0, False  # a whole local batch
            for batch in data:
                if used >= max_batches:
                    break
                forward = self._forward if used else self._train_forward
                forward(batch[0] if isinstance(batch, (tuple, list)) else batch)
                for total, layer in zip(sums, self.layers):
                    total += (layer.moving_mean.numpy(), layer.moving_variance.numpy())
                used += 1
        finally:
            for layer, (momentum, synchronized) in zip(self.layers, saved):
                layer.momentum, layer.synchronized = momentum, synchronized
        if used == 0:
            raise ValueError("reestimate_batchnorm(): `data` yielded no batch.")
        for total, layer in zip(sums, self.layers):
            layer.moving_mean.assign(total[0] / used)
            layer.moving_variance.assign(total[1] / used)
        return used


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
    return BatchNormEstimator(model)(data, max_batches)
