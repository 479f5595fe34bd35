"""Coupled channel groups: which weights of a Keras layer graph lose a channel together.

Channels are followed through the graph, as Torch-Pruning's dependency graph
does for PyTorch. A convolution or Dense layer *produces* the channels of its
output; per-channel layers (BatchNormalization, activations, pooling, padding,
depthwise convolutions) pass them through; `Add`/`Multiply`-style merges tie
their inputs' channels into one group (a squeeze-and-excitation gate
included); `Concatenate` lays groups side by side; `Flatten` spreads each
channel over one input of the next layer per position. A convolution, Dense
or EinsumDense layer reading a group *consumes* it through its kernel's input
rows. `MultiHeadAttention` consumes its inputs' channels, produces its output
projection's, and its heads are a group inside it: produced by the query, key
and value projections, consumed by the output projection. The feed-forward
units of KerasHub's `TransformerEncoder` are a group inside it.

Weightless operations not known by type (`keras.ops` arithmetic, a Lambda)
pass channels when running them shows they keep them apart (`probe`).
A group that reaches anything else (a model output or input, a layer that
mixes channels, an operation that fails the probe) stays dense, with the reason.
Layers are found by `model.walk`; the calls that connect them are read through
`_compat.graph_nodes` (here, by `costs` for what each call computes, and by `model.clone`).
"""

import collections
import dataclasses
import functools

import keras
import numpy as np

from dg2pf_tf import _compat
from dg2pf_tf.channels import probe
from dg2pf_tf.channels.blocks import residual_blocks
from dg2pf_tf.model import layer_kinds
from dg2pf_tf.model.layer_kinds import Flow

PRODUCES, PASSES, CONSUMES = "produces", "passes", "consumes"
# Groups inside a layer, named for what they count.
_KINDS = {"num_heads": " heads", "intermediate_dim": " feed-forward"}


@dataclasses.dataclass(frozen=True, eq=False)
class Slice:
    """The entries of `variable` that hold a group's channels: along `axis`,
    the positions `rows[c]` hold channel c (one row per channel). `role`:
    PRODUCES for a kernel's output columns, CONSUMES for its input rows,
    PASSES for per-channel weights (biases, BatchNorm, depthwise kernels).
    `size_key`, for PRODUCES: the entry of the layer's config that counts
    these channels ('filters', 'units', 'num_heads', 'intermediate_dim', or
    the last entry of 'output_shape')."""

    variable: object
    axis: int
    rows: np.ndarray
    layer: str
    role: str
    size_key: str = None

    def per_channel(self, value=None):
        """`(channels, entries)`: the slice's entries of `value` (default: the
        variable's value), one row per channel."""
        value = keras.ops.convert_to_numpy(self.variable) if value is None else value
        moved = np.moveaxis(value, self.axis, 0)[self.rows.reshape(-1)]
        return moved.reshape(self.rows.shape[0], -1)


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelGroup:
    """Channels that must go together: every weight entry of each is in `slices`."""

    size: int
    slices: tuple

    @property
    def name(self):
        producers = self.layers(PRODUCES)
        kind = next((_KINDS[s.size_key] for s in self.slices if s.size_key in _KINDS), "")
        return (producers[0] + kind
                + (f" (+{len(producers) - 1} tied)" if len(producers) > 1 else ""))

    def layers(self, role):
        """Names of the layers that take part in the group as `role`, in graph order."""
        return list(dict.fromkeys(s.layer for s in self.slices if s.role == role))

    def trainable_slices(self):
        return [s for s in self.slices if s.variable.trainable]

    def norms(self):
        """Each channel's L2 norm over all its trainable coupled weights."""
        squares = sum(np.square(s.per_channel().astype(np.float64)).sum(axis=1)
                      for s in self.trainable_slices())
        return np.sqrt(squares)


@dataclasses.dataclass(frozen=True)
class DenseGroup:
    """Channels that stay dense, and why."""

    name: str
    size: int
    reason: str


