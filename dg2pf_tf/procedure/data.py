"""Training and validation data for `run()`: batching, per-epoch order, and checks.

Inputs may be one array, a list/tuple of arrays (a multi-input model) or a
dict of arrays keyed by input name; datasets yield `(inputs, labels)` pairs of
the same structures.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from dg2pf_tf.procedure import tasks


def _leaves(x):
    return keras.tree.flatten(x)


def arrays(data, name):
    """`(x, y)` numpy arrays (x a structure of them) from an `(x, y)` tuple;
    float64 inputs become float32.

    Raises:
        TypeError: `data` is not an `(x, y)` pair.
        ValueError: inputs and labels differ in length, or the data is empty.
    """
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(
            f"`{name}` must be a batched tf.data.Dataset or an (x, y) pair (x an array, a "
            f"list of arrays or a dict of arrays), got {type(data).__name__}"
            f"{f' of length {len(data)}' if isinstance(data, (tuple, list)) else ''}.")
    x = keras.tree.map_structure(
        lambda a: (lambda v: v.astype(np.float32) if v.dtype == np.float64 else v)(np.asarray(a)),
        data[0])
    if isinstance(x, list):  # tf.data reads a list as one tensor to stack, a tuple as inputs
        x = tuple(x)
    y = np.asarray(data[1])
    lengths = {len(leaf) for leaf in _leaves(x)}
    if len(lengths) > 1:
        raise ValueError(f"`{name}`: the input arrays differ in length ({sorted(lengths)} examples).")
    count = lengths.pop() if lengths else 0
    if y.ndim == 0 or count != len(y):
        raise ValueError(f"`{name}`: the inputs hold {count} examples but the labels "
                         f"{len(y) if y.ndim else 'a single value'}.")
    if count == 0:
        raise ValueError(f"`{name}` is empty.")
    return x, y


def as_dataset(data, batch_size, *, name="data"):
    """A batched `tf.data.Dataset` from a dataset or an `(x, y)` tuple of arrays.

    Raises TypeError or ValueError as `arrays` does.
    """
    if isinstance(data, tf.data.Dataset):
        return data
    return tf.data.Dataset.from_tensor_slices(arrays(data, name)).batch(batch_size).prefetch(
        tf.data.AUTOTUNE)


class TrainData:
    """Training batches for each epoch.

    `(x, y)` arrays are shuffled with a generator seeded by `(seed, epoch)`,
    so epoch k sees the same order in a resumed run as in an uninterrupted
    one. A function `epoch -> tf.data.Dataset` is called each epoch; a
    `tf.data.Dataset` is used as given every epoch.
    """

    def __init__(self, data, batch_size, seed, name="train_data"):
        self.seed = 0 if seed is None else int(seed)
        self.batch_size = batch_size
        self.arrays = self.function = None
        if isinstance(data, tf.data.Dataset):
            self.function = lambda epoch: data
        elif callable(data):
            self.function = data
        else:
            self.arrays = arrays(data, name)

    def for_epoch(self, epoch):
        if self.function is not None:
            dataset = self.function(epoch)
            if not isinstance(dataset, tf.data.Dataset):
                raise TypeError(f"`train_data({epoch})` returned {type(dataset).__name__}, "
                                f"not a batched tf.data.Dataset.")
            return dataset
        x, y = self.arrays
        order = np.random.default_rng([self.seed, epoch]).permutation(len(y))
        shuffled = keras.tree.map_structure(lambda a: a[order], x)
        return (tf.data.Dataset.from_tensor_slices((shuffled, y[order]))
                .batch(self.batch_size).prefetch(tf.data.AUTOTUNE))


def first_batch(data, name):
    """`(x, y)` of the first batch of `data` (a `TrainData` or a dataset), as numpy.

    Raises ValueError if it yields no batch or not `(inputs, labels)` pairs.
    """
    if isinstance(data, TrainData) and data.arrays is not None:
        x, y = data.arrays
        return keras.tree.map_structure(lambda a: a[:data.batch_size], x), y[:data.batch_size]
    dataset = data.for_epoch(0) if isinstance(data, TrainData) else data
    for batch in dataset.take(1):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(
                f"`{name}` must yield (inputs, labels) pairs; it yields "
                f"{type(batch).__name__}. Map it: `dataset.map(lambda d: (d['image'], d['label']))`.")
        return keras.tree.map_structure(np.asarray, batch[0]), np.asarray(batch[1])
    raise ValueError(f"`{name}` is empty: it yielded no batch.")


def check_inputs(model, x, name):
    """Refuses inputs that do not fit `model`'s declared inputs, or that hold NaN/inf.

    Raises ValueError naming `name` and what to change.
    """
    declared = getattr(model, "input", None) if getattr(model, "inputs", None) else None
    if declared is not None:
        _check_structure(model, declared, x, name)
    bad = sum(int(np.size(a) - np.count_nonzero(np.isfinite(a)))
              for a in _leaves(x) if np.issubdtype(a.dtype, np.floating))
    if bad:
        raise ValueError(f"`{name}`: {bad} input values are NaN or infinite.")


def _check_structure(model, declared, x, name):
    if isinstance(declared, dict):
        if not isinstance(x, dict) or set(x) != set(declared):
            got = sorted(x) if isinstance(x, dict) else type(x).__name__
            raise ValueError(f"`{name}`: model '{model.name}' takes a dict of inputs "
                             f"{sorted(declared)}, the data gives {got}.")
        pairs = [(key, declared[key], x[key]) for key in sorted(declared)]
    else:
        specs, given = _leaves(declared), _leaves(x)
        if len(specs) != len(given):
            raise ValueError(f"`{name}`: model '{model.name}' takes {len(specs)} inputs, the "
                             f"data gives {len(given)}. Pass them as a list in the model's order.")
        pairs = [(spec.name, spec, value) for spec, value in zip(specs, given)]
    for key, spec, value in pairs:
        expected, got = tuple(spec.shape[1:]), tuple(value.shape[1:])
        if len(got) != len(expected) or any(e is not None and e != g for e, g in zip(expected, got)):
            raise ValueError(
                f"`{name}`: input '{key}' has examples of shape {got} but model '{model.name}' "
                f"takes {expected}. Resize or reshape the inputs (and batch a dataset).")


@dataclasses.dataclass(frozen=True)
class Output:
    """What a model's output means: its `tasks.Task`, whether it gives `probabilities`
    (not logits), and how many values it gives per example (`width`)."""

    task: tasks.Task
    probabilities: bool
    width: int


def task_of(model, train, val, task="auto"):
    """The `Output` of `model` on `train`/`val` (`TrainData`, dataset): what its
    output means, whether it gives probabilities, and how many values it gives
    per example; the first batch of each checked against the model and the task.

    Raises ValueError naming the data that cannot train `model`, or a bad `task`.
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
    return Output(task, probabilities, width)
