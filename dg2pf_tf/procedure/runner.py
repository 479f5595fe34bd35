"""The run under way: it goes through the phase table (`phases`), epoch by epoch.

`run()` checks and resolves everything first; a `Procedure` receives the
prepared models, the data, the resolved `RunConfig` and how to execute, and
does what each row of the table says: train, validate, keep the best state,
save a checkpoint, move on at a plateau.
"""

import contextlib
import dataclasses
import time
import warnings

import keras
import numpy as np

from dg2pf_tf.core import masking, schedules
from dg2pf_tf.core.prune import prune
from dg2pf_tf.core.strip import strip
from dg2pf_tf.procedure import checkpoint, report, tasks
from dg2pf_tf.procedure.batchnorm import BatchNormEstimator
from dg2pf_tf.procedure.distill import Distiller
from dg2pf_tf.procedure.evaluation import Evaluator
from dg2pf_tf.procedure.loop import EpochLoop, MaskUpdates, is_chief, steps_in
from dg2pf_tf.procedure.phases import phase_table


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a run executes, apart from what decides its result (these may change
    between a run and its resumption): see `run`."""

    strategy: object
    callbacks: list
    verbose: int
    steps_per_execution: int
    jit_compile: bool
    backup_dir: str = None


@dataclasses.dataclass(frozen=True)
class Data:
    """What a run trains and validates on: `train` (a `data.TrainData`), `val` (a
    batched dataset), and what the model's output means (`data.Output`)."""

    train: object
    val: object
    output: object


@dataclasses.dataclass(frozen=True)
class Models:
    """The models and optimizers of a run, made under its strategy: the `student`
    (a `PrunedModel` of a copy of the user's model), the frozen `teacher` (a
    stripped copy) and the `optimizers` by the names the phase table uses."""

    student: object
    teacher: object
    optimizers: dict

    @classmethod
    def prepare(cls, model, teacher, exclude, config, strategy):
        """Prunes a copy of `model` as `config` says and copies the teacher (default
        `model`), under `strategy`. Raises what `prune` raises."""
        with strategy.scope():
            student = prune(model, schedule=config.schedule(),
                            scope=config.scope, exclude=exclude, recovery=config.recovery, floor=config.floor,
                            structure=config.structure, budget=config.budget)
            # A frozen copy: the user's teacher keeps its `trainable` (Distiller freezes what it gets).
            teacher = strip(model if teacher is None else teacher)
            optimizers = {
                "adamw": keras.optimizers.AdamW(learning_rate=config.learning_rate,
                                                weight_decay=config.weight_decay, clipnorm=config.clipnorm),
                "sgd": keras.optimizers.SGD(learning_rate=config.finetune_learning_rate, momentum=0.9),
            }
            for optimizer in optimizers.values():
                optimizer.build(student.trainable_variables)
        return cls(student, teacher, optimizers)


@dataclasses.dataclass
class RunState:
    """Where a run is: what a checkpoint holds besides the variables."""

    phase: int = 0            # index into the phase table
    phase_epoch: int = 0      # epochs done in that phase
    epoch: int = 0            # epochs done in all
    wait: int = 0             # monitored epochs since the best score
    plateaus: list = dataclasses.field(default_factory=list)       # phases that ended on a plateau
    rows: list = dataclasses.field(default_factory=list)           # the history, one dict per epoch
    phase_epochs: dict = dataclasses.field(default_factory=dict)
    phase_seconds: dict = dataclasses.field(default_factory=dict)


def _floats(logs):
    return {k: float(v) for k, v in logs.items() if np.ndim(v) == 0}


@contextlib.contextmanager
def _global_batch_statistics(norms, strategy):
    """BatchNorm statistics over the global batch, not each replica's share,
    while the block runs: the run computes what one device would."""
    saved = [layer.synchronized for layer in norms]
    for layer in norms:
        layer.synchronized = layer.synchronized or strategy.num_replicas_in_sync > 1
    try:
        yield
    finally:
        for layer, flag in zip(norms, saved):
            layer.synchronized = flag


