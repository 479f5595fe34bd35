"""prune() and run() on models nobody here wrote: keras.applications, KerasHub
backbones, transformers, recurrent nets, subclassed models, several inputs."""

import keras
import numpy as np
import pytest

import dg2pf_tf
from dg2pf_tf import _compat
from dg2pf_tf.criteria import reference
from helpers import live_activations

KINDS = (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding)


def _masked_share(pruned, kinds=KINDS):
    """Share of the weights of layers of `kinds` (at any depth), biases aside, under masks."""
    masked = {id(v) for v in pruned.targets}
    layers = [l for l in _compat.sublayers(pruned.model, recursive=True) if isinstance(l, kinds)]
    weights = {id(w): w for l in layers for w in l.trainable_weights if w is not getattr(l, "bias", None)}
    total = sum(int(np.prod(w.shape)) for w in weights.values())
    return sum(int(np.prod(w.shape)) for k, w in weights.items() if k in masked) / total


def _assert_close(expected, got):
    """Equal within 1e-5 of the largest output (of 1 for smaller ones), as `helpers.assert_same_outputs`."""
    expected, got = np.asarray(expected), np.asarray(got)
    np.testing.assert_allclose(got, expected, atol=1e-5 * max(1.0, float(np.max(np.abs(expected)))), rtol=0)


def _check_prune_strip_round_trip(model, x, tmp_path, level=0.9, reference_masks=False):
    """Prunes `model` to `level`, then checks its outputs, strip() and a .keras round trip.

    `reference_masks` sets the masks with numpy's `reference.magnitude_masks`
    (floor 0) instead of `update_masks`: the same masks (test_criteria_device
    holds the two equal) without compiling the device search for each model.
    """
    pruned = dg2pf_tf.prune(model)
    original = keras.tree.map_structure(np.asarray, model(x))
    keras.tree.map_structure(_assert_close, original, keras.tree.map_structure(np.asarray, pruned(x)))
    if reference_masks:
        values = reference.magnitude_masks([v.numpy() for v in pruned.targets], level)
        for mask, value in zip(pruned.masks, values):
            mask.assign(value)
    else:
        dg2pf_tf.update_masks(pruned, level)
    masks = [m.numpy() for m in pruned.masks]
    total = sum(m.size for m in masks)
    assert total - sum(int(np.count_nonzero(m)) for m in masks) == round(level * total)
    summary = dg2pf_tf.sparsity_summary(pruned)
    masked = keras.tree.map_structure(np.asarray, pruned(x))
    stripped = dg2pf_tf.strip(pruned)
    keras.tree.map_structure(_assert_close, masked, keras.tree.map_structure(np.asarray, stripped(x)))
    assert dg2pf_tf.sparsity_summary(stripped).prunable_zeros == summary.prunable_zeros
    path = tmp_path / f"{model.name}.keras"
    pruned.save(path)
    loaded = keras.models.load_model(path)
    # Leaf by leaf: Keras' own .keras format reads a tuple of outputs back as a list.
    for a, b in zip(keras.tree.flatten(masked), keras.tree.flatten(loaded(x)), strict=True):
        _assert_close(a, b)
    return pruned


# The smallest member of every keras.applications family, at its smallest input
# (benchmarks/applications.py runs all of them). Built to output logits: the
# softmax of a random-weight network is nearly uniform and would hide errors.
APPLICATIONS = [
    ("ConvNeXtTiny", 32), ("DenseNet121", 32), ("EfficientNetB0", 32), ("EfficientNetV2B0", 32),
    ("InceptionResNetV2", 75), ("InceptionV3", 75), ("MobileNet", 32), ("MobileNetV2", 32),
    ("MobileNetV3Small", 32), ("MobileNetV3Large", 32), ("NASNetMobile", 32), ("ResNet50", 32),
    ("ResNet50V2", 32), ("VGG16", 32), ("Xception", 71),
]


@pytest.mark.slow
def test_every_keras_applications_family_prunes_strips_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    x, calibration = rng.normal(size=(2, 75, 75, 3)).astype("float32"), rng.normal(size=(16, 75, 75, 3))
    for name, size in APPLICATIONS:
        model = getattr(keras.applications, name)(input_shape=(size, size, 3), weights=None, classes=10,
                                                  classifier_activation=None)
        live_activations(model, calibration[:, :size, :size].astype("float32"))
        pruned = _check_prune_strip_round_trip(model, x[:, :size, :size], tmp_path, reference_masks=True)
        assert _masked_share(pruned, (keras.layers.Dense, keras.layers.Conv2D)) == 1.0, name
        keras.backend.clear_session()


