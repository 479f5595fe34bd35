"""Run checkpoints: one file with arrays and a JSON header, written atomically.

A checkpoint is `state.npz` in the backup directory: the variables of the
models and optimizers (dropout RNG state and masks included) and a JSON
header with the procedure's own state (phase, epoch, early stopping, the
best weights' bookkeeping) and a fingerprint of the run's configuration.
It is written to a temporary file in the same directory, flushed to disk
and renamed over the old one, so a kill at any moment leaves either the old
or the new checkpoint, never a torn one.
"""

import dataclasses
import hashlib
import json
import os
import zipfile

import numpy as np

from dg2pf_tf import atomic, settings

FORMAT = "dg2pf_tf.checkpoint/1"
STATE_FILE = "state.npz"
# Settings added to the fingerprint after checkpoints were written without them, with the
# value every earlier run had: such a checkpoint still resumes.
ADDED_SINCE = {"budget": "channels", "runtime": None, "latency_batch_size": None, "latency_threads": None,
               "distill_while_pruning": True, "schedule_power": 1.0}
DONE_FILE = "done.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, or written by another run."""


def save(directory, header, arrays):
    """Writes `header` (JSON-able dict) and `arrays` (name -> ndarray) as the checkpoint."""
    for name in os.listdir(directory):
        if name.startswith(".tmp-"):  # left by a writer killed mid-write
            os.remove(os.path.join(directory, name))
    payload = {"__header__": np.frombuffer(
        json.dumps({"format": FORMAT, **header}).encode(), dtype=np.uint8)}
    payload.update({f"a/{name}": np.asarray(value) for name, value in arrays.items()})
    atomic.write_atomic(os.path.join(directory, STATE_FILE), lambda f: np.savez(f, **payload))


def load(directory, fingerprint):
    """`(header, arrays)` of the checkpoint in `directory`, or None if there is none.

    Raises:
        CheckpointError: the file is corrupt, not a dg2pf_tf checkpoint, or
            was written by a run with another configuration (`fingerprint`).
    """
    path = os.path.join(directory, STATE_FILE)
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(bytes(data["__header__"]).decode())
            arrays = {k[2:]: data[k] for k in data.files if k.startswith("a/")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError, EOFError) as error:
        raise CheckpointError(
            f"The checkpoint {path} is corrupt ({type(error).__name__}: {error}). Delete it "
            f"to start the run over, or restore it from a copy."
        ) from None
    if header.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a dg2pf_tf checkpoint (format {header.get('format')!r}). "
            f"Use another backup directory.")
    # A checkpoint written before a setting existed ran with that setting's one value then.
    theirs, ours = {**ADDED_SINCE, **header.get("fingerprint", {})}, {**ADDED_SINCE, **fingerprint}
    theirs["budget"] = _budget_config(theirs["budget"])
    differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if differ:
        detail = ", ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} now" for k in differ[:4])
        raise CheckpointError(
            f"The checkpoint {path} belongs to a different run ({detail}). Resume with the same "
            f"model and settings, or use another backup directory.")
    return header, arrays


def _budget_config(written):
    """The budget a checkpoint recorded, as `Budget.config()` writes it today (a field
    added since, such as `Latency.round_to`, with the value it had then)."""
    try:
        return settings.budget(written).config()
    except ValueError:
        return written  # not a budget this version knows: the comparison says so


def mark_done(directory, summary):
    """Records that the run in `directory` finished (see `finished`)."""
    atomic.write_atomic(os.path.join(directory, DONE_FILE),
                 lambda f: f.write(json.dumps(summary, indent=2).encode()))


def finished(directory):
    """The summary written by `mark_done`, or None."""
    path = os.path.join(directory, DONE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _layout(model):
    """A digest of `model`'s weights' names and shapes."""
    layout = json.dumps([(w.path, list(w.shape)) for w in model.weights])
    return hashlib.sha1(layout.encode()).hexdigest()[:16]


def fingerprint(config, student, teacher, replicas):
    """What a checkpoint must agree with: every field of `config` (a `RunConfig`, as
    its `to_json()`), the layout of the student's and the teacher's weights, and the
    number of replicas (the batch each one sees, so the result)."""
    return {"model": _layout(student), "model_name": student.name, "teacher": _layout(teacher),
            **config.to_json(), "replicas": replicas}


class BestState:
    """The best validation score seen so far and the weights (masks included) that made it."""

    def __init__(self):
        self.score = self.weights = self.epoch = self.phase = None

    def offer(self, score, model, epoch, phase):
        """Keeps `model`'s weights if `score` (a tuple, higher is better) beats the best."""
        if self.score is None or score > self.score:
            self.score, self.epoch, self.phase = score, epoch, phase
            self.weights = [np.array(v) for v in model.get_weights()]
            return True
        return False

    def restore(self, model):
        """Sets `model` to the best weights, if any were offered."""
        if self.weights is not None:
            model.set_weights(self.weights)

    def dump(self):
        """`(header, arrays)` for a checkpoint; the header is None before any offer."""
        if self.weights is None:
            return None, {}
        header = {"score": list(self.score), "epoch": self.epoch, "phase": self.phase,
                  "count": len(self.weights)}
        return header, {f"best/{i}": w for i, w in enumerate(self.weights)}

    def load(self, header, arrays):
        """Takes back what `dump` gave."""
        if header is not None:
            self.score, self.epoch, self.phase = tuple(header["score"]), header["epoch"], header["phase"]
            self.weights = [arrays[f"best/{i}"] for i in range(header["count"])]


class RunCheckpoint:
    """A run's checkpoint in `directory`: named groups of variables (models,
    optimizers), the procedure's state (a dataclass) and its `BestState`.
    Only the chief writes; every worker reads.

    Args:
        directory: created if missing.
        fingerprint: see `fingerprint`; a checkpoint written with another is refused.
        groups: name -> list of variables, in a fixed order.
        chief: whether this process writes.
    """

    def __init__(self, directory, fingerprint, groups, *, chief=True):
        os.makedirs(directory, exist_ok=True)
        self.directory, self.fingerprint, self.groups, self.chief = directory, fingerprint, groups, chief

    def restore(self, best):
        """Assigns the saved variables and loads `best`; returns the saved state as a
        dict, or None when there is no checkpoint.

        Raises CheckpointError as `load` does.
        """
        restored = load(self.directory, self.fingerprint)
        if restored is None:
            return None
        header, arrays = restored
        for group, variables in self.groups.items():
            for i, variable in enumerate(variables):
                variable.assign(arrays[f"{group}/{i}"])
        best.load(header["tracker"], arrays)
        return header["state"]

    def save(self, state, best):
        """Writes every group, `state` and `best` (on the chief only)."""
        if not self.chief:
            return
        arrays = {f"{group}/{i}": np.asarray(v) for group, variables in self.groups.items()
                  for i, v in enumerate(variables)}
        header, best_arrays = best.dump()
        save(self.directory, {"fingerprint": self.fingerprint, "state": dataclasses.asdict(state),
                              "tracker": header}, {**arrays, **best_arrays})

    def mark_done(self, report):
        """Records the finished run's report (on the chief only)."""
        if self.chief:
            mark_done(self.directory, report)
