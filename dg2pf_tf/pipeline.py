"""`run()`: the DG2PF procedure, phase by phase (Algorithms 1 and 2 of DG2PF).

1. gradual: distillation from the frozen dense teacher while the sparsity
   grows linearly (simulated pruning with weight recovery, AdamW + clipping);
2. distill: the mask is final; distillation goes on until the validation
   score stops improving;
3. detached: the teacher is dropped, AdamW on cross-entropy until the next
   plateau;
4. finetune: pruned fine-tuning, cross-entropy, SGD with momentum, pruned
   weights exactly 0, until the validation score stops improving.
The best weights (and their masks) seen at the target sparsity win.
"""

import dataclasses
import hashlib
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

from dg2pf_tf import checkpoint, masking, schedules, tasks
from dg2pf_tf.batchnorm import batchnorm_layers, reestimate_batchnorm
from dg2pf_tf.criteria import check_scope, check_sparsity
from dg2pf_tf.data import TrainData, as_dataset, check_inputs, first_batch
from dg2pf_tf.distill import Distiller
from dg2pf_tf.evaluation import Evaluator
from dg2pf_tf.loop import EpochLoop, MaskUpdates, steps_in
from dg2pf_tf.prune import prune, strip
from dg2pf_tf.summary import sparsity_summary

PHASES = ("gradual", "distill", "detached", "finetune")


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


class _Tracker:
    """Best validation score at the target sparsity and the state that made it."""

    def __init__(self):
        self.score = None
        self.weights = None
        self.epoch = None
        self.phase = None

    def offer(self, score, model, epoch, phase):
        """Keeps `model`'s weights (masks included) if `score` beats the best."""
        if self.score is None or score > self.score:
            self.score, self.epoch, self.phase = score, epoch, phase
            self.weights = [np.array(v) for v in model.get_weights()]
            return True
        return False

    def restore(self, model):
        if self.weights is not None:
            model.set_weights(self.weights)

    def dump(self):
        """`(header, arrays)` for a checkpoint; the header is None before any offer."""
        if self.weights is None:
            return None, {}
        header = {"score": list(self.score), "epoch": self.epoch, "phase": self.phase,
                  "count": len(self.weights)}
        return header, {f"best/{i}": w for i, w in enumerate(self.weights)}

    def load(self, header, arrays):
        """Takes back what `dump` gave."""
        if header is not None:
            self.score, self.epoch, self.phase = tuple(header["score"]), header["epoch"], header["phase"]
            self.weights = [arrays[f"best/{i}"] for i in range(header["count"])]


def _floats(logs):
    return {k: float(v) for k, v in logs.items() if np.ndim(v) == 0}


@dataclasses.dataclass
class _Phase:
    name: str
    epochs: int
    teacher: bool
    optimizer: str
    monitored: bool


def _fingerprint(model, **settings):
    """What a checkpoint must agree with: the model's weights' names and shapes, the settings."""
    layout = json.dumps([(w.path, list(w.shape)) for w in model.weights])
    return {"model": hashlib.sha1(layout.encode()).hexdigest()[:16], "model_name": model.name,
            **{k: v for k, v in settings.items()}}


def _task_of(model, train, val, task):
    """`(task, probabilities)` of `model` on its data, the first batches checked.

    Raises ValueError naming the data that cannot train `model`.
    """
    if task != "auto":
        tasks.get(task)
    x, y = first_batch(train, "train_data")
    check_inputs(model, x, "train_data")
    try:
        outputs = model(x, training=False)
    except Exception as error:  # whatever the model raises, say which data it was
        raise ValueError(f"`train_data`: model '{model.name}' cannot take its first batch "
                         f"({type(error).__name__}: {error}).") from None
    task, probabilities = tasks.infer(model, outputs, y, task)
    width = int(np.prod(keras.tree.flatten(outputs)[0].shape[1:]))
    task.check_labels(y, width, "train_data")
    xv, yv = first_batch(val, "validation_data")
    check_inputs(model, xv, "validation_data")
    task.check_labels(yv, width, "validation_data")
    return task, probabilities


