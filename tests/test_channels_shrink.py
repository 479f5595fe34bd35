"""Channel groups read from Keras graphs, and `shrink()` removing zeroed channels exactly."""

import keras
import numpy as np
import pytest

import dg2pf_tf
from dg2pf_tf.channels import graph
from helpers import assert_same_outputs, gated_cnn, live_activations, randomized, run_python

L = keras.layers


def zero_channels(group, channels, roles=(graph.PRODUCES, graph.PASSES, graph.CONSUMES)):
    """Zeroes the trainable weight entries of `channels` of `group` that take
    part in it as one of `roles`, as channel pruning does."""
    for s in group.trainable_slices():
        if s.role not in roles:
            continue
        value = np.moveaxis(keras.ops.convert_to_numpy(s.variable), s.axis, 0).copy()
        value[s.rows[channels].reshape(-1)] = 0
        s.variable.assign(np.moveaxis(value, 0, s.axis))


def prune_half_of_every_group(model, seed=0, **roles):
    """Zeroes a random half of the channels of every prunable group; returns the structure."""
    found = graph.channel_groups(model)
    rng = np.random.default_rng(seed)
    for group in found.groups:
        zero_channels(group, rng.choice(group.size, group.size // 2, replace=False), **roles)
    return found


def test_groups_follow_residuals_concatenation_gates_and_flatten():
    found = graph.channel_groups(gated_cnn())
    groups = {g.layers(graph.PRODUCES)[0]: g for g in found.groups}
    assert sorted(groups) == ["hidden", "se_reduce", "stem", "widen"]
    # The residual ties stem and branch; the SE gate's first 8 outputs join them.
    stem = groups["stem"]
    assert stem.size == 8 and stem.layers(graph.PRODUCES) == ["stem", "branch", "se_expand"]
    assert set(stem.layers(graph.PASSES)) == {"stem", "stem_bn", "branch", "branch_bn", "dw",
                                                  "se_expand"}  # biases, BatchNorm, depthwise
    assert set(stem.layers(graph.CONSUMES)) == {"branch", "widen", "se_reduce", "where", "hidden"}
    # The gate's last 4 outputs belong to `widen`'s channels, at rows 8-11 of its kernel.
    widen = groups["widen"]
    expand = [s for s in widen.slices if s.layer == "se_expand" and s.role == graph.PRODUCES]
    assert expand[0].rows[:, 0].tolist() == [8, 9, 10, 11]
    # Flatten: channel c of the 12 concatenated ones feeds rows c, c+12, ... of `hidden`.
    flat = [s for s in widen.slices if s.layer == "hidden"][0]
    assert flat.rows.shape == (4, 16) and flat.rows[1, :3].tolist() == [9, 21, 33]
    dense = {d.name: d.reason for d in found.dense}
    assert dense["where"] == "a single channel"
    assert dense["logits"] == "a model output"
    assert dense["image"] == "the model's input"


def test_shrink_removes_zeroed_channels_and_computes_the_same():
    model = randomized(gated_cnn())
    found = prune_half_of_every_group(model)
    small = dg2pf_tf.shrink(model)
    assert small.get_layer("stem").filters == 4 and small.get_layer("widen").filters == 2
    assert small.get_layer("hidden").units == 8 and small.get_layer("se_expand").filters == 6
    assert small.get_layer("hidden").kernel.shape == (16 * 6, 8)
    assert small.count_params() < 0.5 * model.count_params()
    assert len(found.groups) == 4
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype("float32")
    assert_same_outputs(model, small, x)


def test_channels_nothing_reads_go_even_where_their_filters_and_batchnorm_are_not_zero():
    model = randomized(gated_cnn())
    prune_half_of_every_group(model, roles=(graph.CONSUMES,))
    small = dg2pf_tf.shrink(model)
    assert small.get_layer("stem").filters == 4 and small.get_layer("stem_bn").gamma.shape == (4,)
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype("float32")
    assert_same_outputs(model, small, x)


def test_a_channel_still_read_anywhere_is_kept():
    model = randomized(gated_cnn())
    stem = [g for g in graph.channel_groups(model).groups if g.name.startswith("stem")][0]
    zero_channels(stem, [0, 1])
    kernel = model.get_layer("hidden").kernel
    value = keras.ops.convert_to_numpy(kernel)
    value[1, 0] = 0.5  # channel 1 still reaches `hidden` at one position
    kernel.assign(value)
    assert dg2pf_tf.shrink(model).get_layer("stem").filters == 7


@pytest.mark.parametrize("layer, reason", [
    (lambda: L.LayerNormalization(name="mixer"), "read by 'mixer' (LayerNormalization)"),
    (lambda: L.Activation("softmax", name="mixer"), "whose activation mixes channels"),
    (lambda: L.Activation(keras.ops.softmax, name="mixer"), "whose activation mixes channels"),
    (lambda: L.Reshape((4, 8, 4), name="mixer"), "which moves channels"),
    (lambda: L.Lambda(lambda t: t[..., ::-1], name="mixer"), "not known to keep channels apart"),
    (lambda: L.EinsumDense("abcd,ce->abde", (4, 8, 5), name="mixer"), "whose equation moves channels"),
    (lambda: L.SeparableConv2D(6, 1, depth_multiplier=2, name="mixer"), "depth_multiplier > 1"),
    # keras.ops calls are probed: these mix, reorder or count the channels.
    (lambda: keras.ops.softmax, "read by 'softmax' (Softmax), which is not known to keep"),
    (lambda: lambda t: keras.ops.flip(t, axis=-1), "which is not known to keep channels apart"),
    (lambda: lambda t: t * keras.ops.arange(8.0), "which is not known to keep channels apart"),
    (lambda: lambda t: t + keras.ops.ones((8,)), "which is not known to keep channels apart"),
    # Elementwise, but it declares its width: rebuilt smaller it would still claim 8 channels.
    (lambda: L.Lambda(lambda t: 2.0 * t, output_shape=(4, 4, 8), name="mixer"), "not known to keep"),
    pytest.param(lambda: L.Masking(name="mixer"), "not known to keep",  # its mask reads every channel
                 marks=pytest.mark.filterwarnings("ignore:.*does not support masking")),
])
def test_groups_reaching_a_layer_that_mixes_channels_stay_dense_with_the_reason(layer, reason):
    x = keras.Input((4, 4, 3))
    y = layer()(L.Conv2D(8, 1, name="conv")(x))
    model = keras.Model(x, L.Dense(2)(L.GlobalAveragePooling2D()(L.Conv2D(6, 1, name="after")(y))))
    found = graph.channel_groups(model)
    dense = {d.name: d.reason for d in found.dense}
    assert reason in dense["conv"]
    assert [g.name for g in found.groups] == ["after"]
    # Channels 2 and 5 of conv zeroed, and every weight entry downstream that
    # sits on an axis of their width at their positions: were the group not
    # dense, nothing would read them any more and shrink would remove them.
    model = randomized(model)
    for layer in model.layers:
        for weight in layer.weights:
            value = keras.ops.convert_to_numpy(weight)
            axes = [value.ndim - 1] if layer.name == "conv" else [a for a, n in enumerate(value.shape) if n == 8]
            for axis in axes:
                np.moveaxis(value, axis, 0)[[2, 5]] = 0
            weight.assign(value)
    # Channels 1 and 4 of `after`, a prunable group, are zeroed too: they go, conv's stay.
    zero_channels(found.groups[0], [1, 4])
    small = dg2pf_tf.shrink(model)
    assert small.get_layer("conv").filters == 8 and small.get_layer("after").filters == 4
    assert_same_outputs(model, small, np.random.default_rng(1).normal(size=(4, 4, 4, 3)).astype("float32"))


def separable_and_softmax():
    """A separable convolution, and a Dense layer whose softmax (a function Keras
    does not name) mixes its own units."""
    x = keras.Input((8, 8, 3))
    a = L.Conv2D(8, 3, activation=keras.ops.relu, name="stem")(x)  # probed: elementwise
    b = L.SeparableConv2D(6, 3, padding="same", name="sep")(a)
    c = L.Dense(5, activation=keras.ops.softmax, name="attend")(b)  # probed: mixes
    y = L.GlobalAveragePooling2D()(L.Conv2D(4, 1, name="after")(c))
    return keras.Model(x, L.Dense(2, name="head")(y))


def test_separable_convolutions_and_softmax_layers_consume_the_channels_they_read():
    model = randomized(separable_and_softmax())
    found = prune_half_of_every_group(model)
    groups = {g.name: g for g in found.groups}
    assert sorted(groups) == ["after", "sep", "stem"]
    assert groups["stem"].layers(graph.CONSUMES) == ["sep"]  # pointwise rows
    assert groups["stem"].layers(graph.PASSES) == ["stem", "sep"]  # bias, depthwise kernel
    assert "attend" in groups["sep"].layers(graph.CONSUMES)
    assert "whose activation mixes channels" in {d.name: d.reason for d in found.dense}["attend"]
    small = dg2pf_tf.shrink(model)
    sep = small.get_layer("sep")
    assert sep.filters == 3 and sep.depthwise_kernel.shape == (3, 3, 4, 1)
    assert sep.pointwise_kernel.shape == (1, 1, 4, 3)
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype("float32")
    assert_same_outputs(model, small, x)


def ops_gated_cnn():
    """MobileNetV3's squeeze-and-excitation in keras.ops arithmetic: a spatial
    mean, a hard-sigmoid gate (`relu6(x + 3) / 6`), a product, a clip, a Lambda."""
    x = keras.Input((6, 6, 3))
    a = L.Conv2D(8, 3, padding="same", name="stem")(x)
    gate = L.Conv2D(4, 1, name="se_reduce")(keras.ops.mean(a, axis=(1, 2), keepdims=True))
    gate = L.ReLU(6.0)(L.Conv2D(8, 1, name="se_expand")(gate) + 3.0) * (1.0 / 6.0)
    y = keras.ops.clip(keras.ops.multiply(a, gate), -2.0, 2.0)
    y = L.Lambda(lambda t: 2.0 * t, name="scale")(y)
    y = L.GlobalAveragePooling2D()(L.Conv2D(6, 1, name="after")(y))
    return keras.Model(x, L.Dense(3, name="head")(y))


def test_channels_pass_through_keras_ops_that_keep_them_apart():
    model = randomized(ops_gated_cnn())
    found = prune_half_of_every_group(model)
    groups = {g.layers(graph.PRODUCES)[0]: g for g in found.groups}
    assert sorted(groups) == ["after", "se_reduce", "stem"]
    stem = groups["stem"]
    assert stem.layers(graph.PRODUCES) == ["stem", "se_expand"]
    assert set(stem.layers(graph.CONSUMES)) == {"se_reduce", "after"}
    small = dg2pf_tf.shrink(model)
    assert small.get_layer("stem").filters == 4 and small.get_layer("se_expand").filters == 4
    x = np.random.default_rng(1).normal(size=(4, 6, 6, 3)).astype("float32")
    assert_same_outputs(model, small, x)
    # Through prune() too: its copy shares the Lambda (safe mode refuses to rebuild one).
    pruned = dg2pf_tf.prune(randomized(ops_gated_cnn()), structure="channel")
    assert dg2pf_tf.update_masks(pruned, 0.5) == 0.5
    assert_same_outputs(pruned, dg2pf_tf.shrink(pruned), x)


def test_mobilenet_v3_gates_written_in_keras_ops_leave_only_input_and_classifier_dense():
    model = keras.applications.MobileNetV3Small(weights=None, input_shape=(32, 32, 3))
    found = graph.channel_groups(model)
    assert {d.reason.split(", ")[-1] for d in found.dense} == {
        "the model's input", "whose activation mixes channels"}
    assert len(found.groups) == 27


def attention_and_einsum():
    """Self-attention with a mask input, cross-attention with its own widths,
    EinsumDense projections (one making an extra axis), Flatten into Dense."""
    x, mask = keras.Input((6, 16), name="x"), keras.Input((6, 6), name="mask")
    h = L.Dense(16, name="embed")(x)
    a = L.MultiHeadAttention(4, 8, name="self")(h, h, attention_mask=mask)
    a = L.MultiHeadAttention(3, 5, value_dim=7, output_shape=12, name="cross")(a, h, h)
    e = L.EinsumDense("abc,cd->abd", (6, 10), bias_axes="d", activation="relu", name="ein")(a)
    e = L.EinsumDense("abc,cde->abde", (6, 3, 4), bias_axes="e", name="ein2")(e)
    return keras.Model([x, mask], L.Dense(2, name="logits")(L.Flatten()(e)))


def test_attention_heads_and_einsum_units_are_groups_and_shrink_computes_the_same():
    model = randomized(attention_and_einsum())
    found = prune_half_of_every_group(model)
    assert {g.name: g.size for g in found.groups} == {
        "embed": 16, "self heads": 4, "self": 16, "cross heads": 3, "cross": 12, "ein": 10, "ein2": 4}
    heads = next(g for g in found.groups if g.name == "cross heads")
    assert sorted(s.variable.path for s in heads.slices if s.role == graph.CONSUMES) == [
        "cross/attention_output/kernel"]
    small = dg2pf_tf.shrink(model)
    assert (small.get_layer("self").num_heads, small.get_layer("cross").num_heads) == (2, 2)
    assert small.get_layer("cross").output.shape[-1] == 6 and small.get_layer("ein2").output.shape[-1] == 2
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(3, 6, 16)).astype("float32"), (rng.uniform(size=(3, 6, 6)) > 0.3).astype("float32")]
    assert_same_outputs(model, small, x)