class Procedure:
    """A run under way: `models` (`Models`), `data` (`Data`), a resolved `config`
    (`RunConfig`) and its `execution` (`Execution`)."""

    def __init__(self, models, data, config, execution):
        self.models, self.data, self.config, self.execution = models, data, config, execution
        self.phases = phase_table(config)
        self.loop = EpochLoop(execution.strategy, steps_per_execution=execution.steps_per_execution,
                              jit_compile=execution.jit_compile)
        self.masks = masking.MaskSet(models.student)
        self.reestimate_batchnorm = BatchNormEstimator(models.student)
        self.norms = self.reestimate_batchnorm.layers
        self.evaluator = Evaluator(models.student, data.output.task, data.output.probabilities)
        self.state, self.best, self.checkpoint = RunState(), checkpoint.BestState(), None
        self._distillers = {}

    def say(self, message):
        if self.execution.verbose:
            print(message, flush=True)

    def run(self, started):
        """Resumes from the backup directory if there is one, runs the phases left,
        settles the best state; returns the `RunResult`."""
        dense_metric = self._dense_metric()
        if self.execution.backup_dir is not None:
            self.resume_from(self.execution.backup_dir, is_chief(self.execution.strategy))
        with _global_batch_statistics(self.norms, self.execution.strategy):
            for index in range(self.state.phase, len(self.phases)):
                self.run_phase(index)
            self.settle()
        return report.result(self, dense_metric, started)

    def _dense_metric(self):
        """The teacher's validation metric, said with what is pruned; warns when it is near chance."""
        output, config = self.data.output, self.config
        task = output.task
        self.say(f"[dg2pf] task: {task.name} ({'probabilities' if output.probabilities else 'logits'}); "
                 f"validation metric: {task.metric}")
        metric, _ = Evaluator(self.models.teacher, task, output.probabilities)(self.data.val)
        criterion = self.masks.criterion()
        self.say(f"[dg2pf] dense validation {task.metric} {metric:.4f}; pruning {criterion.describe()} "
                 f"to {config.sparsity:.1%} of the {criterion.unit} ({config.scope})")
        near = task.near_chance(metric, output.width)
        if near:
            warnings.warn(f"run(): the dense model's validation {task.metric} is {metric:.4f}, "
                          f"{near}. Is it trained, and is the data preprocessed as its weights expect "
                          f"(keras.applications models: `keras.applications.<family>.preprocess_input`)? "
                          f"DG2PF distils from it: the pruned model cannot learn what it does not know.",
                          stacklevel=4)
        return metric

    def resume_from(self, directory, chief):
        """Uses the checkpoint in `directory`: continues from it if there is one.

        Raises checkpoint.CheckpointError for a corrupt or foreign checkpoint, or
        one whose masks break the sparsity invariant.
        """
        models = self.models
        groups = {"student": models.student.variables, "teacher": models.teacher.variables,
                  **{name: opt.variables for name, opt in models.optimizers.items()}}
        self.checkpoint = checkpoint.RunCheckpoint(
            directory, checkpoint.fingerprint(self.config, models.student, models.teacher,
                                             self.execution.strategy.num_replicas_in_sync), groups,
            chief=chief)
        saved = self.checkpoint.restore(self.best)
        if saved is None:
            return
        self.state = RunState(**saved)
        if self.state.phase > 0:
            try:
                masking.check_invariant(models.student, self.config.sparsity,
                                        source=f"the checkpoint in {directory}")
            except ValueError as error:
                raise checkpoint.CheckpointError(str(error)) from None
        phase = self.phases[min(self.state.phase, len(self.phases) - 1)]
        self.say(f"[dg2pf] resuming from {directory}: epoch {self.state.epoch}, phase {phase.name}")

    def run_phase(self, index):
        """Trains phase `index` of the table until it ends (or skips it)."""
        phase, state, config = self.phases[index], self.state, self.config
        if phase.after_plateau and self.phases[index - 1].name not in state.plateaus:
            return
        if phase.from_best and state.phase_epoch == 0:
            self.best.restore(self.models.student)
        distiller = self._distiller(phase)
        updates = None
        if phase.updates_masks:
            updates = MaskUpdates(self.masks, self.models.student.schedule,
                                  schedules.UpdateTiming(config.mask_update_steps), config.scope)
        calls = self.loop.callbacks(
            distiller, self.execution.callbacks, epochs=state.epoch + phase.epochs - state.phase_epoch,
            steps=config.steps_per_epoch or steps_in(self.data.train.for_epoch(0)),
            verbose={0: 0, 2: 2}.get(self.execution.verbose, 1))
        self.say(f"[dg2pf] phase {phase.name}: up to {phase.epochs - state.phase_epoch} epochs "
                 f"from epoch {state.epoch + 1}")
        calls.on_train_begin()
        while not self._epoch(index, distiller, updates, calls):
            pass
        calls.on_train_end()

    def _distiller(self, phase):
        """The compiled `Distiller` of `phase` (one per teacher use and optimizer)."""
        key = (phase.teacher, phase.optimizer)
        if key not in self._distillers:
            output, models = self.data.output, self.models
            with self.loop.strategy.scope():
                distiller = Distiller(models.student, models.teacher if phase.teacher else None,
                                      temperature=self.config.temperature, alpha=self.config.alpha,
                                      from_logits=not output.probabilities, task=output.task)
                # Keras' "accuracy" reads argmax of the outputs: right for classes only.
                metrics = ["accuracy"] if isinstance(output.task, tasks.Categorical) else None
                distiller.compile(optimizer=models.optimizers[phase.optimizer], metrics=metrics)
            self._distillers[key] = distiller
        return self._distillers[key]

    def _epoch(self, index, distiller, updates, calls):
        """One epoch of phase `index`: train, validate, keep the best, save.
        Returns True when the phase is over."""
        phase, state, config = self.phases[index], self.state, self.config
        tick = time.perf_counter()
        data = self.data.train.for_epoch(state.epoch)
        logs = self.loop.run_epoch(distiller, data, state.epoch, calls, updates=updates,
                                   steps_per_epoch=config.steps_per_epoch)
        if config.recalibrate_bn:
            self.reestimate_batchnorm(data, config.bn_batches)
        metric, loss = self.evaluator(self.data.val)
        logs.update({f"val_{self.data.output.task.metric}": metric, "val_loss": loss,
                     "sparsity": self.masks.sparsity()})
        state.epoch += 1
        state.phase_epoch += 1
        state.rows.append({"epoch": state.epoch, "phase": phase.name, **_floats(logs)})
        state.phase_epochs[phase.name] = state.phase_epochs.get(phase.name, 0) + 1
        state.phase_seconds[phase.name] = state.phase_seconds.get(phase.name, 0.0) + time.perf_counter() - tick
        plateau = phase.monitored and self._plateau(phase, metric, loss)
        if self.execution.verbose == 2:
            print(f"[dg2pf] epoch {state.epoch} {phase.name}: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in logs.items()), flush=True)
        finished = plateau or state.phase_epoch >= phase.epochs
        if finished:
            if plateau:
                state.plateaus.append(phase.name)
            if phase.finalize_masks:
                self.masks.update(config.sparsity)
                masking.set_hard(self.models.student, True)
            state.phase, state.phase_epoch, state.wait = index + 1, 0, 0
        if self.checkpoint is not None:
            self.checkpoint.save(state, self.best)
        return finished

    def _plateau(self, phase, metric, loss):
        """Offers this epoch to the best state; True when `patience` epochs brought nothing better."""
        # The metric first; the loss breaks ties (small validation sets tie often).
        score = (self.data.output.task.score(metric), -loss)
        if self.best.offer(score, self.models.student, self.state.epoch, phase.name):
            self.state.wait = 0
            return False
        self.state.wait += 1
        return self.state.wait >= self.config.patience

    def settle(self):
        """The best state back, its BatchNorm statistics fresh, its sparsity checked.

        Raises ValueError if the masks do not hold the target sparsity.
        """
        student, config = self.models.student, self.config
        self.best.restore(student)
        if config.recalibrate_bn:
            self.reestimate_batchnorm(self.data.train.for_epoch(self.state.epoch), config.bn_batches)
        masking.check_invariant(student, config.sparsity, source="the pruned model")
