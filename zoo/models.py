"""Model builders: `small_cnn` for 8x8 digits, CIFAR-style and ImageNet networks."""

import keras

MODELS = ("small_cnn", "resnet18", "resnet50", "mobilenet_v2", "vgg16")
# The keras.applications preprocessing mode each family's ImageNet weights were
# trained with (what its `preprocess_input` does): caffe is BGR minus the mean
# pixel, tf scales to [-1, 1].
IMAGENET_PREPROCESSING = {"resnet50": "caffe", "vgg16": "caffe", "mobilenet_v2": "tf"}


def preprocessing_for(name, weights, requested="auto"):
    """How pixels become inputs of model `name` with `weights`: `requested`, or
    for 'auto' the mode its keras.applications ImageNet weights expect, else
    the data set's mean and standard deviation (how this project trains)."""
    if requested != "auto":
        return requested
    return IMAGENET_PREPROCESSING.get(name, "mean_std") if weights == "imagenet" else "mean_std"


def small_cnn(input_shape=(8, 8, 1), classes=10):
    """Three 3x3 convolutions with BatchNorm, global pooling, Dropout, a linear head."""
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    for i, (filters, pool) in enumerate(((32, False), (64, True), (64, False))):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i + 1}")(x)
        x = keras.layers.ReLU(name=f"relu{i + 1}")(x)
        if pool:
            x = keras.layers.MaxPooling2D(name=f"pool{i + 1}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(0.3, name="dropout")(x)
    outputs = keras.layers.Dense(classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def _basic_block(x, filters, stride, name):
    shortcut = x
    y = keras.layers.Conv2D(filters, 3, stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    y = keras.layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = keras.layers.BatchNormalization(name=f"{name}_bn2")(y)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, stride, use_bias=False, name=f"{name}_proj")(x)
        shortcut = keras.layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _stages_and_head(x, widths, classes):
    """Per width a stage of two basic blocks (the first of each later stage at stride 2),
    global pooling and a linear head: the logits."""
    for stage, filters in enumerate(widths):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(x, filters, stride, f"stage{stage + 1}_block{block + 1}")
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.layers.Dense(classes, name="logits")(x)


def resnet18(input_shape=(32, 32, 3), classes=10):
    """ResNet-18 (He et al. 2016). Inputs under 64 px get the CIFAR stem (3x3
    stride 1, no max-pool); larger ones the ImageNet stem (7x7/2 + max-pool)."""
    inputs = keras.Input(input_shape, name="image")
    if input_shape[0] < 64:
        x = keras.layers.Conv2D(64, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    else:
        x = keras.layers.Conv2D(64, 7, 2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    if input_shape[0] >= 64:
        x = keras.layers.MaxPooling2D(3, 2, padding="same", name="stem_pool")(x)
    return keras.Model(inputs, _stages_and_head(x, (64, 128, 256, 512), classes), name="resnet18")


def residual_cnn(input_shape=(28, 28, 1), classes=10, widths=(32, 64, 128)):
    """A small ResNet for MNIST-sized images: a 3x3 stem, then per width a stage of
    two basic blocks (the first of each later stage at stride 2, with a projected
    shortcut), global pooling and a linear head."""
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.Conv2D(widths[0], 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = keras.layers.ReLU(name="stem_relu")(keras.layers.BatchNormalization(name="stem_bn")(x))
    return keras.Model(inputs, _stages_and_head(x, widths, classes), name="residual_cnn")


def _cifar_stem(model, name):
    """`model` (a keras.applications network) with its first convolution
    replaced by a 3x3 stride-1 one, for 32x32 inputs as in the paper's CIFAR runs."""
    config = model.get_config()
    for layer in config["layers"]:
        if layer["class_name"] == "Conv2D" and layer["config"]["name"] == name:
            layer["config"]["kernel_size"] = (3, 3)
            layer["config"]["strides"] = (1, 1)
            layer["config"]["padding"] = "same"
            break
    else:
        raise ValueError(f"{model.name} has no Conv2D named {name!r}.")
    return keras.Model.from_config(config)


def build(name, input_shape, classes, weights=None):
    """Builds model `name` (one of `MODELS`) for `input_shape` and `classes`.

    `weights='imagenet'` loads keras.applications weights (needs the internet,
    224x224x3 inputs and 1000 classes). Raises ValueError for an unknown
    name or weights the model cannot take.
    """
    if name not in MODELS:
        raise ValueError(f"--model={name!r} is not one of {', '.join(MODELS)}.")
    if weights not in (None, "imagenet"):
        raise ValueError(f"weights must be None or 'imagenet', got {weights!r}.")
    if name == "small_cnn":
        if weights:
            raise ValueError("small_cnn has no imagenet weights; pass a trained .keras file.")
        return small_cnn(input_shape, classes)
    if name == "resnet18":
        if weights:
            raise ValueError("keras.applications has no ResNet-18; pass a trained .keras file.")
        return resnet18(input_shape, classes)
    apps = {
        "resnet50": (keras.applications.ResNet50, "conv1_conv"),
        "mobilenet_v2": (keras.applications.MobileNetV2, "Conv1"),
        "vgg16": (keras.applications.VGG16, None),
    }
    builder, stem = apps[name]
    kwargs = {"input_shape": input_shape, "weights": weights, "classes": classes}
    if weights == "imagenet":
        kwargs["classifier_activation"] = "softmax"
    else:
        kwargs["classifier_activation"] = None
    model = builder(**kwargs)
    if weights is None and stem and input_shape[0] <= 32:
        model = _cifar_stem(model, stem)
    return model
