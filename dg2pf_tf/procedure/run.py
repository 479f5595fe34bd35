"""`run()`: the DG2PF procedure on a trained model, and `RunConfig`, the settings that decide its result."""

import dataclasses
import time

import keras
import tensorflow as tf

from dg2pf_tf import checks
from dg2pf_tf.procedure.data import TrainData, as_dataset, task_of
from dg2pf_tf.procedure.phases import Execution, Procedure

_FLOATS = ("sparsity", "floor", "temperature", "alpha", "learning_rate", "weight_decay",
           "finetune_learning_rate")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The settings that decide the result of `run()`, with their defaults.

    Every field is part of a checkpoint's fingerprint: a run resumes only with
    all of them unchanged (how it executes may change: see `run`). `sparsity`
    and `floor` stay None until `resolved()` fills in the structure's defaults,
    so a config made for one structure can be `dataclasses.replace`d into another.

    Attributes:
        sparsity: the target, in [0, 1): the share of prunable weights set to 0,
            or with structure 'channel' of channels (or of the `budget`);
            None: 0.9, and 1 - N/M (its only value) for an N:M pattern.
        pruning_epochs: epochs of the linear schedule (`s_e` in DG2PF).
        scope, floor, structure, budget: as in `dg2pf_tf.prune`: 'global' or
            'layer'; the ERK share each kernel keeps (default 1.0) or, for
            channels, the share of its uniform share each group keeps (default
            0.5); 'unstructured', 'channel' or an N:M pattern such as '2:4'; and
            with channels what `sparsity` counts: 'channels', 'macs' or 'params'.
        task: 'auto', 'categorical', 'binary' or 'regression' (see
            `dg2pf_tf.tasks`); 'auto' reads it from the output activation and
            the labels.
        temperature, alpha: the KD loss (see `Distiller`).
        patience: epochs without a better validation score that end a phase.
        max_epochs: at most this many epochs in each phase after the gradual one.
        seed: makes the run repeatable (weights, shuffling, dropout) on CPU.
        batch_size: batch size of numpy data (global, over all replicas).
        learning_rate, weight_decay, clipnorm: AdamW of the distillation phases
            (3e-3 suits small networks trained with Adam; the paper fine-tunes
            ImageNet networks at 1e-4 to 1e-5).
        finetune_learning_rate: SGD (momentum 0.9) of pruned fine-tuning.
        finetune: False skips pruned fine-tuning; recovery: False prunes hard
            from the first step (ablations).
        mask_update_steps: recompute the masks every this many steps of the
            gradual phase (1: every batch, as in DG2PF); None: once per epoch.
        recalibrate_bn, bn_batches: re-estimate BatchNorm statistics from
            `bn_batches` training batches before each validation ('auto': when
            the model has BatchNorm layers).
        steps_per_epoch: at most this many steps per epoch (None: all batches).

    Raises ValueError (or TypeError) for a bad value, as `prune` would: every
    field but `task` (checked against the data) and `seed` is checked here.
    """

    sparsity: float = None
    pruning_epochs: int = 10
    scope: str = "global"
    floor: float = None
    structure: str = "unstructured"
    budget: str = "channels"
    task: str = "auto"
    temperature: float = 4.0
    alpha: float = 0.75
    patience: int = 4
    max_epochs: int = 30
    seed: int = None
    batch_size: int = 32
    learning_rate: float = 3e-3
    weight_decay: float = 0.004
    clipnorm: float = 0.5
    finetune_learning_rate: float = 1e-3
    finetune: bool = True
    recovery: bool = True
    mask_update_steps: int = 1
    recalibrate_bn: object = "auto"
    bn_batches: int = 50
    steps_per_epoch: int = None

    def __post_init__(self):
        structure = checks.check_structure(self.structure)
        checks.sparsity_for(structure, self.sparsity)
        checks.floor_for(structure, self.floor)
        fixed = {"structure": structure, "finetune": bool(self.finetune), "recovery": bool(self.recovery)}
        for name, value in fixed.items():
            object.__setattr__(self, name, value)
        checks.check_scope(self.scope)
        checks.check_budget(self.budget, structure)
        checks.check_temperature(self.temperature)
        checks.check_alpha(self.alpha)
        for name in ("pruning_epochs", "patience", "max_epochs", "bn_batches"):
            checks.positive_int(name, getattr(self, name))
        for name in ("steps_per_epoch", "mask_update_steps", "batch_size"):
            checks.positive_int(name, getattr(self, name), none_ok=True)
        if self.recalibrate_bn not in ("auto", True, False):
            raise ValueError(f"`recalibrate_bn` must be 'auto', True or False, got {self.recalibrate_bn!r}.")
        for name in ("learning_rate", "finetune_learning_rate") + (("clipnorm",) if self.clipnorm is not None else ()):
            checks.positive_number(name, getattr(self, name))
        checks.positive_number("weight_decay", self.weight_decay, zero_ok=True)
        # Plain Python values: the fingerprint goes through JSON and back.
        for name in _FLOATS + (("clipnorm",) if self.clipnorm is not None else ()):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))

    def resolved(self):
        """This config with `sparsity` and `floor` set to the structure's defaults where None."""
        return dataclasses.replace(self, sparsity=checks.sparsity_for(self.structure, self.sparsity),
                                   floor=checks.floor_for(self.structure, self.floor))


