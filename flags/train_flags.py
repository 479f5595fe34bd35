"""Flags of train.py: `define_flags()` defines them; `run_config()` reads the run's settings once.

The settings of the DG2PF run are `dg2pf_tf.RunConfig`'s fields: one flag each,
made from the field (its name, type, default and help), and checked by
`RunConfig` itself, so a new setting is one edit there. The other flags say
what to train on, how to execute and what to write.
"""

import dataclasses
import os
import typing

from absl import flags

import dg2pf_tf
from zoo.data import DATASETS, PREPROCESSING
from zoo.models import MODELS

DISTRIBUTIONS = ("auto", "none", "mirrored", "multi_worker")
# Where the command line's default differs from RunConfig's, and why: a command
# is repeatable by default (the library leaves the seed to the caller).
_COMMAND_LINE_DEFAULTS = {"seed": 0}


class _SettingParser(flags.ArgumentParser):
    """Parses a RunConfig field's value: a number, a bool, or text; 'none' is None
    for the fields that take it, 'true'/'false' are bools for those that take both."""

    def __init__(self, hint):
        self.hint = hint
        self.syntactic_help = ""

    def parse(self, argument):
        if not isinstance(argument, str):
            return argument
        text = argument.strip()
        options = typing.get_args(self.hint) or (self.hint,)
        if type(None) in options and text.lower() == "none":
            return None
        if bool in options and text.lower() in ("true", "false"):
            return text.lower() == "true"
        for kind in (int, float):
            if kind in options:
                try:
                    return kind(text)
                except ValueError:
                    if str not in options and len(options) <= 2:
                        raise ValueError(f"expected {kind.__name__}, got {argument!r}") from None
        return text

    def flag_type(self):
        return "setting"


def _define_setting(field, hints):
    default = _COMMAND_LINE_DEFAULTS.get(field.name, field.default)
    if hints[field.name] is bool:
        flags.DEFINE_bool(field.name, default, dg2pf_tf.RunConfig.help(field.name))
    else:
        flags.DEFINE(_SettingParser(hints[field.name]), field.name, default,
                     dg2pf_tf.RunConfig.help(field.name), serializer=flags.ArgumentSerializer())


def run_config(values=None):
    """The `RunConfig` the flags give (`values`: absl's parsed flags, default FLAGS).

    Raises ValueError naming the flag whose value RunConfig refuses.
    """
    values = values or flags.FLAGS
    given = {f.name: values[f.name].value for f in dataclasses.fields(dg2pf_tf.RunConfig)}
    try:
        return dg2pf_tf.RunConfig(**given)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{_blamed(values, given, str(error))}: {error}") from None


def _blamed(values, given, message):
    """The flags an error names, those given on the command line first."""
    named = [name for name in given if f"`{name}" in message or f"{name}=" in message]
    chosen = [name for name in named if values[name].present] or named
    return ", ".join(f"--{name}={given[name]}" for name in chosen) or "the flags"


def define_flags():
    """Defines train.py's flags: one per `RunConfig` field, and those of data, model,
    execution and outputs (with validators: bad values fail before any work)."""
    hints = typing.get_type_hints(dg2pf_tf.RunConfig)
    for field in dataclasses.fields(dg2pf_tf.RunConfig):
        _define_setting(field, hints)
    flags.DEFINE_enum("model", "small_cnn", MODELS, "Network to prune.")
    flags.DEFINE_string(
        "weights", None,
        "Trained dense model: a .keras file, a .weights.h5 file for --model, or "
        "'imagenet' (keras.applications weights, needs the internet). Default: "
        "train --model densely first.")
    flags.DEFINE_string(
        "teacher", None,
        "Model to distil from, a .keras file (default: the --weights model). Channels, then "
        "zeros: --weights=<first run>/pruned.keras --teacher=<first run>/dense.keras.")
    flags.DEFINE_enum("dataset", "digits", DATASETS, "Data set.")
    flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
    flags.DEFINE_enum("preprocessing", "auto", ("auto", *PREPROCESSING),
                      "How pixels become inputs: auto (with --weights=imagenet the keras.applications "
                      "preprocess_input of --model's family: caffe for resnet50 and vgg16, tf for "
                      "mobilenet_v2; else mean_std), mean_std (the data set's mean and standard "
                      "deviation), or a keras.applications mode: caffe, tf, torch. Images only.")
    flags.DEFINE_integer("image_size", None, "ImageNet crop size (default 224).", lower_bound=32)
    flags.DEFINE_float("dense_learning_rate", 3e-3, "Adam learning rate of dense training.")
    flags.DEFINE_integer("dense_epochs", 40, "Epochs of dense training when no --weights.", lower_bound=1)
    flags.DEFINE_integer("steps_per_execution", 1,
                         "Training steps per compiled call, as in Keras' compile(): fewer waits "
                         "for the device.", lower_bound=1)
    flags.DEFINE_bool("jit_compile", False, "Compile the training steps with XLA.")
    flags.DEFINE_enum("distribution", "auto", DISTRIBUTIONS,
                      "auto: MirroredStrategy over GPUs when more than one; multi_worker reads TF_CONFIG.")
    flags.DEFINE_bool("mixed_precision", False, "mixed_float16 policy (GPUs).")
    flags.DEFINE_string("output_dir", "runs/default", "Where the models, report and plots go.")
    flags.DEFINE_bool("overwrite", False,
                      "Start over in --output_dir (by default an unfinished run there resumes "
                      "and a finished one is left as it is).")
    flags.DEFINE_bool("tflite", True, "Also export a LiteRT .tflite file with sparse weights.")
    flags.DEFINE_enum("quantize", "none", ("none", "dynamic", "int8"),
                      "Also export an int8 .tflite (int8: full-integer, calibrated on training batches).")
    _validators()


def _validators():
    flags.register_multi_flags_validator(
        ["preprocessing", "dataset"], lambda f: f["preprocessing"] in ("auto", "mean_std") or f["dataset"] != "digits",
        message="--preprocessing applies to image data sets (cifar10, cifar100, imagenet2012); "
                "digits are scaled to [0, 1].")
    flags.register_validator("dense_learning_rate", lambda v: v > 0, message="--dense_learning_rate must be > 0.")
    flags.register_validator(
        "weights",
        lambda v: v is None or v == "imagenet" or os.path.isfile(v),
        message="--weights must be 'imagenet' or an existing .keras/.weights.h5 file.")
    flags.register_validator(
        "teacher", lambda v: v is None or (v.endswith(".keras") and os.path.isfile(v)),
        message="--teacher must be an existing .keras file.")
    flags.register_validator(
        "distribution",
        lambda v: v != "multi_worker" or bool(os.environ.get("TF_CONFIG")),
        message="--distribution=multi_worker needs the TF_CONFIG environment variable.")