def encoder(length=6, width=16):
    """A post-norm transformer encoder block on token ids."""
    tokens = keras.Input((length,), dtype="int32")
    x = L.Embedding(50, width)(tokens)
    x = L.LayerNormalization()(L.Add()([x, L.MultiHeadAttention(4, 4, name="mha")(x, x)]))
    f = L.Dense(32, activation="gelu", name="ff_in")(x)
    f = L.EinsumDense("abc,cd->abd", (length, width), bias_axes="d", name="ff_out")(f)
    x = L.LayerNormalization()(L.Add()([x, f]))
    return keras.Model(tokens, L.Dense(3, name="head")(L.GlobalAveragePooling1D()(x)))


def test_channel_pruning_removes_attention_heads_and_feed_forward_units(tmp_path):
    pruned = dg2pf_tf.prune(randomized(encoder()), structure="channel")
    found = dg2pf_tf.channel_groups(pruned.model)
    assert {g.name: g.size for g in found.groups} == {"mha heads": 4, "ff_in": 32}
    assert "LayerNormalization" in {d.name: d.reason for d in found.dense}["ff_out"]  # the model width
    assert dg2pf_tf.update_masks(pruned, 0.5) == pytest.approx(18 / 36)
    small = dg2pf_tf.shrink(pruned)
    heads, units = small.get_layer("mha").num_heads, small.get_layer("ff_in").units
    assert heads + units == 18 and heads >= 1 and units >= 8  # the floor: half of a uniform share
    tokens = np.random.default_rng(0).integers(0, 50, (4, 6)).astype("int32")
    assert_same_outputs(pruned, small, tokens)
    small.save(str(tmp_path / "small.keras"))
    assert_same_outputs(small, keras.models.load_model(str(tmp_path / "small.keras")), tokens)