def _transformer(vocab=32, length=8, width=16, classes=3):
    tokens = keras.Input((length,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocab, width, name="embed")(tokens)
    x = x + keras.layers.MultiHeadAttention(2, width // 2, name="mha")(x, x)
    x = keras.layers.LayerNormalization()(x)
    x = x + keras.layers.Dense(width, activation="relu", name="ff")(x)
    outputs = keras.layers.Dense(classes, name="head")(keras.ops.mean(x, axis=1))
    return keras.Model(tokens, outputs, name="transformer")


def _recurrent(kind, vocab=32, length=8, classes=3):
    tokens = keras.Input((length,), dtype="int32")
    x = keras.layers.Embedding(vocab, 8)(tokens)
    layer = {"lstm": lambda: keras.layers.LSTM(12), "gru": lambda: keras.layers.GRU(12),
             "bilstm": lambda: keras.layers.Bidirectional(keras.layers.LSTM(6))}[kind]()
    return keras.Model(tokens, keras.layers.Dense(classes)(layer(x)), name=kind)


@keras.saving.register_keras_serializable(package="dg2pf_tf_tests")
class TinyNet(keras.Model):
    def __init__(self, classes=3, **kwargs):
        super().__init__(**kwargs)
        self.classes = classes
        self.embed = keras.layers.Embedding(32, 8)
        self.rnn = keras.layers.SimpleRNN(8)
        self.head = keras.layers.Dense(classes)

    def call(self, tokens):
        return self.head(self.rnn(self.embed(tokens)))

    def get_config(self):
        return {**super().get_config(), "classes": self.classes}


def _tokens(n=96, length=8, vocab=32, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab, size=(n, length)).astype("int32")
    return x, (x[:, 0] % classes).astype("int64")


def _exact(level, report):
    """The sparsity masks at `level` hold over the report's pruned weights: round(s*N)/N."""
    return round(level * report["params_pruned"]) / report["params_pruned"]


def _short_run(model, train, val, **kwargs):
    return dg2pf_tf.run(model, train, val, sparsity=0.8, pruning_epochs=1, patience=1, max_epochs=1,
                        batch_size=32, seed=0, verbose=0, **kwargs)


@pytest.mark.parametrize("build", [
    _transformer, lambda: _recurrent("lstm"), lambda: _recurrent("gru"),
    lambda: _recurrent("bilstm"), lambda: TinyNet(),
], ids=["transformer", "lstm", "gru", "bidirectional_lstm", "subclassed_rnn"])
@pytest.mark.slow
def test_transformers_and_recurrent_nets_are_pruned_whole_by_run(build):
    model = build()
    x, y = _tokens()
    model(x[:1])
    pruned = dg2pf_tf.prune(model)
    assert _masked_share(pruned, KINDS + (keras.layers.SimpleRNNCell, keras.layers.LSTMCell,
                                          keras.layers.GRUCell)) == 1.0
    result = _short_run(model, (x, y), (x[:32], y[:32]))
    report = result.report
    assert report["sparsity_pruned"] == _exact(0.8, report)
    assert report["params_pruned"] == report["params_prunable"] > 0.9 * sum(
        int(np.prod(w.shape)) for w in model.trainable_weights if len(w.shape) >= 2)
    assert np.isfinite([row["loss"] for row in result.history]).all()
    assert type(result.model) is type(model)


def _regression_data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    return x, (x[:, :3] * 2.0 + 0.5).astype("float32")


def _mlp(outputs, activation=None):
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                             keras.layers.Dense(outputs, activation=activation)])


@pytest.mark.parametrize("outputs, activation, labels, task, metric", [
    (1, "sigmoid", lambda x: (x[:, 0] > 0).astype("float32"), "binary", "accuracy"),
    (3, "sigmoid", lambda x: (x[:, :3] > 0).astype("float32"), "binary", "accuracy"),
    (3, None, lambda x: (x[:, :3] > 0).astype("float32"), "binary", "accuracy"),
    (3, None, lambda x: x[:, :3] * 2.0 + 0.5, "regression", "mse"),
], ids=["binary_sigmoid", "multi_label_sigmoid", "multi_label_logits", "regression"])
@pytest.mark.slow
def test_run_handles_binary_multi_label_and_regression_models(outputs, activation, labels, task, metric):
    x, _ = _regression_data()
    y = labels(x)
    result = _short_run(_mlp(outputs, activation), (x, y), (x[:32], y[:32]))
    report = result.report
    assert report["task"] == task and report["metric"] == metric
    assert np.isfinite(report[f"pruned_val_{metric}"]) and f"val_{metric}" in result.history[0]
    assert report["sparsity_pruned"] == _exact(0.8, report)
    got, _ = dg2pf_tf.evaluate(result.model, dg2pf_tf.procedure.data.as_dataset((x[:32], y[:32]), 32))
    assert got == pytest.approx(report[f"pruned_val_{metric}"], rel=1e-5)


