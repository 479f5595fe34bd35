"""The latency model: what a model's channel groups cost in time, measured in the runtime it ships to.

The model is timed as it will run: BatchNorm folded into the layer before it
(as `shrink(fold_batchnorm=True)` and the LiteRT converter do). Each layer
call is rebuilt alone, at the model's own input size and the budget's batch
size, with the weightless per-channel calls a runtime fuses into it
(activations, the `Add` of a residual stream), at a few widths of the
channels of prunable groups it reads and writes, and timed by the `timing`
timer of the runtime:

- a layer that makes new channels from others (convolutions, Dense) at
  100%, 50% and 25% of its input's channels by the same of its output's:
  nine timings;
- a layer whose input and output are one width (activations, padding,
  pooling, `Add`, depthwise convolutions), or with only one width that
  changes, at 100%, 50% and 25% of it;
- any other layer (several inputs of different groups, such as a
  `Concatenate` or an attention layer, or one that cannot be rebuilt at
  another width) at its own width only: its time then counts as fixed.

Widths are whole multiples of the budget's `round_to`. The timings of each
call make a table, interpolated between them (`latency_tables`): exact where
the pruned widths land on a timing, in numpy and inside the training step.
Each probe's time includes the runtime's cost of one call (dispatch, the
result handed back), which a model pays once, not once per layer: it is
measured on a model that does next to nothing, taken off every probe and
counted once. The whole model is timed as well, and the layers' tables are
scaled so that their sum, plus that one call, is its time: what the layers
alone miss (the caches one layer leaves to the next, work the runtime
overlaps) in proportion. The timings are cached (`latency_cache`).
"""

import dataclasses
import json
import time

import keras
import numpy as np

from dg2pf_tf import _compat
from dg2pf_tf.channels import latency_cache, latency_tables, timing
from dg2pf_tf.channels.latency_tables import PICOSECONDS
from dg2pf_tf.model import clone, fold, layer_kinds
from dg2pf_tf.model.layer_kinds import Flow

_LINE = (1.0, 0.5, 0.25)
_GRID = tuple((x, y) for x in _LINE for y in _LINE)
WHOLE = "whole model"  # key of its measurement beside the probes'
IDLE = tuple(f"idle call {i}" for i in range(3))  # the median of three is one call's overhead


@dataclasses.dataclass
class _Call:
    """Layer calls timed together: `node` and the weightless per-channel calls that
    follow it (`chain`: activations, an `Add` of the residual stream, the Identity
    of a folded BatchNorm), which runtimes fuse into it. `inputs`: the `graph.Width`s
    of `node`'s inputs (None where unknown); `output`: of the chain's output; `points`:
    the (input, output) fractions of their channels it is timed at."""

    node: object
    inputs: tuple
    output: object
    points: tuple
    chain: list = dataclasses.field(default_factory=list)
    probes: list = dataclasses.field(default_factory=list)  # (key, model) per point

    @property
    def name(self):
        return self.node.operation.name


def _varies(width, axis_of):
    """Whether `width` holds channels of a prunable group (`axis_of`: their ids)."""
    return width is not None and any(id(group) in axis_of for group, _ in width.parts)


def _points(inputs, output, axis_of):
    """The (input, output) fractions to time a call at: see the module docstring."""
    varying = {w for w in inputs if _varies(w, axis_of)}
    if len(varying) > 1:
        return ((1.0, 1.0),)
    if varying and _varies(output, axis_of) and varying != {output}:
        return _GRID
    if varying or _varies(output, axis_of):
        return tuple((f, f) for f in _LINE)
    return ((1.0, 1.0),)


def _kept(width, fraction, round_to, axis_of):
    """The channel count of `width` with `fraction` of each prunable group's channels
    kept: a multiple of `round_to` (at least one such), or the group's own size."""
    def kept(group):
        if fraction == 1.0 or group.size <= round_to or id(group) not in axis_of:
            return group.size
        return max(round_to, round_to * round(fraction * group.size / round_to))
    return width.kept(kept)


def _probe(call, fraction_in, fraction_out, batch, round_to, axis_of):
    """`(key, model)`: the calls of `call` alone at the given fractions of their
    prunable channels, and its cache key."""
    layer = call.node.operation
    y = None if call.output is None else _kept(call.output, fraction_out, round_to, axis_of)
    if (fraction_in, fraction_out) == (1.0, 1.0):
        fresh = layer  # our own folded copy: calling it again changes no model the user holds
    else:
        config = layer.get_config()
        kind = layer_kinds.kind_of(layer)
        projection = kind.projection(layer) if kind and kind.flow is Flow.PROJECTS and kind.projection else None
        if projection is not None:
            config[projection.size_key] = clone.resized(config[projection.size_key], y)
        fresh = type(layer).from_config(config)
    made, inputs = {}, []

    def new(tensor, width, fraction):
        if id(tensor) not in made:
            size = tensor.shape[-1] if width is None else _kept(width, fraction, round_to, axis_of)
            made[id(tensor)] = keras.Input(batch_shape=(batch, *tensor.shape[1:-1], size), dtype=tensor.dtype)
            inputs.append(made[id(tensor)])
        return made[id(tensor)]

    def call_with(op, node, widths, fraction):
        known = iter(widths)
        args, kwargs = keras.tree.map_structure(
            lambda t: (made[id(t)] if id(t) in made else new(t, next(known, None), fraction))
            if isinstance(t, keras.KerasTensor) else t, (node.args, node.kwargs))
        out = op(*args, **kwargs)
        made[id(node.outputs[0])] = keras.tree.flatten(out)[0]
        return out

    outputs = call_with(fresh, call.node, call.inputs, fraction_in)
    for node in call.chain:  # the others' inputs are of the output's width
        outputs = call_with(node.operation, node, [call.output] * len(node.inputs), fraction_out)
    return _described([fresh] + [n.operation for n in call.chain], inputs), keras.Model(inputs, outputs)