def test_kerashub_bert_loses_feed_forward_units_and_names_what_stays_dense(tmp_path):
    import keras_hub

    keras.utils.set_random_seed(0)
    bert = randomized(keras_hub.models.BertBackbone(
        vocabulary_size=64, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=12))
    with pytest.warns(UserWarning, match="position_embedding"):
        pruned = dg2pf_tf.prune(bert, structure="channel")
    found = dg2pf_tf.channel_groups(pruned.model)
    assert {g.name: g.size for g in found.groups} == {
        "transformer_layer_0 feed-forward": 32, "transformer_layer_1 feed-forward": 32}
    dense = {d.name: d.reason for d in found.dense}
    assert "whose width its LayerNormalizations mix" in dense["transformer_layer_0"]
    assert "ReversibleEmbedding" in dense["token_embedding"]
    assert dg2pf_tf.update_masks(pruned, 0.5) == pytest.approx(0.5)
    small = dg2pf_tf.shrink(pruned)
    units = [small.get_layer(f"transformer_layer_{i}").intermediate_dim for i in (0, 1)]
    assert sum(units) == 32 and min(units) >= 8  # ranked globally, the floor: half of an even share
    assert small.count_params() == bert.count_params() - 32 * (16 + 1 + 16)  # kernel column, bias, row
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(0, 64, (2, 12)).astype("int32"),
         "segment_ids": np.zeros((2, 12), "int32"), "padding_mask": np.ones((2, 12), "int32")}
    small.save(str(tmp_path / "small.keras"))
    loaded = keras.models.load_model(str(tmp_path / "small.keras"))
    for model in (small, loaded):
        got, want = model.predict(x, verbose=0), pruned.predict(x, verbose=0)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0)