@dataclasses.dataclass(frozen=True)
class Width:
    """The channel count of a tensor (its last axis): `fixed` channels that no
    prunable group holds, plus, for each `(group, repeat)` of `parts`, `repeat`
    times the channels `group` keeps."""

    fixed: int
    parts: tuple = ()

    def kept(self, kept):
        """The count when `kept(group)` channels of each group stay."""
        return self.fixed + sum(repeat * kept(group) for group, repeat in self.parts)


@dataclasses.dataclass(frozen=True)
class ChannelStructure:
    """`groups` that can lose channels and `dense` ones that cannot;
    `reshapes`: names of the `Reshape` layers channels pass through, whose
    target shape names the channel count; `pinned`: `(layer, config key,
    value)` of sizes Keras would otherwise infer from a shrunk input;
    `widths`: for each layer called once, `(inputs, output)`: the `Width`s of
    its input tensors and of its first output; `blocks`: the residual blocks
    (`blocks.ResidualBlock`) that can go whole, when one of their own groups
    loses every channel (with `floor=0`)."""

    groups: tuple
    dense: tuple
    reshapes: tuple = ()
    pinned: tuple = ()
    widths: dict = dataclasses.field(default_factory=dict, compare=False)
    blocks: tuple = ()

    def __str__(self):
        lines = [f"{len(self.groups)} channel groups can be pruned, {len(self.dense)} stay dense, "
                 f"{len(self.blocks)} residual blocks can go whole"]
        lines += [f"  {g.name}: {g.size} channels, {len(g.slices)} weight slices" for g in self.groups]
        lines += [f"  kept dense: {d.name} ({d.size}): {d.reason}" for d in self.dense]
        lines += [f"  block '{b.add}' can go: its branch of {len(b.branch)} layers holds "
                  f"{', '.join(g.name for g in b.groups)}" for b in self.blocks]
        return "\n".join(lines)


class _Space:
    """Union-find node: a run of channels and everything that touches them."""

    def __init__(self, size, name):
        self.size, self.name, self.parent = size, name, self
        self.slices, self.reasons = [], []
        self.parts = []  # once split: the spaces that now hold its channels, in order

    def root(self):
        while self.parent is not self.parent.parent:
            self.parent = self.parent.parent
        return self.parent


@dataclasses.dataclass(frozen=True)
class _Block:
    """Part of a tensor's last axis: position `p * width + offset(space) + c`
    holds channel c of each space, for p in range(repeat)."""

    spaces: tuple
    repeat: int = 1

    @property
    def width(self):
        return sum(s.size for s in self.spaces)


