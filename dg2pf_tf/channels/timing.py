"""Timers: how long models take on this machine, in the runtime a `settings.Latency` names.

A timer's `seconds(models, progress)` runs each built Keras model (fixed input
shapes, the batch included) on random inputs: once to warm up, then `runs`
rounds over all of them, so that slow drifts of the machine touch every model
alike; the median of each model's rounds is its time. `progress(done, total)`
is called as models are timed. The clock is a parameter, so the logic is
tested without timing anything.
"""

import logging
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from dg2pf_tf import _compat


def _inputs(model, rng):
    return [rng.standard_normal([int(d) for d in t.shape]).astype(t.dtype or "float32")
            for t in model.inputs]


def _medians(calls, runs, clock, progress):
    """Median seconds of each of `calls` (no-argument functions) over `runs` rounds."""
    for done, call in enumerate(calls):
        call()  # warm up: traces, allocates
        progress(done + 1, len(calls))
    times = np.zeros((runs, len(calls)))
    for round_ in range(runs):
        for i, call in enumerate(calls):
            start = clock()
            call()
            times[round_, i] = clock() - start
    return [float(t) for t in np.median(times, axis=0)]


class KerasTimer:
    """Keras inference: the model called in a `tf.function` on one batch, as
    `predict_on_batch` runs it (without its per-call bookkeeping, which would
    swamp a single small layer), the result brought to the host."""

    def __init__(self, runs=5, clock=time.perf_counter):
        self.runs, self.clock = runs, clock

    def seconds(self, models, progress=lambda done, total: None):
        rng = np.random.default_rng(0)
        calls = []
        for model in models:
            x = [tf.constant(a) for a in _inputs(model, rng)]
            compiled = tf.function(model.__call__, reduce_retracing=True, autograph=False)
            calls.append(lambda compiled=compiled, x=x: keras.tree.map_structure(
                np.asarray, compiled(x if len(x) > 1 else x[0], training=False)))
        logger = logging.getLogger("tensorflow")
        level = logger.level
        logger.setLevel(logging.ERROR)  # one function per model is the point here, not a retracing bug
        try:
            return _medians(calls, self.runs, self.clock, progress)
        finally:
            logger.setLevel(level)


class LiteRTTimer:
    """The LiteRT interpreter (float32, its default XNNPACK delegate) with `threads`.
    Small models (a few layers: the probes of single layers) are converted many to
    a file, one signature each, which is much faster than one conversion each;
    each signature runs alone, timed without copying its inputs in and outputs
    out (as a model's layers pass tensors on). A larger model gets a file of
    its own, as it ships.

    Raises ImportError when ai-edge-litert is not installed.
    """

    per_file = 48  # signatures converted together
    small = 8  # layers of a model that shares a file

    def __init__(self, threads=None, runs=5, clock=time.perf_counter):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise ImportError("Latency(runtime='litert') times the model in the LiteRT interpreter, "
                              "which needs the `ai-edge-litert` package: pip install ai-edge-litert") from None
        self.interpreter, self.threads, self.runs, self.clock = Interpreter, threads, runs, clock

    def seconds(self, models, progress=lambda done, total: None):
        rng = np.random.default_rng(0)
        calls, files = [], []
        for start in range(0, len(models), self.per_file):
            chunk = models[start:start + self.per_file]
            files += [[m] for m in chunk if len(m.layers) > self.small]
            files.append([m for m in chunk if len(m.layers) <= self.small] or None)
        files = [chunk for chunk in files if chunk]
        order = [m for chunk in files for m in chunk]
        for chunk in files:
            runner = self.interpreter(model_content=_converted(chunk), num_threads=self.threads)
            for i in range(len(chunk)):
                signature = runner.get_signature_runner(f"probe{i}")
                details = signature.get_input_details()
                signature(**{name: rng.standard_normal(d["shape"]).astype(d["dtype"])
                             for name, d in details.items()})  # allocates and holds the inputs
                calls.append(lambda signature=signature: _compat.invoke_signature(signature))
        found = dict(zip(map(id, order), _medians(calls, self.runs, self.clock, progress)))
        return [found[id(m)] for m in models]


def _endpoint(model):
    """`model`'s inference as a function of its inputs alone (a traced signature takes no defaults)."""
    def run(*inputs):
        return {"output": model(list(inputs) if len(inputs) > 1 else inputs[0], training=False)}
    return run


def _converted(models):
    """One float32 .tflite file with a signature `probe<i>` running `models[i]`, made
    as `export` makes its file: through a SavedModel, whose weights the converter
    freezes into the file (from concrete functions they stay variables, which
    XNNPACK does not take: a whole ResNet-50 ran 6x slower than its exported file)."""
    archive = keras.export.ExportArchive()  # what `Model.export` uses, with several endpoints
    for i, model in enumerate(models):
        archive.track(model)
        specs = [tf.TensorSpec(t.shape, t.dtype or "float32") for t in model.inputs]
        archive.add_endpoint(f"probe{i}", _endpoint(model), input_signature=specs)
    with tempfile.TemporaryDirectory(prefix="dg2pf-latency-") as tmp:
        archive.write_out(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            tmp, signature_keys=[f"probe{i}" for i in range(len(models))])
        converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]  # as `export` converts
        return converter.convert()


def timer(budget, runs=5):
    """The timer of a `settings.Latency` budget."""
    if budget.runtime == "litert":
        return LiteRTTimer(budget.threads, runs)
    return KerasTimer(runs)
