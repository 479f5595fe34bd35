"""`RunConfig`: the settings that decide the result of `run()`, their defaults, help and checks.

Each field carries its help text (`metadata["help"]`): the class docstring,
`train.py`'s flags and docs/command_line.md are all made from the fields, so a
new setting is one edit here.
"""

import dataclasses
import typing

from dg2pf_tf import checks, settings
from dg2pf_tf.core import schedules
from dg2pf_tf.procedure import tasks


def _setting(default, help_text):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The settings that decide the result of `run()`, with their defaults.

    Every field is part of a checkpoint's fingerprint: a run resumes only with
    all of them unchanged (how it executes may change: see `run`). `sparsity`
    and `floor` stay None until `resolved()` fills in the structure's defaults,
    so a config made for one structure can be `dataclasses.replace`d into
    another. `structure` and `budget` are parsed into `settings` types (strings
    are accepted).

    Raises ValueError (or TypeError) for a bad value, as `prune` would: every
    field but `seed` is checked here (`task` again against the data, by `run`).
    """

    sparsity: float | None = _setting(
        None, "The target, in [0, 1): the share of prunable weights set to 0, or with structure "
              "'channel' of channels (or of the budget). Default 0.9; 1 - N/M, its only value, "
              "for an N:M pattern.")
    pruning_epochs: int = _setting(
        20, "Epochs of the gradual schedule (s_e in DG2PF). 20: on digits at 99% they lost 1.61 "
            "points where 10 lost 2.28, and no less at 95-98% (docs/pruning.md).")
    schedule_power: float = _setting(
        3.0, "Shape of the gradual schedule: after a share p of the pruning epochs the level is "
             "sparsity * (1 - (1 - p) ** power). 1 is DG2PF's linear schedule; 3 (Zhu and Gupta's, "
             "tfmot's, the default) prunes fastest early, while the network has the most to spare, "
             "and slowly near the target, which matters most at 98-99% (docs/pruning.md).")
    scope: str = _setting("global", "'global' (one magnitude ranking over every pruned weight) or "
                                    "'layer' (each weight pruned to the same level).")
    floor: float | None = _setting(
        None, "The share of its Erdos-Renyi-kernel allocation each kernel keeps (default 1.0; 0 is "
              "pure global magnitude), or with structure 'channel' the share of its uniform share "
              "each channel group keeps (default 0.5; 0 lets the groups inside residual branches go "
              "whole, and their blocks with them).")
    structure: settings.Structure = _setting(
        "unstructured", "What pruning removes: 'unstructured' (single weights), 'channel' (whole "
                        "channels, and the result is the smaller model) or an N:M pattern such "
                        "as '2:4'.")
    budget: settings.Budget = _setting(
        "channels", "With structure 'channel', what sparsity is a share of: 'channels', 'macs' "
                    "(the multiply-accumulates), 'params' (the parameters) or 'latency' (measured "
                    "on this machine: see runtime).")
    runtime: str | None = _setting(
        None, "With budget 'latency': the runtime the latency is measured in, 'keras' (the default) "
              "or 'litert'.")
    latency_batch_size: int | None = _setting(
        None, "With budget 'latency': the batch size it is measured at (default 32 in Keras, 1 in LiteRT).")
    latency_threads: int | None = _setting(
        None, "With budget 'latency' and runtime 'litert': the interpreter's threads (default: its own).")
    task: str = _setting("auto", "What the output means: 'auto' (read from the output activation "
                                 "and the labels), 'categorical', 'binary' or 'regression'.")
    temperature: float = _setting(4.0, "Temperature of the distillation loss.")
    alpha: float = _setting(0.75, "Weight of the distillation term, in [0, 1].")
    patience: int = _setting(4, "Epochs without a better validation score that end a phase.")
    max_epochs: int = _setting(30, "Epochs at most in each phase after the gradual one.")
    seed: int | None = _setting(None, "Makes the run repeatable (weights, shuffling, "
                                                "dropout) on CPU.")
    batch_size: int = _setting(32, "Batch size of numpy data (global, over all replicas).")
    learning_rate: float = _setting(3e-3, "AdamW learning rate of the distillation phases (3e-3 suits "
                                          "small networks trained with Adam; the paper fine-tunes "
                                          "ImageNet networks at 1e-4 to 1e-5).")
    weight_decay: float = _setting(0.004, "AdamW weight decay of the distillation phases.")
    clipnorm: float | None = _setting(0.5, "Gradient-norm clipping of the distillation phases "
                                                     "(None: none).")
    finetune_learning_rate: float = _setting(1e-3, "SGD (momentum 0.9) learning rate of pruned fine-tuning.")
    finetune: bool = _setting(
        False, "Pruned fine-tuning after distillation (DG2PF's last phase; SGD on the survivors). "
               "Off by default: at 98-99% on digits and MNIST it moved accuracy by less than a "
               "tenth of a point and took a quarter to a third of the epochs (docs/pruning.md).")
    distill_while_pruning: bool = _setting(
        True, "Distil at every step of the gradual phase, DG2PF's multi-step distillation (False: the "
              "teacher only once the target is reached, prune then distil).")
    recovery: bool = _setting(True, "Simulated pruning with weight recovery in the gradual phase (False "
                                    "prunes hard from the first step).")
    mask_update_steps: int | None = _setting(
        1, "Recompute the masks every this many steps of the gradual phase (1: every batch, as in "
           "DG2PF; None: once per epoch).")
    recalibrate_bn: bool | str = _setting(
        "auto", "Re-estimate BatchNorm statistics before each validation ('auto': when the model "
                "has BatchNorm layers).")
    bn_batches: int = _setting(50, "Training batches the BatchNorm statistics are re-estimated from.")
    steps_per_epoch: int | None = _setting(None, "At most this many steps per epoch (None: "
                                                           "all batches).")

    def __post_init__(self):
        structure = settings.structure(self.structure)
        budget = _with_latency_fields(settings.budget(self.budget, structure), self)
        fixed = {"structure": structure, "budget": budget, **_latency_fields(budget),
                 "finetune": bool(self.finetune), "recovery": bool(self.recovery),
                 "distill_while_pruning": bool(self.distill_while_pruning), **_as_floats(self)}
        for name, value in fixed.items():
            object.__setattr__(self, name, value)
        structure.sparsity(self.sparsity)
        structure.floor(self.floor)
        checks.check_scope(self.scope)
        checks.check_temperature(self.temperature)
        checks.check_alpha(self.alpha)
        for name in ("pruning_epochs", "patience", "max_epochs", "bn_batches"):
            checks.positive_int(name, getattr(self, name))
        for name in ("steps_per_epoch", "mask_update_steps", "batch_size"):
            checks.positive_int(name, getattr(self, name), none_ok=True)
        if self.recalibrate_bn not in ("auto", True, False):
            raise ValueError(f"`recalibrate_bn` must be 'auto', True or False, got {self.recalibrate_bn!r}.")
        if self.task != "auto":
            tasks.get(self.task)
        for name in ("learning_rate", "finetune_learning_rate", "schedule_power") + (
                ("clipnorm",) if self.clipnorm is not None else ()):
            checks.positive_number(name, getattr(self, name))
        checks.positive_number("weight_decay", self.weight_decay, zero_ok=True)

    def resolved(self, *, task=None, batchnorm=None):
        """This config with every 'auto' and None that has a default filled in:
        `sparsity` and `floor` (the structure's defaults), `task` (the name of the
        `tasks.Task` found, if given) and `recalibrate_bn` ('auto' is whether the
        model has BatchNorm layers, if `batchnorm` is given)."""
        filled = {"sparsity": self.structure.sparsity(self.sparsity), "floor": self.structure.floor(self.floor)}
        if task is not None:
            filled["task"] = task
        if batchnorm is not None and self.recalibrate_bn == "auto":
            filled["recalibrate_bn"] = bool(batchnorm)
        return dataclasses.replace(self, **filled)

    def schedule(self):
        """The gradual phase's `schedules.Schedule`: `Linear` at `schedule_power` 1 (DG2PF's),
        else `Polynomial` of that power. Needs a resolved config (`sparsity` set)."""
        if self.schedule_power == 1.0:
            return schedules.Linear(self.sparsity, self.pruning_epochs)
        return schedules.Polynomial(self.sparsity, self.pruning_epochs, power=self.schedule_power)

    @classmethod
    def help(cls, name):
        """The help text of field `name`."""
        return next(f for f in dataclasses.fields(cls) if f.name == name).metadata["help"]

    def to_json(self):
        """Every field as plain JSON values (structure and budget as their strings):
        what a checkpoint's fingerprint records."""
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**plain, "structure": str(self.structure), "budget": self.budget.config()}