def test_attention_that_structure_cannot_follow_stays_dense_with_the_reason():
    x = keras.Input((6, 16))
    h = L.Dense(16, name="embed")(x)
    y = L.MultiHeadAttention(2, 4, use_gate=True, name="gated")(h, h)
    model = keras.Model(x, L.Dense(2)(L.Flatten()(L.Dense(4, name="after")(y))))
    found = graph.channel_groups(model)
    assert "a gated MultiHeadAttention" in {d.name: d.reason for d in found.dense}["embed"]
    assert [g.name for g in found.groups] == ["after"]


def test_channel_groups_refuse_a_subclassed_model():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(3)

        def call(self, x):
            return self.dense(x)

    net = Net()
    net(np.zeros((1, 4), "float32"))
    with pytest.raises(ValueError, match="not a built Sequential or Functional model"):
        graph.channel_groups(net)


@pytest.mark.slow
def test_a_shrunk_model_saves_and_loads_without_dg2pf_tf(tmp_path):
    model = randomized(gated_cnn())
    prune_half_of_every_group(model)
    small = dg2pf_tf.shrink(model)
    path = str(tmp_path / "small.keras")
    small.save(path)
    x = np.random.default_rng(2).normal(size=(2, 8, 8, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model.predict(x, verbose=0))
    out = run_python(f"""
import sys, numpy as np, keras
m = keras.models.load_model({path!r})
assert "dg2pf_tf" not in sys.modules
y = m.predict(np.load({str(tmp_path / 'x.npy')!r}), verbose=0)
ref = np.load({str(tmp_path / 'y.npy')!r})
print("max diff", float(np.max(np.abs(y - ref)) / max(1.0, np.max(np.abs(ref)))))
""")
    assert float(out.strip().split()[-1]) <= 1e-5


# One model of each keras.applications family, giving logits: the softmax of a
# random-weight network is nearly uniform and would hide errors in the logits.
def _application(family, size=32, **kwargs):
    return lambda: getattr(keras.applications, family)(
        weights=None, input_shape=(size, size, 3), classifier_activation=None, **kwargs)


APPLICATIONS = {
    "ResNet50": _application("ResNet50"),
    "MobileNetV2": _application("MobileNetV2", alpha=0.35),
    "DenseNet121": _application("DenseNet121"),
    "EfficientNetB0": _application("EfficientNetB0"),
    "MobileNetV3Small": _application("MobileNetV3Small"),
    "ConvNeXtTiny": _application("ConvNeXtTiny"),
    "Xception": _application("Xception", 71),
    "NASNetMobile": _application("NASNetMobile"),
    "InceptionV3": _application("InceptionV3", 75),
    "InceptionResNetV2": _application("InceptionResNetV2", 75),
    "VGG16": _application("VGG16"),
    "MobileNet": _application("MobileNet"),
    "ResNet50V2": _application("ResNet50V2"),
    "EfficientNetV2B0": _application("EfficientNetV2B0"),
}


@pytest.fixture
def float64():
    """Layers made in the test compute in float64 (the global policy wins over floatx)."""
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield "float64"
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(APPLICATIONS))
def test_shrink_of_keras_applications_computes_what_the_zeroed_model_computes(name, float64):
    # In float64: with activations alive through 50 layers (`live_activations`),
    # float32 sums in another order differ by up to ~2e-5 of the largest logit
    # (MobileNetV2); in float64 the shrunk model is exact, so the check is strict.
    keras.utils.set_random_seed(0)
    model = randomized(APPLICATIONS[name]())
    found = prune_half_of_every_group(model)
    assert found.groups, str(found)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(2, *model.input_shape[1:])).astype(float64)
    live_activations(model, rng.uniform(0, 255, size=(16, *model.input_shape[1:])).astype(float64))
    small = dg2pf_tf.shrink(model)
    assert {w.dtype for w in small.weights if "float" in w.dtype} == {float64}
    assert small.count_params() < model.count_params()
    assert_same_outputs(model, small, x)


