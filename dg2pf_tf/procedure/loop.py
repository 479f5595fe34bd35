"""The training loop of `run()`: one epoch at a time, under any `tf.distribute` strategy.

Keras' `Model.fit` does not run under `MultiWorkerMirroredStrategy` in
Keras 3 (keras-team/keras#20585), and a resumable run needs each epoch's data
order to be a function of the epoch alone. This loop calls the model's own
`train_step` through `strategy.run` over `experimental_distribute_dataset`
(what `fit` does inside), `steps_per_execution` steps per compiled call,
drives ordinary Keras callbacks, and never waits for the device within an
epoch except where `fit` does (once per call, to learn whether data is left):
 - the gradual phase's mask updates run in the same compiled call, before
   each training step, on every replica's copy of the weights alike;
 - a non-finite loss is noticed in the graph, which then skips the remaining
   steps; the host reads that flag every few hundred steps and at the end of
   the epoch, and stops with the epoch and step.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from dg2pf_tf.core import schedules

_CHECK_EVERY_STEPS = 256  # how often the host looks at the non-finite-loss flag


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite."""


def in_multi_worker_mode(strategy):
    """Whether `strategy` spans several workers: its cluster (if any) has more than
    one chief or worker task."""
    resolver = strategy.cluster_resolver
    if resolver is None:
        return False
    spec = resolver.cluster_spec().as_dict()
    return sum(len(spec.get(job, ())) for job in ("chief", "worker")) > 1


def distribute(strategy, dataset):
    """`dataset` split across the strategy's replicas (and workers, by data)."""
    if in_multi_worker_mode(strategy):
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        dataset = dataset.with_options(options)
    return strategy.experimental_distribute_dataset(dataset)


def is_chief(strategy):
    """Whether this process writes checkpoints and outputs (the chief, or the only worker)."""
    return getattr(strategy.extended, "should_checkpoint", True)


def steps_in(dataset):
    """Number of batches of `dataset` if known, else None."""
    cardinality = int(dataset.cardinality())
    return cardinality if cardinality >= 0 else None


@dataclasses.dataclass(frozen=True)
class MaskUpdates:
    """Mask updates inside the training step: when `timing` (a
    `schedules.UpdateTiming`) says, `masks` (a `masking.MaskSet`) are set to
    `schedule` read at the fractional epoch, with `scope`."""

    masks: object
    schedule: schedules.Schedule
    timing: schedules.UpdateTiming
    scope: str = None


