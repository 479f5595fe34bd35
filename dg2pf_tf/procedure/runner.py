"""The phases of `run()` as data (Algorithm 2 of DG2PF), and the run under way that goes through them.

1. gradual: distillation from the frozen dense teacher while the sparsity
   grows linearly (simulated pruning with weight recovery, AdamW + clipping);
2. distill: the mask is final; distillation goes on until the validation
   score stops improving;
3. detached: the teacher is dropped, AdamW on cross-entropy until the next
   plateau;
4. finetune: pruned fine-tuning from the best state, cross-entropy, SGD with
   momentum, pruned weights exactly 0, until the validation score stops
   improving.
The best weights (and their masks) seen at the target sparsity win.
"""

import contextlib
import dataclasses
import time
import warnings

import keras
import numpy as np

from dg2pf_tf.channels.shrink import shrink
from dg2pf_tf.core import masking, schedules
from dg2pf_tf.core.prune import prune, strip
from dg2pf_tf.core.summary import report_counts
from dg2pf_tf.procedure import checkpoint, tasks
from dg2pf_tf.procedure.batchnorm import batchnorm_layers, reestimate_batchnorm
from dg2pf_tf.procedure.distill import Distiller
from dg2pf_tf.procedure.evaluation import Evaluator
from dg2pf_tf.procedure.loop import EpochLoop, MaskUpdates, is_chief, steps_in


@dataclasses.dataclass
class RunResult:
    """What `run()` returns.

    Attributes:
        model: the pruned model, stripped: plain Keras layers, exact zeros.
        history: one dict per epoch (epoch, phase, sparsity, losses, the
            validation metric as `val_accuracy` or `val_mse`, `val_loss`).
        report: JSON-serialisable summary: task and metric, dense and pruned
            validation metric (`dense_val_accuracy`, ...), sparsity over the
            prunable weights, over the pruned ones and over all parameters,
            how many weights were prunable, pruned and left dense by choice,
            weights left entirely zero, epochs and seconds per phase.
    """

    model: keras.Model
    history: list
    report: dict


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


@dataclasses.dataclass(frozen=True)
class Phase:
    """One row of the phase table: what a phase of `run()` does."""

    name: str
    epochs: int                   # at most this many
    optimizer: str                # a key of the run's optimizers: 'adamw' or 'sgd'
    teacher: bool                 # distils from the teacher
    updates_masks: bool = False   # the masks follow the schedule, inside the training step
    monitored: bool = True        # ends on a validation plateau; its epochs compete for the best state
    finalize_masks: bool = False  # afterwards the masks are final (from the latest weights) and hard
    after_plateau: bool = False   # runs only if the phase before it ended on a plateau
    from_best: bool = False       # starts from the best state so far