@pytest.mark.parametrize("sparsity, floor", [(0.3, 0.0), (0.5, 0.5), (0.7, 1.0), (0.9, 0.2)])
def test_device_channel_selection_equals_the_numpy_reference_with_ties(sparsity, floor):
    from dg2pf_tf.core import masking
    from dg2pf_tf.criteria import reference

    model = randomized(gated_cnn())
    pruned = dg2pf_tf.prune(model, structure="channel", floor=floor)
    criterion = masking.mask_set(pruned).criterion()
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, criterion.total).astype("float32")  # many ties
    device = criterion.keep(scores, sparsity).numpy()
    expected = np.concatenate(reference.channel_keep(
        np.split(scores, np.cumsum(criterion.sizes)[:-1]), sparsity, floor))
    np.testing.assert_array_equal(device, expected)
    assert (~device).sum() == reference.channel_removals(criterion.sizes, sparsity, floor)


def test_channel_pruning_masks_whole_channels_and_shrinks_to_the_same_outputs():
    model = randomized(gated_cnn())
    pruned = dg2pf_tf.prune(model, structure="channel")
    assert dg2pf_tf.update_masks(pruned, 0.5) == pytest.approx(16 / 31)
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype("float32")
    small = dg2pf_tf.shrink(pruned)  # strips first; the recovery-mode forward pass is masked too
    assert_same_outputs(pruned, small, x)
    dg2pf_tf.finalize(pruned)
    from dg2pf_tf.core import masking
    masking.check_invariant(pruned, 0.5)
    kept = sum(getattr(small.get_layer(n), "filters", None) or small.get_layer(n).units
               for n in ("stem", "widen", "se_reduce", "hidden"))
    assert kept == 31 - 16
    # Each group keeps at least one channel and half its uniform share (the default floor).
    assert small.get_layer("se_reduce").filters >= 1 and small.get_layer("hidden").units >= 4


