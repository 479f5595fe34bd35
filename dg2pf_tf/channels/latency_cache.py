"""The latency model's measurements on disk, keyed by what they depend on.

A file holds the seconds of every probe of one model (or of a shrunk model
and its dense one, `latency.measured_share`), keyed by the layers (class,
config and input shape of each), the runtime, batch size, threads, the CPU
model and the TensorFlow, Keras and LiteRT versions; any other file is
measured anew, never used.
"""

import hashlib
import json
import os
import platform
import warnings

import keras

FORMAT = 2  # of the cache files: 2 since the probes are a grid of 3 by 3 widths


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
