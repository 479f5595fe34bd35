"""The latency model: what a model's channel groups cost in time, measured in the runtime it ships to.

The model is timed as it will run: BatchNorm folded into the layer before it
(as `shrink(fold_batchnorm=True)` and the LiteRT converter do). Each layer
call is rebuilt alone, at the model's own input size and the budget's batch
size, at a few widths of the channels it reads and writes, and timed by the
`timing` timer of the runtime:

- a layer whose input and output widths are one and the same (activations,
  padding, pooling, `Add`, depthwise convolutions) at 100%, 50% and 25% of its
  channels, fitted as `a + c * width`;
- a layer that makes new channels from others (convolutions, Dense) at five
  points of (input, output) width from (25%, 25%) to (100%, 100%), fitted as
  `a + b * in + c * out + d * in * out` with no negative coefficient: its
  memory traffic per channel, and its compute per pair of channels;
- a layer with only one width that changes: that one, as the first case;
- any other layer (several inputs of different groups, such as a
  `Concatenate` or an attention layer, or one that cannot be rebuilt at
  another width) at its own width only: its time then counts as fixed.

Each group's width enters those fits through the `graph.Width` of the tensors,
so the model's time is a sum of terms `constant * kept(g) * kept(h)`: a
`costs.CostModel` (in picoseconds), exact for any set of removed channels, in
numpy and inside the training step. Each probe's time includes the runtime's
cost of one call (dispatch, the result handed back), which a model pays once,
not once per layer: it is measured on a model that does next to nothing,
taken off every probe before the fits and counted once. The whole model is
timed as well, and the layers' terms are scaled so that their sum, plus that
one call, is its time: what the layers alone miss (the caches one layer leaves
to the next, work the runtime overlaps) in proportion.

The measurements are kept on disk, keyed by the layers (class, config and input
shape of each), the runtime, batch size, threads, the CPU model and the
TensorFlow, Keras and LiteRT versions; any other file is measured anew, never used.
"""

import dataclasses
import hashlib
import json
import os
import platform
import time
import warnings

import keras
import numpy as np

from dg2pf_tf import _compat
from dg2pf_tf.channels import costs, timing
from dg2pf_tf.model import clone, fold, layer_kinds
from dg2pf_tf.model.layer_kinds import Flow

PICOSECONDS = 1e12
FORMAT = 1  # of the cache files
_LINE = (1.0, 0.5, 0.25)
_GRID = ((1.0, 1.0), (1.0, 0.5), (0.5, 1.0), (0.5, 0.5), (0.25, 0.25))
WHOLE, OVERHEAD = "whole model", "one idle call"  # keys of the measurements beside the probes


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
    probes: list = dataclasses.field(default_factory=list)  # (key, model, x, y) per point

    @property
    def name(self):
        return self.node.operation.name


def _varies(width):
    return width is not None and bool(width.parts)


def _points(inputs, output):
    """The (input, output) fractions to time a call at: see the module docstring."""
    varying = {w for w in inputs if _varies(w)}
    if len(varying) > 1:
        return ((1.0, 1.0),)
    if varying and _varies(output) and varying != {output}:
        return _GRID
    if varying or _varies(output):
        return tuple((f, f) for f in _LINE)
    return ((1.0, 1.0),)


def _kept(width, fraction, round_to=1):
    """The channel count of `width` with `fraction` of each group's channels kept: a
    multiple of `round_to` (at least one such), or the group's own size."""
    def kept(group):
        if fraction == 1.0 or group.size <= round_to:
            return group.size
        return max(round_to, round_to * round(fraction * group.size / round_to))
    return width.kept(kept)


def _probe(call, fraction_in, fraction_out, batch, round_to=1):
    """`(key, model, x, y)`: the calls of `call` alone at the given fractions of their
    channels, its cache key, and the input and output widths it has."""
    layer = call.node.operation
    y = None if call.output is None else _kept(call.output, fraction_out, round_to)
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
            size = tensor.shape[-1] if width is None else _kept(width, fraction, round_to)
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
    model = keras.Model(inputs, outputs)
    described = [[type(op).__module__, type(op).__name__,
                  {k: v for k, v in op.get_config().items() if k != "name"}]
                 for op in [fresh] + [n.operation for n in call.chain]]
    key = json.dumps([described, [list(t.shape) for t in inputs]], sort_keys=True, default=str)
    return key, model, int(inputs[0].shape[-1] or 0), int(keras.tree.flatten(outputs)[0].shape[-1] or 0)


def _follows(node, chain_end, readers, widths, output):
    """Whether `node` joins a chain whose last output is `chain_end`: a weightless layer
    that passes or merges channels, the only reader of that output, of the same width."""
    kind = layer_kinds.kind_of(node.operation)
    return (kind is not None and kind.flow in (Flow.PASSES, Flow.MERGES) and not node.operation.weights
            and readers.get(id(chain_end)) == [node] and len(node.outputs) == 1
            and node.operation.name in widths and widths[node.operation.name][1] == output)