def run(model, train_data, validation_data, config=None, *, teacher=None, exclude=None, strategy=None,
        callbacks=None, verbose="auto", backup_dir=None, steps_per_execution=1, jit_compile=False, **settings):
    """Prunes a trained model with DG2PF and returns a `RunResult`.

    Distilled gradual pruning to the target sparsity, distillation until the
    validation score plateaus (twice: with, then without the teacher), then
    pruned fine-tuning until it plateaus again; the best state at the target
    sparsity wins (`procedure.phases`). `model` is never modified. Training
    runs in a loop of dg2pf_tf's own under `strategy` (multi-worker included).

    Args:
        model: a trained single-output Keras model (Sequential, Functional or
            subclassed; one or several inputs): a classifier, a binary or
            multi-label model, or a regression model.
        train_data, validation_data: batched `tf.data.Dataset`s of `(inputs,
            labels)`, or `(x, y)` numpy pairs (x an array, a list or a dict of
            arrays); `train_data` may also be a function `epoch -> Dataset`.
        config: a `RunConfig`; `**settings` (its fields by name, such as
            `sparsity=0.95, structure="channel"`) override it.
        teacher: the model to distil from (a frozen copy; default `model`), of
            the model's input and output shapes.
        exclude: layers to keep dense, as in `dg2pf_tf.prune`.
        strategy, callbacks, verbose, backup_dir, steps_per_execution,
            jit_compile: how the run executes, free to change when it resumes:
            a `tf.distribute.Strategy` (default the surrounding one); Keras
            callbacks for every phase; 0 silent, 1 progress bars, 2 a line per
            epoch ('auto': 1); a directory the state is saved to after every
            epoch (atomically, by the chief; calling `run` again resumes from
            it and ends as an uninterrupted run would); training steps per
            compiled call; XLA for each training step.

    Raises:
        TypeError: a keyword that is neither a `RunConfig` field nor an argument.
        ValueError/TypeError: bad settings or data (see `RunConfig`, `prune`,
            `Distiller` and `procedure.data`), several outputs, a teacher that
            does not fit, no validation data.
        checkpoint.CheckpointError: `backup_dir` holds a corrupt checkpoint,
            one of another run, or one whose sparsity invariant is broken.
        loop.NonFiniteLoss: the loss became NaN or infinite.
    """
    started = time.perf_counter()
    config = _config(config, settings)
    checks.positive_int("steps_per_execution", steps_per_execution)
    if teacher is not None:
        checks.fitting_teacher(model, teacher)
    if validation_data is None:
        raise ValueError("run() needs `validation_data`: DG2PF ends its phases when the validation "
                         "score stops improving. Hold out part of the training set.")
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
    train = TrainData(train_data, config.batch_size, config.seed)
    val = as_dataset(validation_data, config.batch_size, name="validation_data")
    meaning = task_of(model, train, val, config.task)
    execution = Execution(strategy or tf.distribute.get_strategy(), list(callbacks or []),
                          1 if verbose == "auto" else int(verbose), steps_per_execution, bool(jit_compile),
                          backup_dir)
    return Procedure(model, teacher, exclude, config.resolved(), meaning, train, val, execution).run(started)


def _config(config, settings):
    """`config` (default `RunConfig()`) with `settings` by name. Raises TypeError for
    an unknown name or a `config` that is no `RunConfig`."""
    if config is not None and not isinstance(config, RunConfig):
        raise TypeError(f"`config` must be a dg2pf_tf.RunConfig, got {type(config).__name__}.")
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise TypeError(f"run() got unexpected keyword arguments {unknown}. Its settings are the fields "
                        f"of dg2pf_tf.RunConfig: {', '.join(sorted(fields))}.")
    return RunConfig(**settings) if config is None else dataclasses.replace(config, **settings)