@pytest.mark.slow
def test_run_leaves_a_given_teacher_trainable_and_unchanged():
    x, y = _regression_data()
    model, teacher = _mlp(3), _mlp(3)
    before = [w.numpy().copy() for w in teacher.weights]
    _short_run(model, (x, y), (x[:32], y[:32]), teacher=teacher)
    assert teacher.trainable and len(teacher.trainable_weights) == 4
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, teacher.weights))
    # so the same model can be pruned again, or be the student of another run
    assert _short_run(teacher, (x, y), (x[:32], y[:32])).report["sparsity_pruned"] > 0


def test_a_teacher_of_another_output_shape_is_refused_before_training():
    x, y = np.zeros((16, 6), "float32"), np.zeros(16)
    with pytest.raises(ValueError, match=r"teacher.*\(4,\).*\(3,\)"):
        _short_run(_mlp(3), (x, y), (x, y), teacher=_mlp(4))


class SubclassedTeacher(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden, self.out = keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)

    def call(self, x):
        return self.out(self.hidden(x))


@pytest.mark.slow
def test_a_subclassed_teacher_teaches():
    x, y = np.random.default_rng(0).normal(size=(64, 6)).astype("float32"), np.arange(64) % 3
    teacher = SubclassedTeacher()
    teacher(x[:1])
    assert _short_run(_mlp(3), (x, y), (x[:32], y[:32]), teacher=teacher).report["sparsity_pruned"] > 0


def test_distillation_of_sigmoid_and_regression_outputs_is_zero_on_the_teacher_itself():
    x, y = _regression_data(8)
    for task, outputs, activation in (("binary", 3, "sigmoid"), ("regression", 3, None)):
        model = _mlp(outputs, activation)
        distiller = dg2pf_tf.Distiller(model, model, task=task, alpha=1.0)
        loss = distiller.compute_loss(x, (y > 0).astype("float32") if task == "binary" else y)
        assert float(loss) == pytest.approx(0.0, abs=1e-6), task


def _logits_in_numpy(mlp, x):
    """The pre-activation outputs of an `_mlp`, computed from its weights in float64."""
    w1, b1, w2, b2 = (w.astype(np.float64) for w in mlp.get_weights())
    return np.maximum(x @ w1 + b1, 0) @ w2 + b2


def _log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


@pytest.mark.parametrize("outputs, activation", [(1, None), (3, "sigmoid")], ids=["one_logit", "three_sigmoids"])
def test_binary_distillation_loss_equals_the_formula(outputs, activation):
    x = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
    # Flat 0/1 labels for a single output, soft multi-label rows for three.
    y = (x[:, 0] > 0).astype("float32") if outputs == 1 else \
        np.random.default_rng(1).uniform(size=(16, 3)).astype("float32")
    student, teacher = _mlp(outputs, activation), _mlp(outputs, activation)
    distiller = dg2pf_tf.Distiller(student, teacher, task="binary", temperature=3.0, alpha=0.6)
    loss = float(distiller.compute_loss(x, y))

    s, t, T = _logits_in_numpy(student, x), _logits_in_numpy(teacher, x), 3.0
    p, log_p, log_1p = 1 / (1 + np.exp(-t / T)), _log_sigmoid(t / T), _log_sigmoid(-t / T)
    kl = p * (log_p - _log_sigmoid(s / T)) + (1 - p) * (log_1p - _log_sigmoid(-s / T))
    labels = y.reshape(len(x), outputs)
    bce = -(labels * _log_sigmoid(s) + (1 - labels) * _log_sigmoid(-s))
    expected = 0.6 * T**2 * kl.mean(axis=1).mean() + 0.4 * bce.mean(axis=1).mean()
    assert kl.mean() > 1e-3  # the teacher differs: the KD term counts
    assert loss == pytest.approx(expected, rel=1e-4)


def test_regression_distillation_loss_equals_the_formula_without_temperature():
    x, y = _regression_data(16)
    student, teacher = _mlp(3), _mlp(3)
    distiller = dg2pf_tf.Distiller(student, teacher, task="regression", temperature=3.0, alpha=0.6)
    loss = float(distiller.compute_loss(x, y))

    s, t = _logits_in_numpy(student, x), _logits_in_numpy(teacher, x)
    expected = 0.6 * np.mean((s - t) ** 2) + 0.4 * np.mean((s - y) ** 2)
    assert np.mean((s - t) ** 2) > 1e-2
    assert loss == pytest.approx(expected, rel=1e-4)


def _two_inputs(dict_inputs):
    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    merged = keras.layers.Concatenate()([keras.layers.Dense(8)(a), keras.layers.Dense(8)(b)])
    outputs = keras.layers.Dense(3)(merged)
    return keras.Model({"a": a, "b": b} if dict_inputs else [a, b], outputs)