class _Tracer:
    """The channel layout (a tuple of `_Block`s) of every tensor seen so far."""

    def __init__(self):
        self.layouts, self.spaces, self.reshapes, self.pinned = {}, [], [], []
        self.calls = []  # (layer name, input tensors, first output) of layers called once

    def space(self, size, name, reason=None):
        space = _Space(int(size), name)
        if reason:
            space.reasons.append(reason)
        self.spaces.append(space)
        return space

    def fresh(self, tensor, name, reason):
        size = tensor.shape[-1] if tensor.shape else 1
        return (_Block((self.space(size or 0, name, reason),)),)

    def layout(self, tensor):
        return self.expanded(self.layouts[id(tensor)])

    def set(self, tensor, layout):
        self.layouts[id(tensor)] = _joined(layout)

    def block(self, layout, reason):
        for b in layout:
            for s in b.spaces:
                s.root().reasons.append(reason)

    def add_slices(self, layout, variable, axis, layer, role, size_key=None):
        """Ties `variable`'s positions along `axis` to the channels of `layout`."""
        offset = 0
        for b in layout:
            seg = 0
            for s in b.spaces:
                rows = (offset + seg + np.arange(s.size)[:, None]
                        + b.width * np.arange(b.repeat)[None, :])
                s.root().slices.append(Slice(variable, axis, rows, layer, role, size_key))
                seg += s.size
            offset += b.width * b.repeat

    def union(self, a, b):
        a, b = a.root(), b.root()
        if a is not b:
            b.parent = a
            a.slices += b.slices
            a.reasons += b.reasons

    def leaves(self, space):
        """The unsplit spaces that hold `space`'s channels, in order."""
        root = space.root()
        return [leaf for part in root.parts for leaf in self.leaves(part)] if root.parts else [root]

    def expanded(self, layout):
        return tuple(_Block(tuple(l for s in b.spaces for l in self.leaves(s)), b.repeat)
                     for b in layout)

    def split(self, space, sizes):
        """Splits `space` into runs of `sizes` channels; its slices go with their rows."""
        root = space.root()
        start = 0
        for size in sizes:
            part = self.space(size, root.name)
            part.reasons = list(root.reasons)
            part.slices = [dataclasses.replace(s, rows=s.rows[start:start + size]) for s in root.slices]
            root.parts.append(part)
            start += size
        root.slices = []

    def refine(self, layouts):
        """`layouts` (same blocks, repeats and widths) split to common boundaries."""
        for i in range(len(layouts[0])):
            cuts = sorted({c for l in layouts for c in _boundaries(l[i])})
            for l in layouts:
                start = 0
                for space in l[i].spaces:
                    inner = [c - start for c in cuts if start < c < start + space.size]
                    if inner:
                        edges = [0, *inner, space.size]
                        self.split(space, [b - a for a, b in zip(edges, edges[1:])])
                    start += space.size
        return [self.expanded(l) for l in layouts]

    def result(self):
        groups, dense, found = [], [], {}
        for space in self.spaces:
            root = space.root()
            if id(root) in found or root.parts:
                continue
            found[id(root)] = group = ChannelGroup(root.size, tuple(root.slices))
            reason = (root.reasons[0] if root.reasons else
                      "no convolution or Dense layer produces these channels"
                      if not group.layers(PRODUCES) else
                      "a single channel" if root.size < 2 else None)
            if reason:
                dense.append(DenseGroup(group.name if group.layers(PRODUCES) else root.name,
                                        root.size, reason))
            else:
                groups.append(group)
        prunable = {id(g) for g in groups}
        widths = {name: (tuple(self._width(t, found, prunable) for t in inputs), self._width(out, found, prunable))
                  for name, inputs, out in self.calls}
        return ChannelStructure(tuple(groups), tuple(dense), tuple(self.reshapes), tuple(self.pinned), widths)

    def _width(self, tensor, found, prunable):
        fixed, parts = 0, []
        for block in self.layout(tensor):
            for leaf in block.spaces:
                group = found[id(leaf.root())]
                if id(group) in prunable:
                    parts.append((group, block.repeat))
                else:
                    fixed += leaf.size * block.repeat
        return Width(fixed, tuple(parts))


def _joined(layout):
    """`layout` with neighbouring unrepeated blocks made one, so equal layouts compare equal."""
    blocks = []
    for b in layout:
        if blocks and b.repeat == 1 and blocks[-1].repeat == 1:
            blocks[-1] = _Block(blocks[-1].spaces + b.spaces)
        else:
            blocks.append(b)
    return tuple(blocks)


def _opaque(why):
    def rule(tracer, node, kind=None):
        op = node.operation
        reason = f"read by '{op.name}' ({type(op).__name__}), {why}"
        for t in node.inputs:
            tracer.block(tracer.layout(t), reason)
        for t in node.outputs:
            tracer.set(t, tracer.fresh(t, op.name, f"made by '{op.name}' ({type(op).__name__}), {why}"))
    return rule


_UNKNOWN = _opaque("which is not known to keep channels apart")


def _only_input(node):
    return node.inputs[0]


def _channels_last(layer):
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def _project(tracer, layer, layout, kernel, axes, bias, size_key):
    """A projection: `kernel` reads the channels of `layout` along `axes[0]`
    and makes new ones along `axes[1]`, with `bias` (or None) per new
    channel along its last axis. Returns the new channels' layout."""
    tracer.add_slices(layout, kernel, axes[0], layer.name, CONSUMES)
    out = (_Block((tracer.space(kernel.shape[axes[1]], layer.name),)),)
    tracer.add_slices(out, kernel, axes[1], layer.name, PRODUCES, size_key)
    if bias is not None:
        tracer.add_slices(out, bias, len(bias.shape) - 1, layer.name, PASSES)
    return out


