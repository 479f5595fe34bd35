"""Flags of train.py: `define_flags()` defines and validates them; nothing else."""

import os
import re

from absl import flags

from zoo.data import DATASETS, PREPROCESSING
from zoo.models import MODELS

DISTRIBUTIONS = ("auto", "none", "mirrored", "multi_worker")


def define_flags():
    """Defines train.py's flags with validators (bad values fail before any work)."""
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
    flags.DEFINE_float("sparsity", None, "Target fraction of zeros over prunable weights, in [0, 1) "
                       "(default 0.95; with an N:M --structure, 1 - N/M).")
    flags.DEFINE_integer("pruning_epochs", 10, "Epochs of the linear schedule.", lower_bound=1)
    flags.DEFINE_float("temperature", 4.0, "KD temperature.")
    flags.DEFINE_float("alpha", 0.75, "Weight of the KD term, in [0, 1].")
    flags.DEFINE_integer("patience", 4, "Epochs without improvement that end a phase.", lower_bound=1)
    flags.DEFINE_integer("max_epochs", 30, "Epochs at most per plateau-ended phase.", lower_bound=1)
    flags.DEFINE_enum("scope", "global", ("global", "layer"), "Sparsity allocation.")
    flags.DEFINE_float("floor", None, "Share of its Erdos-Renyi-kernel allocation each kernel keeps (0: pure "
                       "global magnitude; default 1.0), or with --structure=channel, of its uniform "
                       "share each channel group keeps (default 0.5).")
    flags.DEFINE_string("structure", "unstructured",
                        "What pruning removes: 'unstructured' (single weights), 'channel' (whole "
                        "channels: --sparsity is their share, and pruned.keras and the export are "
                        "the shrunk model), or an N:M pattern such as '2:4' (at most N nonzeros in "
                        "every M inputs, checked in the export).")
    flags.DEFINE_enum("budget", "channels", ("channels", "macs", "params"),
                      "With --structure=channel, what --sparsity is a share of: channels, the "
                      "model's multiply-accumulates (a faster model) or its parameters.")
    flags.DEFINE_float("learning_rate", 3e-3, "AdamW learning rate of the distillation phases.")
    flags.DEFINE_float("finetune_learning_rate", 1e-3, "SGD learning rate of pruned fine-tuning.")
    flags.DEFINE_float("dense_learning_rate", 3e-3, "Adam learning rate of dense training.")
    flags.DEFINE_integer("dense_epochs", 40, "Epochs of dense training when no --weights.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 32, "Global batch size.", lower_bound=1)
    flags.DEFINE_integer("steps_per_epoch", None,
                         "Training steps per epoch (default: one pass over the training split); "
                         "for smoke runs and epochs defined by steps.", lower_bound=1)
    flags.DEFINE_integer("steps_per_execution", 1,
                         "Training steps per compiled call, as in Keras' compile(): fewer waits "
                         "for the device.", lower_bound=1)
    flags.DEFINE_bool("jit_compile", False, "Compile the training steps with XLA.")
    flags.DEFINE_integer("seed", 0, "Random seed.")
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

    flags.register_validator("sparsity", lambda v: v is None or 0.0 <= v < 1.0,
                             message="--sparsity must be in [0, 1) (0.95 keeps 5% of the weights).")
    flags.register_validator(
        "structure", lambda v: v in ("unstructured", "channel") or re.fullmatch(r"\d+:\d+", v),
        message="--structure must be 'unstructured', 'channel' or N:M such as '2:4'.")
    flags.register_multi_flags_validator(
        ["budget", "structure"], lambda f: f["budget"] == "channels" or f["structure"] == "channel",
        message="--budget=macs or params needs --structure=channel (it allocates whole channels).")
    flags.register_multi_flags_validator(
        ["preprocessing", "dataset"], lambda f: f["preprocessing"] in ("auto", "mean_std") or f["dataset"] != "digits",
        message="--preprocessing applies to image data sets (cifar10, cifar100, imagenet2012); "
                "digits are scaled to [0, 1].")
    flags.register_validator("alpha", lambda v: 0.0 <= v <= 1.0, message="--alpha must be in [0, 1].")
    flags.register_validator("temperature", lambda v: v > 0, message="--temperature must be > 0.")
    flags.register_validator("floor", lambda v: v is None or 0.0 <= v <= 1.0,
                             message="--floor must be in [0, 1].")
    for name in ("learning_rate", "finetune_learning_rate", "dense_learning_rate"):
        flags.register_validator(name, lambda v: v > 0, message=f"--{name} must be > 0.")
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