def _described(operations, inputs):
    """A cache key of `operations` (class and config, names aside) called on `inputs`."""
    described = [[type(op).__module__, type(op).__name__,
                  {k: v for k, v in op.get_config().items() if k != "name"}] for op in operations]
    return json.dumps([described, [list(t.shape) for t in inputs]], sort_keys=True, default=str)


def _follows(node, chain_end, readers, widths, output):
    """Whether `node` joins a chain whose last output is `chain_end`: a weightless layer
    that passes or merges channels, the only reader of that output, of the same width."""
    kind = layer_kinds.kind_of(node.operation)
    return (kind is not None and kind.flow in (Flow.PASSES, Flow.MERGES) and not node.operation.weights
            and readers.get(id(chain_end)) == [node] and len(node.outputs) == 1
            and node.operation.name in widths and widths[node.operation.name][1] == output)


def _plan(folded, widths, batch, round_to, axis_of):
    """The `_Call`s of `folded`, each with its probes (widths of the prunable groups,
    `axis_of`, in multiples of `round_to`), and the names of the calls that could
    not be rebuilt at other widths (timed at their own)."""
    nodes = [n for n in _compat.graph_nodes(folded) if n.inputs]
    readers = {}
    for node in nodes:
        for t in node.inputs:
            readers.setdefault(id(t), []).append(node)
    calls, fixed, taken = [], [], set()
    for node in nodes:
        if id(node) in taken:
            continue
        inputs, output = widths.get(node.operation.name, ((None,) * len(node.inputs), None))
        call = _Call(node, inputs, output, _points(inputs, output, axis_of))
        end = node.outputs[0] if len(node.outputs) == 1 and output is not None else None
        while end is not None and len(readers.get(id(end), ())) == 1:
            after = readers[id(end)][0]
            if not _follows(after, end, readers, widths, output):
                break
            call.chain.append(after)
            taken.add(id(after))
            end = after.outputs[0]
        try:
            call.probes = [_probe(call, fi, fo, batch, round_to, axis_of) for fi, fo in call.points]
        except Exception:  # noqa: BLE001  (a layer that cannot be rebuilt at another width)
            call.points = ((1.0, 1.0),)
            call.probes = [_probe(call, 1.0, 1.0, batch, round_to, axis_of)]
            fixed.append(call.name)
        calls.append(call)
    return calls, fixed


def _axes(call, axis_of):
    """`(x, y)`: the `graph.Width`s along `call`'s table, its input's and its
    output's; None for one it is not timed along."""
    if len(call.points) == 1:
        return None, None
    varying = [w for w in call.inputs if _varies(w, axis_of)]
    y = call.output if _varies(call.output, axis_of) else None
    return (varying[0] if varying and (y is None or call.points == _GRID) else None), y


def _linear(width, axis_of):
    """`width` as `(fixed, [(group index, repeat), ...])` over the prunable groups."""
    if width is None:
        return 0, []
    fixed, parts = width.fixed, []
    for group, repeat in width.parts:
        if id(group) in axis_of:
            parts.append((axis_of[id(group)], repeat))
        else:
            fixed += repeat * group.size
    return fixed, parts


def _tables(calls, seconds, overhead, axis_of, round_to):
    """`(tables, x, y)` (seconds; `latency_tables.Axis` x and y) of every call, the
    cost of a call to the runtime taken off each timing."""
    tables, axes = [], {"x": ([], [], []), "y": ([], [], [])}
    for c, call in enumerate(calls):
        widths = dict(zip("xy", _axes(call, axis_of)))
        along = {a: [_kept(w, f[i], round_to, axis_of) if w else 0 for f in call.points]
                 for i, (a, w) in enumerate(widths.items())}
        times = [max(seconds[key] - overhead, 0.0) for key, _ in call.probes]
        x_nodes, y_nodes, table = latency_tables.table(along["x"], along["y"], times)
        tables.append(table)
        for a, nodes in (("x", x_nodes), ("y", y_nodes)):
            fixed, parts = _linear(widths[a], axis_of) if widths[a] else (nodes[-1], [])
            axes[a][0].append(fixed)
            axes[a][1].extend((c, g, r) for g, r in parts)
            axes[a][2].append(nodes)
    return np.array(tables), *(latency_tables.Axis(*axes[a]) for a in "xy")


