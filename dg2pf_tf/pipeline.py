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
import time

import keras
import numpy as np
import tensorflow as tf

from dg2pf_tf import masking, schedules
from dg2pf_tf.batchnorm import batchnorm_layers, reestimate_batchnorm
from dg2pf_tf.callbacks import UpdateMasks
from dg2pf_tf.criteria import check_scope, check_sparsity
from dg2pf_tf.distill import Distiller
from dg2pf_tf.losses import cross_entropy, is_one_hot, output_is_probability
from dg2pf_tf.prune import prune, strip
from dg2pf_tf.summary import sparsity_summary

PHASES = ("gradual", "distill", "detached", "finetune")


@dataclasses.dataclass
class RunResult:
    """What `run()` returns.

    Attributes:
        model: the pruned model, stripped: plain Keras layers, exact zeros.
        history: one dict per epoch (epoch, phase, sparsity, losses,
            val_accuracy, val_loss).
        report: JSON-serialisable summary (accuracies, sparsity, epochs per
            phase, wall time).
    """

    model: keras.Model
    history: list
    report: dict


def as_dataset(data, batch_size, *, shuffle=False, seed=None, name="data"):
    """A batched `tf.data.Dataset` from a dataset or an `(x, y)` numpy tuple.

    Raises:
        TypeError: `data` is neither.
        ValueError: `x` and `y` differ in length, or the data is empty.
    """
    if isinstance(data, tf.data.Dataset):
        return data
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(
            f"`{name}` must be a batched tf.data.Dataset or an (x, y) tuple of "
            f"arrays, got {type(data).__name__}."
        )
    x, y = np.asarray(data[0]), np.asarray(data[1])
    if len(x) != len(y):
        raise ValueError(f"`{name}`: x has {len(x)} examples but y has {len(y)}.")
    if len(x) == 0:
        raise ValueError(f"`{name}` is empty.")
    if x.dtype == np.float64:
        x = x.astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def evaluate(model, data):
    """`(top-1 accuracy, mean cross-entropy)` of `model` over batched `data`.

    Works with logits or softmax outputs and sparse or one-hot labels.
    Raises ValueError if `data` yields no example.
    """
    return Evaluator(model)(data)


class Evaluator:
    """`evaluate()` for one model, its traced step reused across calls."""

    def __init__(self, model):
        probs = output_is_probability(model)

        @tf.function(reduce_retracing=True)
        def step(x, y):
            out = model(x, training=False)
            ce = cross_entropy(y, out, probs)
            predicted = tf.argmax(out, axis=-1, output_type=tf.int32)
            if is_one_hot(y, out):
                labels = tf.argmax(y, axis=-1, output_type=tf.int32)
            else:
                labels = tf.reshape(tf.cast(y, tf.int32), [-1])
            correct = tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32))
            return correct, tf.reduce_sum(ce), tf.cast(tf.shape(labels)[0], tf.float32)

        self._step = step

    def __call__(self, data):
        correct = loss = count = 0.0
        for batch in data:
            c, l, n = self._step(batch[0], batch[1])
            correct, loss, count = correct + float(c), loss + float(l), count + float(n)
        if count == 0:
            raise ValueError("evaluate(): the validation data yielded no example.")
        return correct / count, loss / count


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


class _PhaseMonitor(keras.callbacks.Callback):
    """Per epoch: re-estimates BatchNorm, scores the student on validation
    data, writes `val_accuracy`/`val_loss`/`sparsity` into the logs, keeps the
    best state and stops the phase after `patience` epochs without a new best.
    """

    def __init__(self, run, phase, tracker=None, patience=None):
        super().__init__()
        self.run, self.phase, self.tracker, self.patience = run, phase, tracker, patience
        self.wait = 0
        self.plateau = False

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        run = self.run
        if run.recalibrate_bn:
            reestimate_batchnorm(run.student, run.train, run.bn_batches)
        accuracy, loss = run.evaluate(run.val)
        logs["val_accuracy"], logs["val_loss"] = accuracy, loss
        logs["sparsity"] = masking.mask_sparsity(run.wrappers)
        run.rows.append({"epoch": epoch + 1, "phase": self.phase, **_floats(logs)})
        if self.tracker is None:
            return
        # Accuracy first; the loss breaks ties (small validation sets tie often).
        if self.tracker.offer((accuracy, -loss), run.student, epoch + 1, self.phase):
            self.wait = 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.plateau = True
                self.model.stop_training = True


def _floats(logs):
    return {k: float(v) for k, v in logs.items() if np.ndim(v) == 0}