def run(
    model,
    train_data,
    validation_data,
    *,
    sparsity=0.9,
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
    floor=1.0,
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
        floor: as in `dg2pf_tf.prune`. The default 1.0 gives each kernel its
            Erdos-Renyi-kernel share of the surviving weights (magnitude
            picks them inside the kernel): on small networks at 98-99%
            sparsity one global threshold prunes whole layers away. 0 is the
            paper's pure global magnitude.
        teacher: the distillation teacher; default a frozen copy of `model`.
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
            and `data`), a model with several outputs, `max_epochs < 1` or
            `patience < 1`.
        checkpoint.CheckpointError: `backup_dir` holds a corrupt checkpoint,
            one of another run, or one whose sparsity invariant is broken.
        loop.NonFiniteLoss: the loss became NaN or infinite (the last good
            checkpoint in `backup_dir` is kept).
    """
    started = time.perf_counter()
    check_sparsity(sparsity)
    check_scope(scope)
    for name, value in (("patience", patience), ("max_epochs", max_epochs),
                        ("steps_per_execution", steps_per_execution)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
    if steps_per_epoch is not None and (
            isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
        raise ValueError(f"`steps_per_epoch` must be None or an int >= 1, got {steps_per_epoch!r}.")
    if validation_data is None:
        raise ValueError(
            "run() needs `validation_data`: DG2PF ends its phases when the "
            "validation accuracy stops improving. Hold out part of the training set."
        )
    if seed is not None:
        keras.utils.set_random_seed(seed)
    strategy = strategy or tf.distribute.get_strategy()
    verbose = 1 if verbose == "auto" else int(verbose)
    say = print if verbose else (lambda *a, **k: None)
    train = TrainData(train_data, batch_size, seed)
    val = as_dataset(validation_data, batch_size, name="validation_data")
    task, probabilities = _task_of(model, train, val, task)
    say(f"[dg2pf] task: {task.name} ({'probabilities' if probabilities else 'logits'}); "
        f"validation metric: {task.metric}")
    schedule = schedules.Linear(sparsity, pruning_epochs)

    with strategy.scope():
        student = prune(
            model, schedule=schedule, scope=scope, exclude=exclude,
            recovery=recovery, floor=floor,
        )
        teacher = strip(model) if teacher is None else teacher
        optimizers = {
            "adamw": keras.optimizers.AdamW(
                learning_rate=learning_rate, weight_decay=weight_decay, clipnorm=clipnorm),
            "sgd": keras.optimizers.SGD(learning_rate=finetune_learning_rate, momentum=0.9),
        }
        for optimizer in optimizers.values():
            optimizer.build(student.trainable_variables)
    masks = masking.MaskSet(student)
    norms = batchnorm_layers(student)
    if recalibrate_bn == "auto":
        recalibrate_bn = bool(norms)
    # Batch statistics over the global batch, not each replica's share: the
    # run then computes what one device would (and workers stay identical).
    synchronized = [layer.synchronized for layer in norms]
    for layer in norms:
        layer.synchronized = layer.synchronized or strategy.num_replicas_in_sync > 1
    distill_on = teacher is not None and alpha > 0
    phases = [_Phase("gradual", pruning_epochs, distill_on, "adamw", False)]
    if distill_on:
        phases.append(_Phase("distill", max_epochs, True, "adamw", True))
    phases.append(_Phase("detached", max_epochs, False, "adamw", True))
    if finetune:
        phases.append(_Phase("finetune", max_epochs, False, "sgd", True))

    state = {"phase": 0, "phase_epoch": 0, "epoch": 0, "wait": 0, "plateaus": [],
             "rows": [], "phase_epochs": {}, "phase_seconds": {}}
    tracker = _Tracker()
    variables = {"student": student.variables, "teacher": teacher.variables,
                 **{name: opt.variables for name, opt in optimizers.items()}}
    fingerprint = _fingerprint(
        student, sparsity=float(sparsity), pruning_epochs=pruning_epochs, scope=scope,
        floor=float(floor), alpha=float(alpha), temperature=float(temperature),
        patience=patience, max_epochs=max_epochs, seed=seed, batch_size=batch_size,
        learning_rate=float(learning_rate), finetune_learning_rate=float(finetune_learning_rate),
        finetune=bool(finetune), recovery=bool(recovery), replicas=strategy.num_replicas_in_sync,
        weight_decay=float(weight_decay), clipnorm=None if clipnorm is None else float(clipnorm),
        mask_update_steps=mask_update_steps, recalibrate_bn=recalibrate_bn, bn_batches=bn_batches,
        steps_per_epoch=steps_per_epoch, task=task.name)
    chief = getattr(strategy.extended, "should_checkpoint", True)
    if backup_dir is not None:
        os.makedirs(backup_dir, exist_ok=True)
        restored = checkpoint.load(backup_dir, fingerprint)
        if restored is not None:
            header, arrays = restored
            for group, values in variables.items():
                for i, variable in enumerate(values):
                    variable.assign(arrays[f"{group}/{i}"])
            state.update(header["state"])
            tracker.load(header["tracker"], arrays)
            if state["phase"] > 0:
                try:
                    masking.check_invariant(student, sparsity, source=f"the checkpoint in {backup_dir}")
                except ValueError as error:
                    raise checkpoint.CheckpointError(str(error)) from None
            say(f"[dg2pf] resuming from {backup_dir}: epoch {state['epoch']}, phase "
                f"{phases[min(state['phase'], len(phases) - 1)].name}")

    def save():
        if backup_dir is None or not chief:
            return
        arrays = {f"{group}/{i}": np.asarray(v) for group, values in variables.items()
                  for i, v in enumerate(values)}
        best, best_arrays = tracker.dump()
        checkpoint.save(backup_dir, {"fingerprint": fingerprint, "state": state, "tracker": best},
                        {**arrays, **best_arrays})

    evaluator = Evaluator(student, task, probabilities)
    metric_key = f"val_{task.metric}"
    epochs = EpochLoop(strategy, steps_per_execution=steps_per_execution, jit_compile=jit_compile)
    dense_metric, _ = Evaluator(teacher, task, probabilities)(val)
    say(f"[dg2pf] dense validation {task.metric} {dense_metric:.4f}; "
        f"pruning {len(masks.entries)} weights to {sparsity:.1%} ({scope})")

    distillers = {}
    for index in range(state["phase"], len(phases)):
        phase = phases[index]
        if phase.name == "detached" and distill_on and "distill" not in state["plateaus"]:
            continue  # distillation never plateaued: nothing left for the detached phase
        key = (phase.teacher, phase.optimizer)
        if key not in distillers:
            with strategy.scope():
                distillers[key] = Distiller(student, teacher if phase.teacher else None,
                                            temperature=temperature, alpha=alpha,
                                            from_logits=not probabilities, task=task)
                # Keras' "accuracy" reads argmax of the outputs: right for classes only.
                metrics = ["accuracy"] if isinstance(task, tasks.Categorical) else None
                distillers[key].compile(optimizer=optimizers[phase.optimizer], metrics=metrics)
        distiller = distillers[key]
        updates = None
        if phase.name == "gradual":
            updates = MaskUpdates(masks, schedule, mask_update_steps, scope)
        calls = epochs.callbacks(distiller, list(callbacks or []),
                                 epochs=state["epoch"] + phase.epochs - state["phase_epoch"],
                                 steps=steps_per_epoch or steps_in(train.for_epoch(0)),
                                 verbose={0: 0, 2: 2}.get(verbose, 1))
        say(f"[dg2pf] phase {phase.name}: up to {phase.epochs - state['phase_epoch']} epochs "
            f"from epoch {state['epoch'] + 1}")
        calls.on_train_begin()
        while True:
            tick = time.perf_counter()
            data = train.for_epoch(state["epoch"])
            logs = epochs.run_epoch(distiller, data, state["epoch"], calls, updates=updates,
                                    steps_per_epoch=steps_per_epoch)
            if recalibrate_bn:
                reestimate_batchnorm(student, data, bn_batches)
            metric, loss = evaluator(val)
            logs.update({metric_key: metric, "val_loss": loss, "sparsity": masks.sparsity()})
            state["epoch"] += 1
            state["phase_epoch"] += 1
            state["rows"].append({"epoch": state["epoch"], "phase": phase.name, **_floats(logs)})
            state["phase_epochs"][phase.name] = state["phase_epochs"].get(phase.name, 0) + 1
            state["phase_seconds"][phase.name] = (
                state["phase_seconds"].get(phase.name, 0.0) + time.perf_counter() - tick)
            plateau = False
            if phase.monitored:
                # The metric first; the loss breaks ties (small validation sets tie often).
                if tracker.offer((task.score(metric), -loss), student, state["epoch"], phase.name):
                    state["wait"] = 0
                else:
                    state["wait"] += 1
                    plateau = state["wait"] >= patience
            if verbose == 2:
                print(f"[dg2pf] epoch {state['epoch']} {phase.name}: " + ", ".join(
                    f"{k} {v:.4f}" for k, v in logs.items()))
            finished = plateau or state["phase_epoch"] >= phase.epochs
            if finished:
                if plateau:
                    state["plateaus"].append(phase.name)
                _end_phase(phase, plateau, masks, sparsity, tracker, student)
                state.update(phase=index + 1, phase_epoch=0, wait=0)
            save()
            if finished:
                break
        calls.on_train_end()

    tracker.restore(student)
    if recalibrate_bn:
        reestimate_batchnorm(student, train.for_epoch(state["epoch"]), bn_batches)
    masking.check_invariant(student, sparsity, source="the pruned model")
    for layer, flag in zip(norms, synchronized):
        layer.synchronized = flag
    final = strip(student)
    final_metric, final_loss = Evaluator(final, task, probabilities)(val)
    report = {
        "task": task.name,
        "metric": task.metric,
        f"dense_val_{task.metric}": dense_metric,
        f"pruned_val_{task.metric}": final_metric,
        "pruned_val_loss": final_loss,
        "target_sparsity": float(sparsity),
        **_accounting(student, final),
        "best_epoch": tracker.epoch,
        "best_phase": tracker.phase,
        "epochs": dict(state["phase_epochs"]),
        "seconds": {**state["phase_seconds"], "total": time.perf_counter() - started},
        "replicas": strategy.num_replicas_in_sync,
    }
    if backup_dir is not None and chief:
        checkpoint.mark_done(backup_dir, report)
    say(f"[dg2pf] done: {task.metric} {dense_metric:.4f} -> {final_metric:.4f}; "
        f"{report['sparsity_prunable']:.2%} of {report['params_prunable']:,} prunable weights are "
        f"zero ({report['params_dense_by_choice']:,} left dense by choice; best: epoch "
        f"{tracker.epoch}, {tracker.phase})")
    return RunResult(model=final, history=state["rows"], report=report)


def _accounting(pruned, stripped):
    """The report's sparsity figures: one definition (see `summary`), masks' share apart."""
    masked, plain = sparsity_summary(pruned), sparsity_summary(stripped)
    return {
        "sparsity_prunable": plain.prunable_sparsity,
        "sparsity_pruned": masked.pruned_sparsity,
        "sparsity_all_params": plain.total_sparsity,
        "params_prunable": plain.prunable_weights,
        "params_pruned": masked.pruned_weights,
        "params_dense_by_choice": masked.dense_by_choice,
        "params_total": plain.total_params,
        "params_nonzero": plain.total_params - plain.total_zeros,
        "entirely_zero": list(plain.dead),
    }


def _end_phase(phase, plateau, masks, sparsity, tracker, student):
    """What happens between phases: the mask becomes final after the gradual
    phase (from the latest weights); the best state returns before fine-tuning
    (after the detached phase, or after distillation when it never plateaued
    and so no detached phase follows)."""
    if phase.name == "gradual":
        masks.update(sparsity)
        masking.set_hard(masks.pruned, True)
    elif phase.name == "detached" or (phase.name == "distill" and not plateau):
        tracker.restore(student)
