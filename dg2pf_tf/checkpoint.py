"""Run checkpoints: one file with arrays and a JSON header, written atomically.

A checkpoint is `state.npz` in the backup directory: the variables of the
models and optimizers (dropout RNG state and masks included) and a JSON
header with the procedure's own state (phase, epoch, early stopping, the
best weights' bookkeeping) and a fingerprint of the run's configuration.
It is written to a temporary file in the same directory, flushed to disk
and renamed over the old one, so a kill at any moment leaves either the old
or the new checkpoint, never a torn one.
"""

import json
import os
import tempfile
import zipfile

import numpy as np

FORMAT = "dg2pf_tf.checkpoint/1"
STATE_FILE = "state.npz"
DONE_FILE = "done.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, or written by another run."""


def write_atomic(path, write):
    """Calls `write(file_object)` on a temporary file next to `path`, then renames it."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError:
        pass


def save(directory, header, arrays):
    """Writes `header` (JSON-able dict) and `arrays` (name -> ndarray) as the checkpoint."""
    for name in os.listdir(directory):
        if name.startswith(".tmp-"):  # left by a writer killed mid-write
            os.remove(os.path.join(directory, name))
    payload = {"__header__": np.frombuffer(
        json.dumps({"format": FORMAT, **header}).encode(), dtype=np.uint8)}
    payload.update({f"a/{name}": np.asarray(value) for name, value in arrays.items()})
    write_atomic(os.path.join(directory, STATE_FILE), lambda f: np.savez(f, **payload))


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
    theirs = header.get("fingerprint", {})
    differ = sorted(k for k in set(theirs) | set(fingerprint) if theirs.get(k) != fingerprint.get(k))
    if differ:
        detail = ", ".join(f"{k}: {theirs.get(k)!r} there, {fingerprint.get(k)!r} now" for k in differ[:4])
        raise CheckpointError(
            f"The checkpoint {path} belongs to a different run ({detail}). Resume with the same "
            f"model and settings, or use another backup directory.")
    return header, arrays


def mark_done(directory, summary):
    """Records that the run in `directory` finished (see `finished`)."""
    write_atomic(os.path.join(directory, DONE_FILE),
                 lambda f: f.write(json.dumps(summary, indent=2).encode()))


def finished(directory):
    """The summary written by `mark_done`, or None."""
    path = os.path.join(directory, DONE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
