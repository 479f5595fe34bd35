"""`run()`: the DG2PF procedure (Algorithms 1 and 2 of DG2PF), its settings, state and phases as data.

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
import tensorflow as tf

from dg2pf_tf import checks
from dg2pf_tf.core import masking, schedules
from dg2pf_tf.procedure import checkpoint, tasks
from dg2pf_tf.procedure.batchnorm import batchnorm_layers, reestimate_batchnorm
from dg2pf_tf.checks import check_budget
from dg2pf_tf.checks import check_floor, check_scope, check_sparsity, check_structure, floor_for, sparsity_for
from dg2pf_tf.procedure.data import TrainData, as_dataset, task_of
from dg2pf_tf.procedure.distill import Distiller
from dg2pf_tf.procedure.evaluation import Evaluator
from dg2pf_tf.procedure.loop import EpochLoop, MaskUpdates, is_chief, steps_in
from dg2pf_tf.core.prune import prune, strip
from dg2pf_tf.channels.shrink import shrink
from dg2pf_tf.core.summary import report_counts


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


_FLOATS = ("sparsity", "floor", "temperature", "alpha", "learning_rate", "weight_decay",
           "finetune_learning_rate")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The settings that decide a run's result (see `run` for each).

    Every field is part of the checkpoint's fingerprint, so a run resumes
    only with all of them unchanged. Raises ValueError for a bad value.
    """

    sparsity: float
    pruning_epochs: int
    scope: str
    floor: float
    structure: str
    budget: str
    temperature: float
    alpha: float
    patience: int
    max_epochs: int
    seed: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    clipnorm: float
    finetune_learning_rate: float
    finetune: bool
    recovery: bool
    mask_update_steps: int
    recalibrate_bn: bool
    bn_batches: int
    steps_per_epoch: int
    task: str
    replicas: int

    def __post_init__(self):
        check_sparsity(self.sparsity)
        check_scope(self.scope)
        check_floor(self.floor)
        check_structure(self.structure)
        check_budget(self.budget, self.structure)
        for name in ("pruning_epochs", "patience", "max_epochs", "bn_batches"):
            checks.positive_int(name, getattr(self, name))
        for name in ("steps_per_epoch", "mask_update_steps", "batch_size"):
            checks.positive_int(name, getattr(self, name), none_ok=True)
        # Plain Python values: the fingerprint goes through JSON and back.
        for name in _FLOATS:
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.clipnorm is not None:
            object.__setattr__(self, "clipnorm", float(self.clipnorm))


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


