"""Sparsity schedules: how much of the network is pruned at each point of training.

A schedule maps a training position `t`, in epochs since training began
(fractional when masks are updated every few steps), to a sparsity level. It
prunes during the window `[begin_epoch, end_epoch)`; afterwards the mask is
final. All schedules reach their target at the start of their last pruning
epoch, so epoch-level and step-level updates end at the same place.
"""

import dataclasses
import math

import keras
import tensorflow as tf

from dg2pf_tf import checks
from dg2pf_tf.checks import check_begin, check_sparsity

_PACKAGE = "dg2pf_tf"


@dataclasses.dataclass(frozen=True)
class UpdateTiming:
    """When masks are recomputed within an epoch: before every `every_n_steps`-th
    step (0, n, 2n, ...), or with None before its first step only. The schedule is
    read at the fractional epoch of that step. `UpdateMasks` (on the host) and
    the training loop of `run()` (inside the compiled step) both follow it.

    Raises ValueError unless `every_n_steps` is None or an int >= 1.
    """

    every_n_steps: int | None = None

    def __post_init__(self):
        checks.positive_int("every_n_steps", self.every_n_steps, none_ok=True)

    def due(self, step):
        """Whether masks are recomputed before step `step` (0-based, a Python int or an
        integer tensor) of an epoch."""
        every = self.every_n_steps
        return step == 0 if every is None else step % every == 0


class Schedule:
    """Base class: subclasses define `_level(progress)` for progress in (0, 1]."""

    def __init__(self, sparsity, epochs, begin_epoch=0):
        self.sparsity = check_sparsity(sparsity)
        self.epochs = checks.positive_int("pruning_epochs", epochs)
        self.begin_epoch = check_begin(begin_epoch)

    @property
    def end_epoch(self):
        """First epoch after the pruning window: from here on the mask is final."""
        return self.begin_epoch + self.epochs

    def is_active(self, t):
        """Whether masks are still updated at position `t` (in epochs)."""
        return self.begin_epoch <= t < self.end_epoch

    def __call__(self, t):
        """The sparsity level at position `t` (epochs since training began)."""
        if t < self.begin_epoch:
            return 0.0
        progress = min((t - self.begin_epoch + 1.0) / self.epochs, 1.0)
        return float(self._level(progress))

    def _level(self, progress):
        raise NotImplementedError

    def is_active_tensor(self, t):
        """`is_active` for a float64 tensor `t`, inside compiled code."""
        return (t >= float(self.begin_epoch)) & (t < float(self.end_epoch))

    def level_tensor(self, t):
        """`self(t)` for a float64 tensor `t`: the same float64 operations, so the
        same level as the Python call at the same position."""
        progress = tf.minimum((t - float(self.begin_epoch) + 1.0) / float(self.epochs), 1.0)
        level = tf.cast(self._level(progress), tf.float64)
        return tf.where(t < float(self.begin_epoch), tf.constant(0.0, tf.float64), level)

    def get_config(self):
        return {
            "sparsity": self.sparsity,
            "epochs": self.epochs,
            "begin_epoch": self.begin_epoch,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Linear(Schedule):
    """The DG2PF schedule: level `sparsity * i / epochs` in pruning epoch i = 1..epochs.

    Args:
        sparsity: final fraction of prunable weights set to zero, in [0, 1).
        epochs: number of pruning epochs (`s_e` in the paper).
        begin_epoch: epoch at which pruning starts.
    """

    def _level(self, progress):
        return self.sparsity * progress


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Polynomial(Schedule):
    """Zhu & Gupta's cubic schedule (the one tfmot's `PolynomialDecay` uses).

    Level `s + (s0 - s) * (1 - i / epochs) ** power` in pruning epoch i: fast
    early, slow near the target.

    Args:
        sparsity: final fraction of prunable weights set to zero, in [0, 1).
        epochs: number of pruning epochs.
        initial_sparsity: level before pruning starts (`s0`).
        power: exponent of the decay (3 in the paper by Zhu & Gupta).
        begin_epoch: epoch at which pruning starts.
    """

    def __init__(self, sparsity, epochs, initial_sparsity=0.0, power=3.0, begin_epoch=0):
        super().__init__(sparsity, epochs, begin_epoch)
        self.initial_sparsity = check_sparsity(initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.sparsity:
            raise ValueError(
                f"`initial_sparsity` ({initial_sparsity}) must not exceed "
                f"`sparsity` ({sparsity})."
            )
        if not (isinstance(power, (int, float)) and math.isfinite(power) and power > 0):
            raise ValueError(f"`power` must be a positive number, got {power!r}.")
        self.power = float(power)

    def _level(self, progress):
        span = self.initial_sparsity - self.sparsity
        return self.sparsity + span * (1.0 - progress) ** self.power

    def get_config(self):
        return {
            **super().get_config(),
            "initial_sparsity": self.initial_sparsity,
            "power": self.power,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Constant(Schedule):
    """One-shot pruning: the full `sparsity` from `begin_epoch` on.

    The mask is recomputed at every update during the `epochs` window (default
    one epoch), so with weight recovery the pruned set can still change.
    """

    def __init__(self, sparsity, epochs=1, begin_epoch=0):
        super().__init__(sparsity, epochs, begin_epoch)

    def _level(self, progress):
        return self.sparsity


def serialize(schedule):
    """A JSON-friendly dict for `schedule` (or None)."""
    if schedule is None:
        return None
    return keras.saving.serialize_keras_object(schedule)


def deserialize(config):
    """The schedule `serialize` described; accepts a Schedule or None as is."""
    if config is None or isinstance(config, Schedule):
        return config
    schedule = keras.saving.deserialize_keras_object(config)
    if not isinstance(schedule, Schedule):
        raise TypeError(f"Expected a dg2pf_tf schedule config, got {config!r}.")
    return schedule
