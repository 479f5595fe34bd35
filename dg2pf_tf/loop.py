"""The training loop of `run()`: one epoch at a time, under any `tf.distribute` strategy.

Keras' `Model.fit` does not run under `MultiWorkerMirroredStrategy` in
Keras 3 (keras-team/keras#20585), and a resumable run needs each epoch's data
order to be a function of the epoch alone. This loop calls the model's own
`train_step` through `strategy.run` over `experimental_distribute_dataset`
(what `fit` does inside), drives ordinary Keras callbacks, and stops with
an error naming the epoch and step at the first non-finite loss.
"""

import math

import keras
import numpy as np
import tensorflow as tf


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite."""


def distribute(strategy, dataset):
    """`dataset` split across the strategy's replicas (and workers, by data)."""
    if strategy.extended._in_multi_worker_mode():
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        dataset = dataset.with_options(options)
    return strategy.experimental_distribute_dataset(dataset)


def steps_in(dataset):
    """Number of batches of `dataset` if known, else None."""
    cardinality = int(dataset.cardinality())
    return cardinality if cardinality >= 0 else None


class EpochLoop:
    """Trains compiled Keras models (here `Distiller`s) epoch by epoch on `strategy`."""

    def __init__(self, strategy):
        self.strategy = strategy
        self._steps = {}

    def _step_function(self, model, dataset):
        key = id(model)
        if key not in self._steps:
            strategy = self.strategy
            # Optimizer and metric variables must exist before the step is
            # traced: created inside `strategy.run` they break MirroredStrategy
            # (what `fit` avoids with its symbolic build).
            with strategy.scope():
                if not model.optimizer.built:
                    model.optimizer.build(model.trainable_variables)
                for batch in dataset.take(1):
                    model.compute_metrics(batch[0], batch[1], model(batch[0], training=False))
            model.reset_metrics()

            @tf.function(reduce_retracing=True)
            def step(batch):
                logs = strategy.run(model.train_step, args=(batch,))
                # Metric results are equal on every replica: keep the first.
                return tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], logs)

            self._steps[key] = (model, step)
        return self._steps[key][1]

    def callbacks(self, model, callbacks, *, epochs, steps, verbose):
        """A Keras `CallbackList` for `model` with a progress bar when `verbose`."""
        return keras.callbacks.CallbackList(
            callbacks, add_progbar=bool(verbose), model=model,
            verbose=verbose, epochs=epochs, steps=steps,
        )

    def run_epoch(self, model, dataset, epoch, callbacks):
        """Trains `model` one epoch on `dataset`; returns the epoch logs (floats).

        Raises NonFiniteLoss at the first step whose loss is NaN or infinite.
        """
        step = self._step_function(model, dataset)
        model.reset_metrics()
        model.stop_training = False
        callbacks.on_epoch_begin(epoch)
        logs = {}
        for index, batch in enumerate(distribute(self.strategy, dataset)):
            callbacks.on_train_batch_begin(index)
            logs = step(batch)
            loss = float(logs["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLoss(
                    f"The training loss became {loss} at epoch {epoch + 1}, step {index + 1}. "
                    f"Lower the learning rate, check the data for NaN/inf values, or use "
                    f"float32 instead of mixed precision.")
            callbacks.on_train_batch_end(index, logs)
        if not logs:
            raise ValueError(f"The training data yielded no batch in epoch {epoch + 1}.")
        logs = {k: float(np.asarray(v)) for k, v in model.get_metrics_result().items()}
        callbacks.on_epoch_end(epoch, logs)
        return logs