class EpochLoop:
    """Trains compiled Keras models (here `Distiller`s) epoch by epoch on `strategy`.

    Args:
        strategy: the `tf.distribute.Strategy` the models were built under.
        steps_per_execution: training steps per compiled call, as in `compile`.
        jit_compile: compile each replica's training step with XLA.
    """

    def __init__(self, strategy, *, steps_per_execution=1, jit_compile=False):
        self.strategy = strategy
        self.steps_per_execution = int(steps_per_execution)
        self.jit_compile = bool(jit_compile)
        self._functions = {}
        self._prepared = set()
        with tf.init_scope():
            self._epoch = tf.Variable(0.0, dtype=tf.float64, trainable=False)
            self._step = tf.Variable(0, dtype=tf.int64, trainable=False)
            self._steps = tf.Variable(0.0, dtype=tf.float64, trainable=False)
            self._bad_step = tf.Variable(-1, dtype=tf.int64, trainable=False)

    def callbacks(self, model, callbacks, *, epochs, steps, verbose):
        """A Keras `CallbackList` for `model` with a progress bar when `verbose`."""
        return keras.callbacks.CallbackList(
            callbacks, add_progbar=bool(verbose), model=model,
            verbose=verbose, epochs=epochs, steps=steps,
        )

    def _prepare(self, model, dataset):
        # Optimizer and metric variables must exist before the step is traced:
        # created inside `strategy.run` they break MirroredStrategy (what `fit`
        # avoids with its symbolic build).
        with self.strategy.scope():
            if not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            for batch in dataset.take(1):
                model.compute_metrics(batch[0], batch[1], model(batch[0], training=False))
        model.reset_metrics()

    def _maybe_update_masks(self, updates):
        if updates is None:
            return
        position = self._epoch + tf.where(
            self._steps > 0, tf.cast(self._step, tf.float64) / tf.maximum(self._steps, 1.0), 0.0)
        due = updates.timing.due(self._step) & updates.schedule.is_active_tensor(position)
        def update():
            updates.masks.assign(updates.schedule.level_tensor(position), updates.scope)
            return tf.constant(True)

        tf.cond(due, update, lambda: tf.constant(False))

    def _step_function(self, model, updates):
        key = (id(model), id(updates))
        if key in self._functions:
            return self._functions[key][1]
        strategy = self.strategy
        if updates is not None:
            updates.masks.criterion(updates.scope)  # its variables are made here, not while tracing
        train_step = tf.function(model.train_step, jit_compile=True) if self.jit_compile else model.train_step

        def one_step(batch):
            self._maybe_update_masks(updates)
            logs = strategy.run(train_step, args=(batch,))
            # Metric results are equal on every replica: keep the first.
            logs = tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], logs)
            self._step.assign_add(1)
            bad = ~tf.math.is_finite(tf.cast(logs["loss"], tf.float32)) & (self._bad_step < 0)
            self._bad_step.assign(tf.where(bad, self._step, self._bad_step))
            return logs

        @tf.function(reduce_retracing=True)
        def execute(iterator, first, steps):
            logs = one_step(first)
            if self.steps_per_execution == 1:
                return logs  # the loop below would trace the whole step a second time
            for _ in tf.range(steps - 1):
                following = iterator.get_next_as_optional()
                if not following.has_value() or self._bad_step >= 0:
                    break
                logs = one_step(following.get_value())
            return logs

        self._functions[key] = (model, execute)
        return execute

    def run_epoch(self, model, dataset, epoch, callbacks, *, updates=None, steps_per_epoch=None):
        """Trains `model` one epoch on `dataset`; returns the epoch logs (floats).

        `updates` (a `MaskUpdates`) recomputes masks inside the training step.
        `steps_per_epoch` (or the dataset's known length) places the steps
        within the epoch for the schedule.

        Raises NonFiniteLoss naming the first step whose loss is NaN or infinite.
        """
        if id(model) not in self._prepared:
            self._prepare(model, dataset)
            self._prepared.add(id(model))
        execute = self._step_function(model, updates)
        model.reset_metrics()
        model.stop_training = False
        self._epoch.assign(float(epoch))
        self._step.assign(0)
        self._bad_step.assign(-1)
        known = steps_per_epoch or steps_in(dataset)
        if known:
            self._steps.assign(float(known))
        callbacks.on_epoch_begin(epoch)
        iterator = iter(distribute(self.strategy, dataset))
        logs, done, calls = None, 0, 0
        check_every = max(1, _CHECK_EVERY_STEPS // self.steps_per_execution)
        while steps_per_epoch is None or done < steps_per_epoch:
            first = iterator.get_next_as_optional()
            if not first.has_value():
                break
            callbacks.on_train_batch_begin(done)
            steps = self.steps_per_execution
            if steps_per_epoch is not None:
                steps = min(steps, steps_per_epoch - done)
            logs = execute(iterator, first.get_value(), tf.constant(steps, tf.int32))
            calls += 1
            done = int(self._step.numpy()) if self.steps_per_execution > 1 else done + 1
            callbacks.on_train_batch_end(done - 1, logs)
            if calls % check_every == 0:
                self._raise_if_bad(epoch)
            if model.stop_training:
                break
        if logs is None:
            raise ValueError(f"The training data yielded no batch in epoch {epoch + 1}.")
        self._raise_if_bad(epoch)
        if not known:
            self._steps.assign(float(done))  # learnt from the first epoch
        logs = {k: float(np.asarray(v)) for k, v in model.get_metrics_result().items()}
        callbacks.on_epoch_end(epoch, logs)
        return logs

    def _raise_if_bad(self, epoch):
        step = int(self._bad_step.numpy())
        if step >= 0:
            raise NonFiniteLoss(
                f"The training loss became non-finite at epoch {epoch + 1}, step {step}. "
                f"Lower the learning rate, check the data for NaN/inf values, or use "
                f"float32 instead of mixed precision.")