def _with_latency_fields(budget, config):
    """`budget` with the latency fields of `config` applied. Raises ValueError where
    they are given with a budget that is not measured."""
    given = {key: value for key, value in (("runtime", config.runtime), ("batch_size", config.latency_batch_size),
                                           ("threads", config.latency_threads)) if value is not None}
    if not given:
        return budget
    if not isinstance(budget, settings.Latency):
        raise ValueError(
            f"`runtime`, `latency_batch_size` and `latency_threads` say how budget='latency' is "
            f"measured; with budget={str(budget)!r} they have no meaning (given: {given}). Use "
            f"budget='latency', or leave them unset.")
    runtime = given.get("runtime", budget.runtime)
    batch = given.get("batch_size", budget.batch_size if runtime == budget.runtime else None)
    return settings.Latency(runtime, batch, given.get("threads", budget.threads), budget.cache_dir,
                            budget.round_to)


def _latency_fields(budget):
    """The latency fields that describe `budget` (None for a budget that is not measured)."""
    if not isinstance(budget, settings.Latency):
        return {}
    return {"runtime": budget.runtime, "latency_batch_size": budget.batch_size, "latency_threads": budget.threads}


def _as_floats(config):
    """The fields typed `float` (or `float | None`) whose values are numbers, as Python
    floats: a fingerprint goes through JSON and back, where 1 and 1.0 differ."""
    hints = typing.get_type_hints(type(config))
    floats = {}
    for field in dataclasses.fields(config):
        value, hint = getattr(config, field.name), hints[field.name]
        if (hint is float or float in typing.get_args(hint)) and isinstance(value, (int, float)) \
                and not isinstance(value, bool):
            floats[field.name] = float(value)
    return floats


RunConfig.__doc__ += "\n    Attributes:\n" + "".join(
    f"        {f.name}: {f.metadata['help']}\n" for f in dataclasses.fields(RunConfig))