def phase_table(config, distill):
    """The phases of a run, in order (Algorithm 2 of DG2PF)."""
    table = [Phase("gradual", config.pruning_epochs, "adamw", teacher=distill, updates_masks=True,
                   monitored=False, finalize_masks=True)]
    if distill:
        table.append(Phase("distill", config.max_epochs, "adamw", teacher=True))
    # After distillation that never plateaued there is nothing left for this one.
    table.append(Phase("detached", config.max_epochs, "adamw", teacher=False, after_plateau=distill))
    if config.finetune:
        table.append(Phase("finetune", config.max_epochs, "sgd", teacher=False, from_best=True))
    return tuple(table)


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
    """A run under way: its models, optimizers, loop, data, checkpoint and state.

    Made from the user's `model` (copied and pruned: the student), `teacher`
    (a frozen copy; default the model), `exclude` (as in `prune`), a checked
    `RunConfig`, what the output means (`meaning`: `data.task_of`'s task,
    probabilities and width), the data and an `Execution`.
    """

    def __init__(self, model, teacher, exclude, config, meaning, train, val, execution):
        task, probabilities, width = meaning
        strategy = execution.strategy
        with strategy.scope():
            student = prune(model, schedule=schedules.Linear(config.sparsity, config.pruning_epochs),
                            scope=config.scope, exclude=exclude, recovery=config.recovery, floor=config.floor,
                            structure=config.structure, budget=config.budget)
            # A frozen copy: the user's teacher keeps its `trainable` (Distiller freezes what it gets).
            teacher = strip(model if teacher is None else teacher)
            self.optimizers = {
                "adamw": keras.optimizers.AdamW(learning_rate=config.learning_rate,
                                                weight_decay=config.weight_decay, clipnorm=config.clipnorm),
                "sgd": keras.optimizers.SGD(learning_rate=config.finetune_learning_rate, momentum=0.9),
            }
            for optimizer in self.optimizers.values():
                optimizer.build(student.trainable_variables)
        self.norms = batchnorm_layers(student)
        config = dataclasses.replace(config, task=task.name, recalibrate_bn=bool(
            self.norms if config.recalibrate_bn == "auto" else config.recalibrate_bn))
        self.config, self.phases = config, phase_table(config, distill=config.alpha > 0)
        self.student, self.teacher, self.execution = student, teacher, execution
        self.task, self.probabilities = task, probabilities
        self.train, self.val, self.callbacks, self.verbose = train, val, list(execution.callbacks), execution.verbose
        self.loop = EpochLoop(strategy, steps_per_execution=execution.steps_per_execution,
                              jit_compile=execution.jit_compile)
        self.masks = masking.MaskSet(student)
        self.evaluator = Evaluator(student, task, probabilities)
        self.state, self.best, self.checkpoint = RunState(), checkpoint.BestState(), None
        self._distillers = {}
        self.say(f"[dg2pf] task: {task.name} ({'probabilities' if probabilities else 'logits'}); "
                 f"validation metric: {task.metric}")
        self.dense_metric, _ = Evaluator(teacher, task, probabilities)(val)
        criterion = self.masks.criterion()
        what = (f"{criterion.total} channels" if config.structure == "channel"
                else f"{len(self.masks.entries)} weights")
        goal = f"{config.sparsity:.1%}" + (f" of the {criterion.unit}" if config.budget != "channels" else "")
        self.say(f"[dg2pf] dense validation {task.metric} {self.dense_metric:.4f}; pruning "
                 f"{what} to {goal} ({config.scope})")
        near = task.near_chance(self.dense_metric, width)
        if near:
            warnings.warn(f"run(): the dense model's validation {task.metric} is {self.dense_metric:.4f}, "
                          f"{near}. Is it trained, and is the data preprocessed as its weights expect "
                          f"(keras.applications models: `keras.applications.<family>.preprocess_input`)? "
                          f"DG2PF distils from it: the pruned model cannot learn what it does not know.",
                          stacklevel=3)

    def say(self, message):
        if self.verbose:
            print(message)

    def run(self, started):
        """Resumes from the backup directory if there is one, runs the phases left,
        settles the best state; returns the `RunResult`."""
        if self.execution.backup_dir is not None:
            self.resume_from(self.execution.backup_dir, is_chief(self.execution.strategy))
        with _global_batch_statistics(self.norms, self.execution.strategy):
            for index in range(self.state.phase, len(self.phases)):
                self.run_phase(index)
            self.settle()
        return self.result(started)

    def resume_from(self, directory, chief):
        """Uses the checkpoint in `directory`: continues from it if there is one.

        Raises checkpoint.CheckpointError for a corrupt or foreign checkpoint, or
        one whose masks break the sparsity invariant.
        """
        groups = {"student": self.student.variables, "teacher": self.teacher.variables,
                  **{name: opt.variables for name, opt in self.optimizers.items()}}
        self.checkpoint = checkpoint.RunCheckpoint(
            directory, checkpoint.fingerprint(self.config, self.student, self.teacher,
                                             self.execution.strategy.num_replicas_in_sync), groups,
            chief=chief)
        saved = self.checkpoint.restore(self.best)
        if saved is None:
            return
        self.state = RunState(**saved)
        if self.state.phase > 0:
            try:
                masking.check_invariant(self.student, self.config.sparsity,
                                        source=f"the checkpoint in {directory}")
            except ValueError as error:
                raise checkpoint.CheckpointError(str(error)) from None
        phase = self.phases[min(self.state.phase, len(self.phases) - 1)]
        self.say(f"[dg2pf] resuming from {directory}: epoch {self.state.epoch}, phase {phase.name}")

    def run_phase(self, index):
        """Trains phase `index` of the table until it ends (or skips it)."""
        phase, state = self.phases[index], self.state
        if phase.after_plateau and self.phases[index - 1].name not in state.plateaus:
            return
        if phase.from_best and state.phase_epoch == 0:
            self.best.restore(self.student)
        distiller = self._distiller(phase)
        updates = None
        if phase.updates_masks:
            updates = MaskUpdates(self.masks, self.student.schedule, self.config.mask_update_steps,
                                  self.config.scope)
        calls = self.loop.callbacks(
            distiller, self.callbacks, epochs=state.epoch + phase.epochs - state.phase_epoch,
            steps=self.config.steps_per_epoch or steps_in(self.train.for_epoch(0)),
            verbose={0: 0, 2: 2}.get(self.verbose, 1))
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
            with self.loop.strategy.scope():
                distiller = Distiller(self.student, self.teacher if phase.teacher else None,
                                      temperature=self.config.temperature, alpha=self.config.alpha,
                                      from_logits=not self.probabilities, task=self.task)
                # Keras' "accuracy" reads argmax of the outputs: right for classes only.
                metrics = ["accuracy"] if isinstance(self.task, tasks.Categorical) else None
                distiller.compile(optimizer=self.optimizers[phase.optimizer], metrics=metrics)
            self._distillers[key] = distiller
        return self._distillers[key]

    def _epoch(self, index, distiller, updates, calls):
        """One epoch of phase `index`: train, validate, keep the best, save.
        Returns True when the phase is over."""
        phase, state, config = self.phases[index], self.state, self.config
        tick = time.perf_counter()
        data = self.train.for_epoch(state.epoch)
        logs = self.loop.run_epoch(distiller, data, state.epoch, calls, updates=updates,
                                   steps_per_epoch=config.steps_per_epoch)
        if config.recalibrate_bn:
            reestimate_batchnorm(self.student, data, config.bn_batches)
        metric, loss = self.evaluator(self.val)
        logs.update({f"val_{self.task.metric}": metric, "val_loss": loss, "sparsity": self.masks.sparsity()})
        state.epoch += 1
        state.phase_epoch += 1
        state.rows.append({"epoch": state.epoch, "phase": phase.name, **_floats(logs)})
        state.phase_epochs[phase.name] = state.phase_epochs.get(phase.name, 0) + 1
        state.phase_seconds[phase.name] = state.phase_seconds.get(phase.name, 0.0) + time.perf_counter() - tick
        plateau = phase.monitored and self._plateau(phase, metric, loss)
        if self.verbose == 2:
            print(f"[dg2pf] epoch {state.epoch} {phase.name}: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in logs.items()))
        finished = plateau or state.phase_epoch >= phase.epochs
        if finished:
            if plateau:
                state.plateaus.append(phase.name)
            if phase.finalize_masks:
                self.masks.update(config.sparsity)
                masking.set_hard(self.student, True)
            state.phase, state.phase_epoch, state.wait = index + 1, 0, 0
        if self.checkpoint is not None:
            self.checkpoint.save(state, self.best)
        return finished

    def _plateau(self, phase, metric, loss):
        """Offers this epoch to the best state; True when `patience` epochs brought nothing better."""
        # The metric first; the loss breaks ties (small validation sets tie often).
        if self.best.offer((self.task.score(metric), -loss), self.student, self.state.epoch, phase.name):
            self.state.wait = 0
            return False
        self.state.wait += 1
        return self.state.wait >= self.config.patience

    def settle(self):
        """The best state back, its BatchNorm statistics fresh, its sparsity checked.

        Raises ValueError if the masks do not hold the target sparsity.
        """
        self.best.restore(self.student)
        if self.config.recalibrate_bn:
            reestimate_batchnorm(self.student, self.train.for_epoch(self.state.epoch), self.config.bn_batches)
        masking.check_invariant(self.student, self.config.sparsity, source="the pruned model")

    def _channel_counts(self, final):
        """Channels removed and the shrunk model's size, for structure 'channel'
        (and the share of the cost removed, with a budget)."""
        if self.config.structure != "channel":
            return {}
        criterion = self.masks.criterion()
        masks = [m.numpy() for m in self.student.masks]
        counts = {"channels_removed": criterion.removed(masks), "channels_total": criterion.total,
                  "params_shrunk": final.count_params()}
        if criterion.costs is not None:
            counts.update(budget=self.config.budget, budget_removed=criterion.saved_share(masks),
                          budget_total=criterion.costs.total_cost)
        return counts

    def result(self, started):
        """The `RunResult`: the stripped model (shrunk, for channels), the history and the report."""
        stripped = strip(self.student)
        final = shrink(stripped) if self.config.structure == "channel" else stripped
        metric = self.task.metric
        final_metric, final_loss = Evaluator(final, self.task, self.probabilities)(self.val)
        state = self.state
        report = {
            "task": self.task.name,
            "metric": metric,
            f"dense_val_{metric}": self.dense_metric,
            f"pruned_val_{metric}": final_metric,
            "pruned_val_loss": final_loss,
            "target_sparsity": self.config.sparsity,
            **report_counts(self.student, stripped),
            **self._channel_counts(final),
            "best_epoch": self.best.epoch,
            "best_phase": self.best.phase,
            "epochs": dict(state.phase_epochs),
            "seconds": {**state.phase_seconds, "total": time.perf_counter() - started},
            "replicas": self.execution.strategy.num_replicas_in_sync,
        }
        if self.checkpoint is not None:
            self.checkpoint.mark_done(report)
        if "channels_removed" in report:
            self.say(f"[dg2pf] {report['channels_removed']:,} of {report['channels_total']:,} channels "
                     f"removed: {report['params_total']:,} -> {report['params_shrunk']:,} parameters")
        self.say(f"[dg2pf] done: {metric} {self.dense_metric:.4f} -> {final_metric:.4f}; "
                 f"{report['sparsity_prunable']:.2%} of {report['params_prunable']:,} prunable weights "
                 f"are zero ({report['params_dense_by_choice']:,} left dense by choice; best: epoch "
                 f"{self.best.epoch}, {self.best.phase})")
        return RunResult(model=final, history=state.rows, report=report)
