"""`run()`: the DG2PF procedure on a trained model."""

import dataclasses
import sys
import time

import keras
import tensorflow as tf

from dg2pf_tf import checks
from dg2pf_tf.procedure.batchnorm import batchnorm_layers
from dg2pf_tf.procedure.config import RunConfig
from dg2pf_tf.procedure.data import TrainData, as_dataset, task_of
from dg2pf_tf.procedure.runner import Data, Execution, Models, Procedure


def run(model, train_data, validation_data, config=None, *, teacher=None, exclude=None, strategy=None,
        callbacks=None, verbose="auto", backup_dir=None, steps_per_execution=1, jit_compile=False, **settings):
    """Prunes a trained model with DG2PF and returns a `RunResult`.

    Distilled gradual pruning to the target sparsity, distillation until the
    validation score plateaus (twice: with, then without the teacher), then
    with `finetune=True` pruned fine-tuning until it plateaus again; the best state at the target
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
            epoch ('auto': 1 on a terminal, else 2); a directory the state is saved to after every
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
    verbosity = _verbosity(verbose)
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
    output = task_of(model, train, val, config.task)
    # Every 'auto' and default resolved here, once: the checkpoint's fingerprint records them.
    config = config.resolved(task=output.task.name, batchnorm=bool(batchnorm_layers(model)))
    strategy = strategy or tf.distribute.get_strategy()
    execution = Execution(strategy, list(callbacks or []), verbosity, steps_per_execution,
                          bool(jit_compile), backup_dir)
    models = Models.prepare(model, teacher, exclude, config, strategy)
    return Procedure(models, Data(train, val, output), config, execution).run(started)


def _verbosity(verbose):
    """`verbose` as 0, 1 or 2; 'auto' is 1 (progress bars) on a terminal and 2 (a line per
    epoch) otherwise, so that a log file gets no bar redrawn in it."""
    if verbose == "auto":
        return 1 if sys.stdout.isatty() else 2
    if verbose not in (0, 1, 2):
        raise ValueError(f"`verbose` must be 'auto', 0, 1 or 2, got {verbose!r}.")
    return int(verbose)


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