def _plan(folded, widths, batch, round_to=1):
    """The `_Call`s of `folded`, each with its probes (widths in multiples of
    `round_to`), and the names of the calls that could not be rebuilt at other
    widths (timed at their own)."""
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
        call = _Call(node, inputs, output, _points(inputs, output))
        end = node.outputs[0] if len(node.outputs) == 1 and output is not None else None
        while end is not None and len(readers.get(id(end), ())) == 1:
            after = readers[id(end)][0]
            if not _follows(after, end, readers, widths, output):
                break
            call.chain.append(after)
            taken.add(id(after))
            end = after.outputs[0]
        try:
            call.probes = [_probe(call, fi, fo, batch, round_to) for fi, fo in call.points]
        except Exception:  # noqa: BLE001  (a layer that cannot be rebuilt at another width)
            call.points = ((1.0, 1.0),)
            call.probes = [_probe(call, 1.0, 1.0, batch)]
            fixed.append(call.name)
        calls.append(call)
    return calls, fixed


def nonnegative_fit(columns, target):
    """Least-squares coefficients of `columns` ([n, p], p small) for `target` with none
    below 0: the best over every subset of columns whose own fit is non-negative."""
    best, error = np.zeros(columns.shape[1]), np.inf
    scale = np.maximum(np.abs(columns).max(axis=0), 1e-30)
    for subset in range(1, 2 ** columns.shape[1]):
        use = [j for j in range(columns.shape[1]) if subset >> j & 1]
        found = np.linalg.lstsq(columns[:, use] / scale[use], target, rcond=None)[0] / scale[use]
        if np.all(found >= 0):
            residual = float(np.sum((columns[:, use] @ found - target) ** 2))
            if residual < error - 1e-30:
                best, error = np.zeros(columns.shape[1]), residual
                best[use] = found
    return best


def _fit(call, seconds):
    """`(a, b, c, d)` of `a + b * in + c * out + d * in * out` for `call`'s timings,
    the cost of a call to the runtime (`seconds[OVERHEAD]`) taken off."""
    x = np.array([p[2] for p in call.probes], float)
    y = np.array([p[3] for p in call.probes], float)
    t = np.maximum(np.array([seconds[p[0]] for p in call.probes]) - seconds[OVERHEAD], 0.0)
    if len(t) == 1:
        return np.array([t[0], 0.0, 0.0, 0.0])
    if call.points == _GRID:
        return nonnegative_fit(np.stack([np.ones_like(x), x, y, x * y], 1), t)
    along = y if _varies(call.output) else x
    a, c = nonnegative_fit(np.stack([np.ones_like(along), along], 1), t)
    return np.array([a, 0.0, c, 0.0]) if _varies(call.output) else np.array([a, c, 0.0, 0.0])


def _linear(width, axis_of):
    """`width` as `(fixed, [(repeat, axis), ...])` over the prunable groups' axes."""
    if width is None:
        return 0, []
    fixed, parts = width.fixed, []
    for group, repeat in width.parts:
        if id(group) in axis_of:
            parts.append((repeat, axis_of[id(group)]))
        else:
            fixed += repeat * group.size
    return fixed, parts


def _terms(call, coefficients, axis_of, scale):
    """`(constant, axes)` terms (picoseconds) of `call`'s fitted time."""
    a, b, c, d = coefficients * scale * PICOSECONDS
    inputs = [w for w in call.inputs if _varies(w)]
    fx, px = _linear(inputs[0] if inputs else None, axis_of)
    fy, py = _linear(call.output if _varies(call.output) else None, axis_of)
    if not inputs:  # a constant or a time linear in the output only
        fx = call.probes[0][2]
    if not _varies(call.output):
        fy = call.probes[0][3]
    terms = [(a + b * fx + c * fy + d * fx * fy, ())]
    terms += [((b + d * fy) * r, (g,)) for r, g in px]
    terms += [((c + d * fx) * r, (g,)) for r, g in py]
    terms += [(d * r * s, (g, h)) for r, g in px for s, h in py]
    return [(int(round(k)), axes) for k, axes in terms if round(k)]


def cpu_model():
    """The CPU's model name (what the timings depend on most), or the platform's best guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions():
    try:
        from importlib.metadata import version
        litert = version("ai-edge-litert")
    except Exception:  # noqa: BLE001
        litert = None
    import tensorflow as tf
    return {"tensorflow": tf.__version__, "keras": keras.__version__, "litert": litert}


def cache_key(keys, budget):
    """What a cache file must match: the layers timed, the runtime and this machine."""
    layers = hashlib.sha256(json.dumps(sorted(keys)).encode()).hexdigest()
    return {"format": FORMAT, "layers": layers, "runtime": budget.runtime, "batch_size": budget.batch_size,
            "threads": budget.threads, "cpu": cpu_model(), "cpus": os.cpu_count(), **_versions()}


def cache_dir(budget):
    """Where `budget`'s measurements are kept."""
    if budget.cache_dir:
        return budget.cache_dir
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "dg2pf_tf", "latency")