def run(
    model,
    train_data,
    validation_data,
    *,
    sparsity=None,
    pruning_epochs=10,
    teacher=None,
    temperature=4.0,
    alpha=0.75,
    patience=4,
    max_epochs=30,
    seed=None,
    strategy=None,
    callbacks=None,
    verbose="auto",
    scope="global",
    floor=None,
    structure="unstructured",
    budget="channels",
    exclude=None,
    batch_size=32,
    learning_rate=3e-3,
    weight_decay=0.004,
    clipnorm=0.5,
    finetune_learning_rate=1e-3,
    finetune=True,
    recovery=True,
    mask_update_steps=1,
    recalibrate_bn="auto",
    bn_batches=50,
    backup_dir=None,
    steps_per_execution=1,
    steps_per_epoch=None,
    jit_compile=False,
    task="auto",
):
    """Prunes a trained model with DG2PF and returns a `RunResult`.

    The whole procedure of DG2PF on `model` (never modified): distilled
    gradual pruning to `sparsity` over `pruning_epochs` epochs, distillation
    until the validation accuracy plateaus (twice: with, then without the
    teacher), then pruned fine-tuning until it plateaus again; the best state
    at the target sparsity is kept. Training runs in a loop of our own
    (`dg2pf_tf.loop`) under `strategy`, including `MultiWorkerMirroredStrategy`.

    Args:
        model: a trained single-output Keras model (Sequential, Functional or
            subclassed; one or several inputs): a classifier (softmax or
            logits), a binary or multi-label model (sigmoid or logits), or a
            regression model.
        train_data, validation_data: batched `tf.data.Dataset`s of
            `(inputs, labels)` or `(x, y)` tuples of numpy arrays (x may be a
            list or dict of arrays; batched here by `batch_size`, training
            data shuffled anew each epoch). `train_data` may also be a
            function `epoch -> Dataset`.
        task: 'auto', 'categorical', 'binary' or 'regression' (see
            `dg2pf_tf.tasks`). 'auto' reads it from the output activation and
            the labels: class indices or one-hot rows are categorical, 0/1 or
            multi-hot labels binary, other real values regression.
        sparsity, pruning_epochs, scope, exclude: as in `dg2pf_tf.prune`.
        floor: as in `dg2pf_tf.prune`. The default (1.0 for weights) gives
            each kernel its Erdos-Renyi-kernel share of the surviving weights
            (magnitude picks them inside the kernel): on small networks at
            98-99% sparsity one global threshold prunes whole layers away. 0
            is the paper's pure global magnitude.
        structure: as in `dg2pf_tf.prune`. With 'channel', `sparsity` is the
            share of channels removed and `RunResult.model` is the shrunk
            model (`dg2pf_tf.shrink`): fewer filters, units and heads, same outputs.
            With an N:M pattern ('2:4'), `sparsity` is 1 - N/M and the result
            holds the pattern (checked, as the sparsity is, before it returns).
        budget: as in `dg2pf_tf.prune`: with structure 'channel', `sparsity`
            is a share of the model's 'macs' or 'params' instead of its
            'channels'; the report gives the share removed.
        teacher: the distillation teacher (a frozen copy of it is used, the
            model itself is not changed); default `model`. Its outputs must
            have the model's shapes.
        temperature, alpha: the KD loss (see `Distiller`).
        patience: epochs without a better validation score that end a phase.
        max_epochs: upper bound on the epochs of each phase after the
            gradual one.
        seed: makes the run repeatable (weights, shuffling, dropout) on CPU.
        strategy: a `tf.distribute.Strategy`; default the surrounding one.
        callbacks: Keras callbacks added to every phase.
        verbose: 0 silent, 1 progress bars and a line per phase, 2 a line per
            epoch; 'auto' is 1.
        batch_size: batch size for numpy data (global, over all replicas).
        learning_rate, weight_decay, clipnorm: AdamW of the distillation
            phases. The paper fine-tunes large ImageNet networks at 1e-4 to
            1e-5; the default 3e-3 suits small networks trained with Adam:
            after the last gradual step at 99% sparsity, 1e-3 recovered too
            slowly (digits CNN, seed 0: 89.1% against 95.8% test accuracy).
        finetune_learning_rate: SGD (momentum 0.9) of pruned fine-tuning.
        finetune: False skips pruned fine-tuning (an ablation).
        recovery: False prunes hard from the first step (an ablation).
        mask_update_steps: recompute the masks every this many steps of the
            gradual phase (1: every batch, as in DG2PF); None: once per epoch.
        recalibrate_bn: re-estimate BatchNorm statistics from `bn_batches`
            training batches before each validation; 'auto': when the model
            has BatchNorm layers.
        steps_per_execution: training steps per compiled call (as in Keras'
            `compile`); the host then waits for the device once per call.
        steps_per_epoch: train at most this many steps per epoch (smoke runs,
            or epochs defined by steps on repeated data).
        jit_compile: compile each training step with XLA.
        backup_dir: a directory where the run's state is saved after every
            epoch (atomically; by the chief worker only). Calling `run` again
            with the same arguments resumes from it, and ends with the result
            an uninterrupted run gives (for numpy data with a `seed`; a
            dataset must yield the same order each epoch). A finished run's
            directory returns its result without training.

    Raises:
        ValueError/TypeError: bad arguments or data (see `prune`, `Distiller`
            and `data`), a model with several outputs, a teacher whose outputs
            do not fit, `max_epochs < 1` or `patience < 1`.
        checkpoint.CheckpointError: `backup_dir` holds a corrupt checkpoint,
            one of another run, or one whose sparsity invariant is broken.
        loop.NonFiniteLoss: the loss became NaN or infinite (the last good
            checkpoint in `backup_dir` is kept).
    """
    started = time.perf_counter()
    strategy = strategy or tf.distribute.get_strategy()
    config = RunConfig(
        sparsity=sparsity_for(structure, sparsity), pruning_epochs=pruning_epochs, scope=scope,
        floor=floor_for(structure, floor), structure=check_structure(structure), budget=budget,
        temperature=temperature, alpha=alpha, patience=patience, max_epochs=max_epochs, seed=seed,
        batch_size=batch_size, learning_rate=learning_rate, weight_decay=weight_decay,
        clipnorm=clipnorm, finetune_learning_rate=finetune_learning_rate, finetune=bool(finetune),
        recovery=bool(recovery), mask_update_steps=mask_update_steps, recalibrate_bn=recalibrate_bn,
        bn_batches=bn_batches, steps_per_epoch=steps_per_epoch, task=task,
        replicas=strategy.num_replicas_in_sync)
    checks.positive_int("steps_per_execution", steps_per_execution)
    if teacher is not None:
        checks.fitting_teacher(model, teacher)
    if validation_data is None:
        raise ValueError(
            "run() needs `validation_data`: DG2PF ends its phases when the "
            "validation accuracy stops improving. Hold out part of the training set."
        )
    if seed is not None:
        keras.utils.set_random_seed(seed)
    verbose = 1 if verbose == "auto" else int(verbose)
    train = TrainData(train_data, batch_size, seed)
    val = as_dataset(validation_data, batch_size, name="validation_data")
    task, probabilities, width = task_of(model, train, val, task)
    with strategy.scope():
        student = prune(model, schedule=schedules.Linear(config.sparsity, config.pruning_epochs),
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
    norms = batchnorm_layers(student)
    config = dataclasses.replace(config, task=task.name, recalibrate_bn=bool(
        norms if config.recalibrate_bn == "auto" else config.recalibrate_bn))
    procedure = _Procedure(
        config, phase_table(config, distill=config.alpha > 0), student, teacher, optimizers,
        task=task, probabilities=probabilities, width=width, train=train, val=val, callbacks=list(callbacks or []),
        verbose=verbose, loop=EpochLoop(strategy, steps_per_execution=steps_per_execution,
                                        jit_compile=jit_compile))
    if backup_dir is not None:
        procedure.resume_from(backup_dir, is_chief(strategy))
    with _global_batch_statistics(norms, strategy):
        for index in range(procedure.state.phase, len(procedure.phases)):
            procedure.run_phase(index)
        procedure.settle()
    return procedure.result(started)


class _Procedure:
    """A run under way: its models, optimizers, loop, data, checkpoint and state."""

    def __init__(self, config, phases, student, teacher, optimizers, *, task, probabilities, width,
                 train, val, callbacks, verbose, loop):
        self.config, self.phases = config, phases
        self.student, self.teacher, self.optimizers = student, teacher, optimizers
        self.task, self.probabilities = task, probabilities
        self.train, self.val, self.callbacks, self.verbose, self.loop = train, val, callbacks, verbose, loop
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

    def resume_from(self, directory, chief):
        """Uses the checkpoint in `directory`: continues from it if there is one.

        Raises checkpoint.CheckpointError for a corrupt or foreign checkpoint, or
        one whose masks break the sparsity invariant.
        """
        groups = {"student": self.student.variables, "teacher": self.teacher.variables,
                  **{name: opt.variables for name, opt in self.optimizers.items()}}
        self.checkpoint = checkpoint.RunCheckpoint(
            directory, checkpoint.fingerprint(self.config, self.student, self.teacher), groups,
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
            counts[f"{self.config.budget}_removed"] = criterion.saved_share(masks)
            counts[f"{self.config.budget}_total"] = criterion.costs.total_cost
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
            "replicas": self.config.replicas,
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