def test_channel_pruned_model_round_trips_through_a_keras_file(tmp_path):
    pruned = dg2pf_tf.prune(randomized(gated_cnn()), structure="channel", floor=0.0)
    dg2pf_tf.update_masks(pruned, 0.4)
    path = str(tmp_path / "pruned.keras")
    pruned.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_config()["structure"] == "channel" and loaded.floor == 0.0
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype("float32")
    assert_same_outputs(pruned, loaded, x)
    dg2pf_tf.update_masks(loaded, 0.6)
    assert dg2pf_tf.shrink(loaded).get_layer("hidden").units < 16


def test_channel_pruning_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="`structure` must be .unstructured., .channel. or an N:M pattern"):
        dg2pf_tf.prune(gated_cnn(), structure="filters")
    with pytest.raises(ValueError, match="ranks channels globally"):
        dg2pf_tf.prune(gated_cnn(), structure="channel", scope="layer")
    single = keras.Sequential([keras.Input((4,)), L.Dense(3)])
    with pytest.raises(ValueError, match="no channel group that can be pruned"):
        dg2pf_tf.prune(single, structure="channel")
    excluded = dg2pf_tf.channel_groups  # the excluded layer's groups stay dense, with why
    pruned = dg2pf_tf.prune(gated_cnn(), structure="channel", exclude=["hidden"])
    from dg2pf_tf.channels.groups import prunable_groups
    found = prunable_groups(pruned.model, pruned.targets)
    groups, dense = found.groups, found.dense
    assert excluded(pruned.model).groups and "stem" not in [g.layers(graph.PRODUCES)[0] for g in groups]
    assert any("'hidden' is not pruned" in d.reason for d in dense)


@pytest.mark.slow
def test_run_with_channel_structure_returns_the_shrunk_model_and_counts_its_channels():
    from zoo.data import digits_arrays
    from zoo.models import small_cnn

    (xtr, ytr), (xte, yte) = digits_arrays()
    keras.utils.set_random_seed(0)
    dense = small_cnn()
    dense.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    dense.fit(xtr, ytr, epochs=3, batch_size=64, verbose=0)
    result = dg2pf_tf.run(dense, (xtr[:1000], ytr[:1000]), (xtr[1000:], ytr[1000:]), sparsity=0.5,
                          structure="channel", pruning_epochs=2, patience=1, max_epochs=2,
                          seed=0, verbose=0)
    report, small = result.report, result.model
    found = dg2pf_tf.channel_groups(dense)
    assert report["channels_total"] == sum(g.size for g in found.groups)
    assert report["channels_removed"] == round(0.5 * report["channels_total"])
    assert report["params_shrunk"] == small.count_params() < 0.6 * dense.count_params()
    assert not dg2pf_tf.channel_groups(small).groups or all(
        g.size <= o.size for g, o in zip(dg2pf_tf.channel_groups(small).groups, found.groups))
    # The shrunk model is what the report scored: its validation accuracy is the reported one.
    accuracy = float(np.mean(small.predict(xtr[1000:], verbose=0).argmax(-1) == ytr[1000:]))
    assert accuracy == pytest.approx(report["pruned_val_accuracy"], abs=1e-6)
    assert accuracy > 0.5
