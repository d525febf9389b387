"""Files written whole or not at all, and their checksums: the one atomic write, the one sha256 of lm2, and the
fsyncs that make a write durable before anything points at it."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Writes `data` to a temporary file beside `path`, syncs it, then renames it over `path`: a reader sees the
    old file or the new one, never a partial one (a failed write leaves nothing, a crash at most a
    hidden temporary file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself survives a crash
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves nothing behind
        raise


def fsync_file(path: str | Path) -> None:
    """Forces a written file's data to disk (a crash after this cannot leave it short)."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def fsync_dir(path: str | Path) -> None:
    """Forces a folder's entries (files created or renamed in it) to disk, where the file system can (some FUSE
    mounts refuse to sync a folder: EINVAL)."""
    try:
        fsync_file(path)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