def _cache_file(key, budget):
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return os.path.join(cache_dir(budget), f"{name}.json")


def load_cached(key, budget):
    """The timings cached for `key`, or None: no file, or one made for anything else."""
    try:
        with open(_cache_file(key, budget)) as f:
            found = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict) or found.get("key") != key or not isinstance(found.get("seconds"), dict):
        return None
    return found["seconds"]


def store(key, budget, seconds):
    """Writes the timings for `key`; warns (and goes on) where the directory cannot be written."""
    path = _cache_file(key, budget)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.{os.getpid()}.tmp"
        with open(partial, "w") as f:
            json.dump({"key": key, "seconds": seconds}, f)
        os.replace(partial, path)
    except OSError as error:
        warnings.warn(f"The latency measurements could not be cached in {os.path.dirname(path)} ({error}); "
                      f"they will be measured again next time. Set Latency(cache_dir=...) to a "
                      f"writable directory to keep them.", stacklevel=2)


class LatencyCosts(costs.CostModel):
    """A `CostModel` of measured latency (picoseconds). Also holds `measured` (seconds
    of the whole model), `layers` (the sum of its layers alone, before scaling),
    `fixed_layers` (names timed at their own width only) and `cached` (read from disk)."""

    def seconds(self, removed):
        """The predicted latency (seconds) with the channels flagged in `removed` gone."""
        return self.cost_numpy(removed) / PICOSECONDS


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
    """Seconds of every probe, of the whole model (`WHOLE`) and of a call that does
    nothing (`OVERHEAD`): from the cache, or timed and cached."""
    probes = {p[0]: p[1] for call in calls for p in call.probes}
    key = cache_key([*probes, WHOLE, OVERHEAD], budget)
    seconds = load_cached(key, budget)
    if seconds is not None:
        return seconds, True
    print(f"[dg2pf] measuring the latency of '{model.name}' in {budget}: {len(probes)} layer "
          f"variants and the whole model", flush=True)
    models = [*probes.values(), clone.copy(folded, inputs=_fixed_batch(folded, budget.batch_size)),
              _idle(budget.batch_size)]
    timed = (timer or timing.timer(budget)).seconds(models, _progress(model.name, len(models)))
    seconds = dict(zip([*probes, WHOLE, OVERHEAD], timed))
    store(key, budget, seconds)
    return seconds, False


def _calibration(whole, overhead, layers):
    """`(scale, offset)`: the layers' sum (`layers`, the overhead taken off) times
    `scale`, plus `offset` (one call's overhead), is the `whole` model's time. A
    whole model no slower than an idle call (a clock too coarse) is all scale."""
    if layers <= 0:  # every layer as fast as an idle call: the model is its overhead
        return 1.0, whole
    if whole > overhead:
        return (whole - overhead) / layers, overhead
    return whole / layers, 0.0


def latency_costs(model, prunable, total, budget, timer=None):
    """The `LatencyCosts` of `model` under `budget` (a `settings.Latency`), with
    `prunable` (`groups.Prunable`) channel groups numbered group after group
    (`total` channels). Measures, or reads the cache; prints progress.

    Raises ValueError for an input of unknown size; ImportError for runtime
    'litert' without ai-edge-litert.
    """
    _check_input_size(model)
    start = time.perf_counter()
    folded = fold.fold_batchnorm(model)[0]
    calls, fixed = _plan(folded, prunable.widths, budget.batch_size, budget.round_to)
    seconds, cached = _measure(model, folded, calls, budget, timer)
    fits = [_fit(call, seconds) for call in calls]
    sizes = [g.size for g in prunable.groups]
    starts = np.cumsum([0, *sizes[:-1]])
    channels = [np.arange(s, s + n) for s, n in zip(starts, sizes)]
    axis_of = {id(g): i for i, g in enumerate(prunable.groups)}

    def costs_at(scale, offset=0.0):
        terms = [t for f, call in zip(fits, calls) for t in _terms(call, f, axis_of, scale)]
        return LatencyCosts(channels, terms + [(int(round(offset * PICOSECONDS)), ())], total, budget)

    layers = costs_at(1.0).total_cost / PICOSECONDS
    scale, offset = _calibration(seconds[WHOLE], seconds[OVERHEAD], layers)
    found = costs_at(scale, offset)
    found.measured, found.layers, found.fixed_layers, found.cached = seconds[WHOLE], layers, fixed, cached
    if not cached:
        print(f"[dg2pf] latency of '{model.name}': {seconds[WHOLE] * 1e3:.2f} ms whole, its layers "
              f"alone {layers * 1e3:.2f} ms and {seconds[OVERHEAD] * 1e3:.3f} ms a call; "
              f"measured in {time.perf_counter() - start:.0f} s", flush=True)
    return found