def _per_channel(layer, kind):
    """`(variable, axis)` of `layer`'s weights that hold one entry per channel passing through."""
    found = [(getattr(layer, name, None), axis) for name, axis in kind.per_channel]
    return [(v, axis % len(v.shape)) for v, axis in found if v is not None]


def _projection(tracer, node, kind):
    """Conv, Dense, EinsumDense and separable convolutions: consume the input's
    channels (a separable convolution's depthwise step passes them first),
    produce new ones. An activation that mixes channels (a softmax) mixes only
    the new ones."""
    layer = node.operation
    p = kind.projection(layer)
    kernel = getattr(layer, p.kernel)
    rank = len(kernel.shape)
    bias = getattr(layer, p.bias, None) if p.bias else None
    layout = tracer.layout(_only_input(node))
    for variable, axis in _per_channel(layer, kind):
        tracer.add_slices(layout, variable, axis, layer.name, PASSES)
    out = _project(tracer, layer, layout, kernel, (p.read % rank, p.made % rank), bias, p.size_key)
    if _mixing_activation(layer, kernel.shape[p.made]):
        tracer.block(out, f"made by '{layer.name}' ({type(layer).__name__}), whose activation "
                          "mixes channels")
    tracer.set(node.outputs[0], out)


def _attention(tracer, node, kind):
    """MultiHeadAttention: query, key and value projections consume their
    inputs' channels and make `num_heads` heads, which the output projection
    consumes (a head is all its query, key and value columns, and its rows of
    the output kernel); the output projection makes new channels."""
    layer = node.operation
    reads = list(zip((layer.query_dense, layer.key_dense, layer.value_dense), attention_inputs(node)))
    for t in node.inputs:
        if not any(t is x for _, x in reads):
            tracer.block(tracer.layout(t), f"read by '{layer.name}' (MultiHeadAttention) as a mask")
    heads = (_Block((tracer.space(layer.num_heads, layer.name),)),)
    for dense, x in reads:
        tracer.add_slices(tracer.layout(x), dense.kernel, 0, layer.name, CONSUMES)
        tracer.add_slices(heads, dense.kernel, 1, layer.name, PRODUCES, "num_heads")
        if dense.bias is not None:
            tracer.add_slices(heads, dense.bias, 0, layer.name, PASSES)
    output = layer.output_dense
    out = _project(tracer, layer, heads, output.kernel, (0, 2), output.bias, "output_shape")
    # Without `output_shape` the width would follow the (maybe shrunk) query.
    tracer.pinned.append((layer.name, "output_shape", int(output.kernel.shape[-1])))
    tracer.set(node.outputs[0], out)


def attention_inputs(node):
    """`(query, key, value)`: the tensors a MultiHeadAttention call (`node`) reads
    with its query, key and value projections (the key is the value when not given)."""
    given = node.arguments()
    key = given.get("key")
    return given["query"], given["value"] if key is None else key, given["value"]


def _feedforward(tracer, node, kind):
    """KerasHub's TransformerEncoder: its width stays dense (its
    LayerNormalizations mix it); its feed-forward units are a group inside it.
    Its heads are not: it sizes each as the width over `num_heads`."""
    layer = node.operation
    _opaque("a transformer block whose width its LayerNormalizations mix")(tracer, node)
    inner, outer = _compat.kerashub_feedforward(layer)
    units = (_Block((tracer.space(inner.units, f"{layer.name} feed-forward"),)),)
    tracer.add_slices(units, inner.kernel, 1, layer.name, PRODUCES, "intermediate_dim")
    if inner.bias is not None:
        tracer.add_slices(units, inner.bias, 0, layer.name, PASSES)
    tracer.add_slices(units, outer.kernel, 0, layer.name, CONSUMES)
    where = f"inside '{layer.name}' (TransformerEncoder), "
    if _mixing_activation(inner, inner.units):
        tracer.block(units, where + "whose feed-forward activation mixes units")
    if not all(isinstance(d.kernel, keras.Variable) for d in (inner, outer)):
        tracer.block(units, where + "whose feed-forward kernels are not plain variables")