@pytest.mark.slow
@pytest.mark.parametrize("dict_inputs", [False, True], ids=["list", "dict"])
def test_run_trains_models_with_several_inputs(dict_inputs):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(96, 4)).astype("float32"), rng.normal(size=(96, 3)).astype("float32")
    y = (a[:, 0] > 0).astype("int64") + (b[:, 0] > 0)
    x = {"a": a, "b": b} if dict_inputs else [a, b]
    val = keras.tree.map_structure(lambda v: v[:32], x)
    result = _short_run(_two_inputs(dict_inputs), (x, y), (val, y[:32]))
    assert result.report["sparsity_pruned"] == _exact(0.8, result.report)
    import tensorflow as tf

    # tf.data reads a list as one tensor: inputs go in a tuple (or a dict).
    dataset = tf.data.Dataset.from_tensor_slices((x if dict_inputs else tuple(x), y)).batch(32)
    result = _short_run(_two_inputs(dict_inputs), dataset, dataset)
    assert result.report["task"] == "categorical"


@pytest.mark.parametrize("make, match", [
    (lambda: (_two_inputs(False), ([np.zeros((8, 4), "float32")], np.zeros(8))), "takes 2 inputs"),
    (lambda: (_two_inputs(True), ({"a": np.zeros((8, 4), "float32"), "c": np.zeros((8, 3), "float32")},
                                  np.zeros(8))), r"dict of inputs \['a', 'b'\]"),
    (lambda: (_two_inputs(False), ([np.zeros((8, 4), "float32"), np.zeros((7, 3), "float32")],
                                   np.zeros(8))), "differ in length"),
    (lambda: (_mlp(1, "sigmoid"), (np.zeros((8, 6), "float32"), np.full(8, 2.0))), r"in \[0, 1\]"),
    (lambda: (_mlp(3), (np.zeros((8, 6), "float32"), np.zeros((8, 2), "float32"))), "do not fit"),
    (lambda: (keras.Model(*(lambda i: (i, [keras.layers.Dense(2)(i), keras.layers.Dense(3)(i)]))(
        keras.Input((6,)))), (np.zeros((8, 6), "float32"), np.zeros(8))), "2 outputs"),
], ids=["missing_input", "wrong_dict_keys", "ragged_inputs", "labels_outside_0_1",
        "regression_shape", "multi_output"])
def test_data_that_cannot_train_the_model_is_refused_clearly(make, match):
    model, data = make()
    with pytest.raises(ValueError, match=match):
        _short_run(model, data, data)


def test_a_dataset_of_dicts_is_refused_with_the_map_to_write():
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices({"x": np.zeros((8, 6), "float32"), "y": np.zeros(8)}).batch(4)
    with pytest.raises(ValueError, match="yield.*pairs.*map"):
        _short_run(_mlp(3), data, data)


def test_an_unknown_task_is_refused():
    x, y = _regression_data(8)
    with pytest.raises(ValueError, match="task"):
        _short_run(_mlp(3), (x, y), (x, y), task="ranking")


def test_kerashub_bert_backbone_is_masked_whole_stripped_and_round_trips(tmp_path):
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=64, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=12)
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(0, 64, (2, 12)).astype("int32"),
         "segment_ids": np.zeros((2, 12), "int32"), "padding_mask": np.ones((2, 12), "int32")}
    with pytest.warns(UserWarning, match="position_embedding"):
        pruned = _check_prune_strip_round_trip(backbone, x, tmp_path)
    assert _masked_share(pruned) >= 0.99


def test_kerashub_vit_backbone_is_masked_whole_stripped_and_round_trips(tmp_path):
    import keras_hub

    backbone = keras_hub.models.ViTBackbone(
        image_shape=(16, 16, 3), patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype("float32")
    with pytest.warns(UserWarning, match="stay dense"):
        pruned = _check_prune_strip_round_trip(backbone, x, tmp_path)
    assert _masked_share(pruned) >= 0.99


def test_models_with_dict_and_nested_outputs_are_pruned_stripped_and_round_trip(tmp_path):
    inputs = keras.Input((8,), name="features")
    hidden = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
    heads = {"label": keras.layers.Dense(5, name="label")(hidden),
             "boxes": [keras.layers.Dense(4, name="box")(hidden),
                       (keras.layers.Dense(2, name="score")(hidden), keras.layers.Dense(1, name="extra")(hidden))]}
    model = keras.Model(inputs, heads, name="heads")
    x = np.random.default_rng(0).normal(size=(3, 8)).astype("float32")
    pruned = _check_prune_strip_round_trip(model, x, tmp_path, level=0.5)
    stripped = dg2pf_tf.strip(pruned)
    assert set(stripped(x)) == {"label", "boxes"} and len(stripped(x)["boxes"][1]) == 2
    assert dg2pf_tf.sparsity_summary(stripped).prunable_sparsity == pytest.approx(0.5, abs=1e-3)