class _Run:
    """State shared by the phases of one `run()` call."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)
        self.rows = []
        self.epoch = 0
        self.phase_epochs = {}
        self.phase_seconds = {}

    def fit(self, distiller, phase, epochs, callbacks):
        start = time.perf_counter()
        if self.verbose:
            print(f"[dg2pf] phase {phase}: up to {epochs} epochs from epoch {self.epoch + 1}")
        history = distiller.fit(
            self.train,
            epochs=self.epoch + epochs,
            initial_epoch=self.epoch,
            callbacks=callbacks + list(self.user_callbacks),
            verbose=self.fit_verbose,
            shuffle=False,  # numpy data is shuffled by as_dataset; datasets as given
        )
        ran = len(history.epoch)
        self.epoch += ran
        self.phase_epochs[phase] = self.phase_epochs.get(phase, 0) + ran
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - start


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
):
    """Prunes a trained classifier with DG2PF and returns a `RunResult`.

    The whole procedure of `../DG2PF.md` on `model` (never modified):
    distilled gradual pruning to `sparsity` over `pruning_epochs` epochs,
    distillation until the validation accuracy plateaus (twice: with, then
    without the teacher), then pruned fine-tuning until it plateaus again; the
    best state at the target sparsity is kept.

    Args:
        model: a trained Sequential/Functional classifier (logits or softmax).
        train_data, validation_data: batched `tf.data.Dataset`s of `(x, y)`
            or `(x, y)` numpy tuples (batched here by `batch_size`, training
            data shuffled); labels sparse integers or one-hot.
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
        callbacks: Keras callbacks added to every phase's `fit`.
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

    Raises:
        ValueError/TypeError: bad arguments or data (see `prune` and
            `Distiller`), `max_epochs < 1` or `patience < 1`.
    """
    started = time.perf_counter()
    check_sparsity(sparsity)
    check_scope(scope)
    for name, value in (("patience", patience), ("max_epochs", max_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
    if validation_data is None:
        raise ValueError(
            "run() needs `validation_data`: DG2PF ends its phases when the "
            "validation accuracy stops improving. Hold out part of the training set."
        )
    if seed is not None:
        keras.utils.set_random_seed(seed)
    strategy = strategy or tf.distribute.get_strategy()
    verbose = 1 if verbose == "auto" else int(verbose)
    train = as_dataset(train_data, batch_size, shuffle=True, seed=seed, name="train_data")
    val = as_dataset(validation_data, batch_size, name="validation_data")
    schedule = schedules.Linear(sparsity, pruning_epochs)

    with strategy.scope():
        student = prune(
            model, schedule=schedule, scope=scope, exclude=exclude,
            recovery=recovery, floor=floor,
        )
        teacher = strip(model) if teacher is None else teacher
    wrappers = masking.find_wrappers(student)
    if recalibrate_bn == "auto":
        recalibrate_bn = bool(batchnorm_layers(student))
    state = _Run(
        student=student, wrappers=wrappers, train=train, val=val,
        recalibrate_bn=bool(recalibrate_bn), bn_batches=bn_batches,
        user_callbacks=list(callbacks or []), verbose=verbose,
        evaluate=Evaluator(student),
        fit_verbose={0: 0, 1: 1, 2: 2}.get(verbose, 1),
    )
    dense_accuracy, _ = evaluate(teacher, val)
    if verbose:
        print(f"[dg2pf] dense validation accuracy {dense_accuracy:.4f}; "
              f"pruning {len(wrappers)} layers to {sparsity:.1%} ({scope})")

    def distiller(with_teacher, optimizer):
        with strategy.scope():
            d = Distiller(
                student, teacher if with_teacher else None,
                temperature=temperature, alpha=alpha,
            )
            d.compile(optimizer=optimizer, metrics=["accuracy"])
        return d

    with strategy.scope():
        adamw = keras.optimizers.AdamW(
            learning_rate=learning_rate, weight_decay=weight_decay, clipnorm=clipnorm
        )
    distill_on = teacher is not None and alpha > 0

    # 1. Distilled gradual pruning.
    update = UpdateMasks(schedule, scope=scope, every_n_steps=mask_update_steps)
    state.fit(
        distiller(distill_on, adamw), "gradual", pruning_epochs,
        [update, _PhaseMonitor(state, "gradual")],
    )
    # The mask at the target level, from the latest weights, becomes final.
    masking.set_level(wrappers, sparsity)
    masking.set_hard(wrappers, True)

    tracker = _Tracker()
    monitor = _PhaseMonitor(state, "distill", tracker, patience)
    # 2./3. Distillation until a plateau, then the same without the teacher.
    if distill_on:
        state.fit(distiller(True, adamw), "distill", max_epochs, [monitor])
    if not distill_on or monitor.plateau:
        monitor = _PhaseMonitor(state, "detached", tracker, patience)
        state.fit(distiller(False, adamw), "detached", max_epochs, [monitor])
    tracker.restore(student)

    # 4. Pruned fine-tuning.
    if finetune:
        with strategy.scope():
            sgd = keras.optimizers.SGD(learning_rate=finetune_learning_rate, momentum=0.9)
        monitor = _PhaseMonitor(state, "finetune", tracker, patience)
        state.fit(distiller(False, sgd), "finetune", max_epochs, [monitor])
        tracker.restore(student)

    if state.recalibrate_bn:
        reestimate_batchnorm(student, train, bn_batches)
    final = strip(student)
    final_accuracy, final_loss = evaluate(final, val)
    summary = sparsity_summary(final)
    report = {
        "dense_val_accuracy": dense_accuracy,
        "pruned_val_accuracy": final_accuracy,
        "pruned_val_loss": final_loss,
        "target_sparsity": float(sparsity),
        "sparsity_prunable": summary.prunable_sparsity,
        "sparsity_all_params": summary.total_sparsity,
        "params_total": summary.total_params,
        "params_nonzero": summary.total_params - summary.total_zeros,
        "best_epoch": tracker.epoch,
        "best_phase": tracker.phase,
        "epochs": dict(state.phase_epochs),
        "seconds": {**state.phase_seconds, "total": time.perf_counter() - started},
        "replicas": strategy.num_replicas_in_sync,
    }
    if verbose:
        print(f"[dg2pf] done: accuracy {dense_accuracy:.4f} -> {final_accuracy:.4f} at "
              f"{summary.prunable_sparsity:.2%} sparsity (best: epoch {tracker.epoch}, "
              f"{tracker.phase})")
    return RunResult(model=final, history=state.rows, report=report)
