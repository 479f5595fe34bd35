"""`UpdateMasks`: the Keras callback that applies a sparsity schedule during `fit`."""

import keras

from dg2pf_tf import checks
from dg2pf_tf.checks import check_scope
from dg2pf_tf.core import masking, schedules


class UpdateMasks(keras.callbacks.Callback):
    """Recomputes the pruning masks on a schedule while a pruned model trains.

    With no arguments it uses the schedule and scope given to
    `dg2pf_tf.prune()`, which travel with the model. Masks are updated at the
    start of every epoch of the schedule's window (or every `every_n_steps`
    training steps, with the schedule read at the fractional epoch) and left
    alone after it. Positions are Keras epoch indices, so resume a run with
    `fit(..., initial_epoch=k)`. The measured sparsity over the prunable
    weights is written into the epoch logs as `sparsity`: put this callback
    before `CSVLogger`/`TensorBoard` in the list so they record it.

    Args:
        schedule: a `dg2pf_tf.schedules` object; defaults to the model's.
        scope: 'global' or 'layer'; defaults to the model's.
        every_n_steps: update every this many steps instead of per epoch.
        verbose: 1 prints each new level.

    Raises:
        ValueError (when training starts): the model has no pruned layers, or
            no schedule was given to it nor to the callback.
    """

    def __init__(self, schedule=None, *, scope=None, every_n_steps=None, verbose=0):
        super().__init__()
        checks.check_schedule(schedule, schedules.Schedule)
        self.timing = schedules.UpdateTiming(every_n_steps)
        self.schedule = schedule
        self.scope = None if scope is None else check_scope(scope)
        self.verbose = verbose
        self._masks = None
        self._epoch = 0
        self._steps_per_epoch = None
        self._batches_seen = 0
        self.level = None

    def on_train_begin(self, logs=None):
        self._masks = masking.mask_set(self.model, "UpdateMasks")
        pruned = self._masks.pruned
        if self.schedule is None:
            self.schedule = pruned.schedule
        if self.scope is None:
            self.scope = pruned.scope
        if self.schedule is None:
            raise ValueError(
                "UpdateMasks has no schedule: the pruned model carries none. "
                "Pass one, e.g. UpdateMasks(dg2pf_tf.schedules.Linear(0.9, 10))."
            )
        self._steps_per_epoch = (self.params or {}).get("steps")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self._batches_seen = batch + 1
        if not self.timing.due(batch):
            return
        fraction = batch / self._steps_per_epoch if self._steps_per_epoch else 0.0
        self._update(self._epoch + fraction)

    def on_epoch_end(self, epoch, logs=None):
        if self._steps_per_epoch is None:
            # Unknown dataset length: learn it from the first epoch.
            self._steps_per_epoch = self._batches_seen
        if logs is not None:
            logs["sparsity"] = self._masks.sparsity()

    def _update(self, position):
        if not self.schedule.is_active(position):
            return
        level = self.schedule(position)
        # On the device, without waiting for it: the training step that follows
        # reads the new masks.
        self.level = self._masks.update(level, self.scope)
        if self.verbose:
            print(f"UpdateMasks: epoch {position:.2f}, sparsity {self.level:.4f}")
