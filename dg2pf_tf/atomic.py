"""Writes that a kill at any moment leaves either complete or not there at all.

Everything is first written next to its destination (same file system, so the
final rename is atomic), then renamed over it and the rename made durable.
"""

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path next to `path` to write; renames it over `path` when
    the block succeeds (removes it when it fails), and makes the rename durable."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _sync_directory(directory)


def write_atomic(path, write):
    """Calls `write(file_object)` on a temporary file next to `path`, flushed to
    disk, then renames it over `path`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def staged_directory(path):
    """Yields an empty staging directory next to `path`; when the block succeeds,
    moves each of its entries into `path` (created if missing) by rename, each
    replacing an entry of the same name. The staging directory goes either way."""
    parent = os.path.dirname(os.path.abspath(path))
    staging = tempfile.mkdtemp(prefix=".staging-", dir=parent)
    try:
        yield staging
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(path, name))
        _sync_directory(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _sync_directory(directory):
    # A rename is durable only once its directory is synced; some file systems
    # refuse to open a directory for that, and then the rename stands as it is.
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError:
        pass