def _pass(tracer, node, kind):
    """Per-channel layers: the output has the input's channels; the layer's
    per-channel weights (`kind.per_channel`) go with them."""
    layout = tracer.layout(_only_input(node))
    per_channel = _per_channel(node.operation, kind)
    if per_channel and any(b.repeat > 1 for b in layout):
        return _opaque("whose weights see flattened channels")(tracer, node)
    for variable, axis in per_channel:
        tracer.add_slices(layout, variable, axis, node.operation.name, PASSES)
    tracer.set(node.outputs[0], layout)


def _boundaries(block):
    edges, start = set(), 0
    for space in block.spaces:
        start += space.size
        edges.add(start)
    return edges


def _merge(tracer, node, kind=None):
    """Elementwise merges (and, with one input, elementwise operations): inputs
    of one channel broadcast; the others' channels are tied one to one (split
    where their groups are cut differently)."""
    layouts = [tracer.layout(t) for t in node.inputs]
    wide = [l for l in layouts if sum(b.width * b.repeat for b in l) > 1]
    if not wide:
        return tracer.set(node.outputs[0], layouts[0])
    shape = [(b.repeat, b.width) for b in wide[0]]
    if any([(b.repeat, b.width) for b in l] != shape for l in wide[1:]):
        return _opaque("whose inputs' channels are laid out differently")(tracer, node)
    wide = tracer.refine(wide)
    for other in wide[1:]:
        for a, b in zip(wide[0], other):
            for sa, sb in zip(a.spaces, b.spaces):
                tracer.union(sa, sb)
    tracer.set(node.outputs[0], wide[0])


def _concatenate(tracer, node, kind):
    rank = len(node.outputs[0].shape)
    if node.operation.axis not in (-1, rank - 1):
        return _merge(tracer, node)
    layouts = [tracer.layout(t) for t in node.inputs]
    tracer.set(node.outputs[0], tuple(b for l in layouts for b in l))


def _flatten(tracer, node, kind):
    x = _only_input(node)
    layout = tracer.layout(x)
    if len(x.shape) <= 2:
        return tracer.set(node.outputs[0], layout)
    positions = int(np.prod(x.shape[1:-1]))
    if any(b.repeat > 1 for b in layout) or not _channels_last(node.operation):
        return _opaque("which flattens channels in an order not followed here")(tracer, node)
    tracer.set(node.outputs[0], (_Block(tuple(s for b in layout for s in b.spaces), positions),))


def _reshape(tracer, node, kind):
    """Only reshapes that add or drop dimensions of size 1 keep channels in place."""
    x, y = _only_input(node), node.outputs[0]
    if x.shape[-1] == y.shape[-1] and all(d == 1 for d in (*x.shape[1:-1], *y.shape[1:-1])):
        tracer.reshapes.append(node.operation.name)
        return tracer.set(y, tracer.layout(x))
    return _opaque("which moves channels")(tracer, node)


def _mixing_activation(layer, channels):
    """True if `layer`'s activation may mix its `channels` channels: a softmax,
    or any function that running it shows is not elementwise."""
    activation = getattr(layer, "activation", None)
    if activation is None or activation is keras.activations.linear:
        return False
    known = (keras.activations.softmax, keras.activations.log_softmax, keras.activations.sparsemax)
    return activation in known or not probe.elementwise(activation, channels or 2)


_FLOWS = {Flow.PROJECTS: _projection, Flow.PASSES: _pass, Flow.MERGES: _merge,
          Flow.CONCATENATES: _concatenate, Flow.FLATTENS: _flatten, Flow.RESHAPES: _reshape,
          Flow.ATTENDS: _attention, Flow.FEEDFORWARD: _feedforward}