def _progress(name, total):
    step = max(1, total // 10)

    def show(done, _):
        if done % step == 0 or done == total:
            print(f"[dg2pf] latency of '{name}': timed {done}/{total}", flush=True)
    return show


def _fixed_batch(model, batch):
    return keras.tree.map_structure(
        lambda t: keras.Input(batch_shape=(batch, *t.shape[1:]), dtype=t.dtype), model.input)


def _check_input_size(model):
    for t in model.inputs:
        if any(d is None for d in t.shape[1:]):
            raise ValueError(
                f"budget='latency' times model '{model.name}' at its input size, and its input "
                f"'{t.name}' has shape {tuple(t.shape)}. Build it for a fixed size "
                f"(keras.Input((224, 224, 3)), or input_shape= for keras.applications).")


def _idle(batch):
    """A model that does next to nothing (a ReLU over 8 numbers): its time is the runtime's cost of a call."""
    return keras.Sequential([keras.Input(batch_shape=(batch, 8)), keras.layers.ReLU()], name="idle")


def _measure(model, folded, calls, budget, timer):
    """Seconds of every probe, of the whole model (`WHOLE`) and of three calls that
    do nothing (`IDLE`): from the cache, or timed and cached."""
    probes = {key: probe for call in calls for key, probe in call.probes}
    key = latency_cache.cache_key([*probes, WHOLE, *IDLE], budget)
    seconds = latency_cache.load_cached(key, budget)
    if seconds is not None:
        return seconds, True
    print(f"[dg2pf] measuring the latency of '{model.name}' in {budget}: {len(probes)} layer "
          f"variants and the whole model", flush=True)
    models = [*probes.values(), clone.copy(folded, inputs=_fixed_batch(folded, budget.batch_size)),
              *(_idle(budget.batch_size) for _ in IDLE)]
    timed = (timer or timing.timer(budget)).seconds(models, _progress(model.name, len(models)))
    seconds = dict(zip([*probes, WHOLE, *IDLE], timed))
    latency_cache.store(key, budget, seconds)
    return seconds, False


def measured_share(dense, shrunk, budget, runs=7):
    """The time of `shrunk` as a share of `dense`'s (built Keras models of one input
    size) in `budget`'s runtime, the two timed interleaved (`runs` rounds, medians),
    or read from the cache where the same pair was timed on this machine."""
    models = [clone.copy(m, inputs=_fixed_batch(m, budget.batch_size)) for m in (dense, shrunk)]
    names = [_described([n.operation for n in _compat.graph_nodes(m) if n.inputs], m.inputs) for m in models]
    key = latency_cache.cache_key(["a shrunk model against the dense one", *names], budget)
    seconds = latency_cache.load_cached(key, budget)
    if seconds is None:
        timed = timing.timer(budget, runs).seconds(models)
        seconds = dict(zip(("dense", "shrunk"), timed))
        latency_cache.store(key, budget, seconds)
    return seconds["shrunk"] / seconds["dense"]


def _calibration(whole, overhead, layers):
    """`(scale, offset)`: the layers' sum (`layers`, the overhead taken off) times
    `scale`, plus `offset` (one call's overhead), is the `whole` model's time. A
    whole model no slower than an idle call (a clock too coarse) is all scale."""
    if layers <= 0:  # every layer as fast as an idle call: the model is its overhead
        return 1.0, whole
    if whole > overhead:
        return (whole - overhead) / layers, overhead
    return whole / layers, 0.0


def latency_costs(model, prunable, budget, timer=None):
    """The `latency_tables.LatencyCosts` of `model` under `budget` (a
    `settings.Latency`), over the channels of `prunable`'s groups (a
    `groups.Prunable`), numbered group after group. Measures, or reads the
    cache; prints progress.

    Raises ValueError for an input of unknown size; ImportError for runtime
    'litert' without ai-edge-litert.
    """
    _check_input_size(model)
    start = time.perf_counter()
    folded = fold.fold_batchnorm(model)[0]
    axis_of = {id(g): i for i, g in enumerate(prunable.groups)}
    calls, fixed = _plan(folded, prunable.widths, budget.batch_size, budget.round_to, axis_of)
    seconds, cached = _measure(model, folded, calls, budget, timer)
    overhead = float(np.median([seconds[k] for k in IDLE]))
    tables, x, y = _tables(calls, seconds, overhead, axis_of, budget.round_to)
    layers = float(tables[:, -1, -1].sum())
    scale, offset = _calibration(seconds[WHOLE], overhead, layers)
    found = latency_tables.LatencyCosts(tables * scale * PICOSECONDS, x, y, [g.size for g in prunable.groups],
                                        offset * PICOSECONDS, budget)
    found.measured, found.layers, found.fixed_layers, found.cached = seconds[WHOLE], layers, fixed, cached
    if not cached:
        print(f"[dg2pf] latency of '{model.name}': {seconds[WHOLE] * 1e3:.2f} ms whole, its layers "
              f"alone {layers * 1e3:.2f} ms and {overhead * 1e3:.3f} ms a call; "
              f"measured in {time.perf_counter() - start:.0f} s", flush=True)
    return found