def _problem(layer, kind, node):
    """Why a call of `layer`, of a `kind` that `follows` it, cannot be followed, or None."""
    if kind.flow is Flow.FEEDFORWARD:
        return None
    if not _channels_last(layer):
        return "which is channels_first"
    if getattr(layer, "groups", 1) != 1:
        return "a grouped convolution"
    if getattr(layer, "depth_multiplier", 1) != 1:
        return f"a {type(layer).__name__} with depth_multiplier > 1"
    if not all(isinstance(getattr(layer, name), keras.Variable) for name in kind.prunable if hasattr(layer, name)):
        return "whose kernel is not a plain variable (LoRA or quantized)"
    if kind.flow is Flow.PROJECTS:
        return "whose equation moves channels" if kind.projection(layer) is None else None
    if _mixing_activation(layer, _only_input(node).shape[-1] if node.inputs else None):
        return "whose activation mixes channels"
    if kind.flow is Flow.ATTENDS:
        return _attention_problem(layer)
    axis = getattr(layer, "axis", None) if kind.per_channel else None
    if axis is not None and axis not in (-1, len(_only_input(node).shape) - 1):
        return "which normalises another axis"
    return None


def _attention_problem(layer):
    """Why MultiHeadAttention `layer`'s heads cannot be followed, or None."""
    config = layer.get_config()
    if config.get("use_gate"):
        return "a gated MultiHeadAttention"
    shape = config.get("output_shape")
    if shape is not None and not isinstance(shape, int) and len(shape) != 1:
        return "a MultiHeadAttention with a multi-dimensional output_shape"
    kernels = (layer.query_dense, layer.key_dense, layer.value_dense, layer.output_dense)
    if any(not isinstance(d.kernel, keras.Variable) or len(d.kernel.shape) != 3 for d in kernels):
        return "a MultiHeadAttention whose kernels are not plain 3-D variables"
    return None


def _rule(node):
    """The rule for one layer call, from the layer's kind (`layer_kinds`) and
    settings; a weightless operation of no listed kind is probed."""
    layer = node.operation
    kind = layer_kinds.kind_of(layer)
    if kind is None or kind.flow is None or not kind.follows(layer):
        if not _channels_last(layer):
            return _opaque("which is channels_first")
        if _mixing_activation(layer, _only_input(node).shape[-1] if node.inputs else None):
            return _opaque("whose activation mixes channels")
        return _merge if probe.keeps_channels_apart(node) else _UNKNOWN
    problem = _problem(layer, kind, node)
    return _opaque(problem) if problem else functools.partial(_FLOWS[kind.flow], kind=kind)


def channel_groups(model):
    """The coupled channel groups of Sequential or Functional `model`, as a
    `ChannelStructure`: the groups that can lose channels, and the ones that
    stay dense with the reason. Raises ValueError for any other model."""
    nodes = _compat.graph_nodes(model)
    if nodes is None or not isinstance(model, keras.Model):
        raise ValueError(
            f"Channel structure is read from a layer graph: '{getattr(model, 'name', model)}' "
            f"({type(model).__name__}) is not a built Sequential or Functional model. Build "
            "it with keras.Input, or rebuild a subclassed model functionally.")
    tracer = _Tracer()
    for t in model.inputs:
        tracer.set(t, tracer.fresh(t, _compat.producer(t).name, "the model's input"))
    calls = collections.Counter(id(n.operation) for n in nodes)
    for node in nodes:
        layer = node.operation
        rule = _opaque("a layer called more than once") if calls[id(layer)] > 1 else _rule(node)
        if len(node.outputs) != 1 and rule is not _UNKNOWN:
            rule = _opaque("with several outputs")
        rule(tracer, node)
        if calls[id(layer)] == 1 and node.outputs:
            tracer.calls.append((layer.name, node.inputs, node.outputs[0]))
    for t in model.outputs:
        tracer.block(tracer.layout(t), "a model output")
    found = tracer.result()
    return dataclasses.replace(found, blocks=residual_blocks(model, found.groups))
