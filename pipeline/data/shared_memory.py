"""streaming's shared memory left behind by a killed run: found and removed before the next run builds its loader.

A StreamingDataset keeps its state in /dev/shm files named `<prefix>_<name>` and registers the local folders it
reads under `<prefix>_locals`. A SIGKILLed run never removes them: every later run leaks more, and one reading a
remote stream through the same cache fails with streaming's "Reused local directory". streaming's own
clean_stale_shared_memory() removes every dataset's shared memory on the node, live jobs' included; this removes
only prefixes that list one of our folders and that no process on the node maps any more.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import gettempdir

from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, LOCALS, SHM_TO_CLEAN
from streaming.base.shared.prefix import _unpack_locals

SHM = Path("/dev/shm")


def _mapped_shared_memory() -> set[str]:
    """Names of the /dev/shm files that processes of this node map, among those whose mappings this user may read
    (its own: the only ones whose shared memory it may remove, see clean_stale_shared_memory)."""
    names = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):  # ended meanwhile, or not ours
            continue
        names.update(
            line.split("/dev/shm/", 1)[1].removesuffix(" (deleted)")
            for line in text.splitlines()
            if "/dev/shm/" in line
        )
    return names


def clean_stale_shared_memory(local_folders: list[str]) -> list[str]:
    """Removes the shared memory (and streaming's lock files) of dead datasets that read any of `local_folders`
    (streaming's form: absolute, split included). Run it on one process per node before building datasets.
    Only this user's files are candidates: its processes are the ones whose mappings it can read. Returns the
    prefixes removed."""
    mapped = _mapped_shared_memory()
    ours, removed = {os.path.abspath(folder) for folder in local_folders}, []
    for registry in SHM.glob(f"*_{LOCALS}"):
        prefix = registry.name[: -len(LOCALS) - 1]
        try:
            if registry.stat().st_uid != os.getuid():
                continue
            theirs, _ = _unpack_locals(registry.read_bytes())
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        files = [SHM / f"{prefix}_{name}" for name in SHM_TO_CLEAN]
        if not ours & set(theirs) or any(file.name in mapped for file in files):
            continue
        for file in files + [Path(gettempdir()) / f"{prefix}_{lock}" for lock in (BARRIER_FILELOCK, CACHE_FILELOCK)]:
            file.unlink(missing_ok=True)
        removed.append(prefix)
    return removed


# A job spread over nodes holds one lock per node, taken in no fixed order: two such jobs sharing two nodes could
# each hold one and wait for the other. The wait is bounded so that they fall back to streaming's own (racy) way.
REGISTRATION_WAIT_S = 120.0


@contextmanager
def registration_lock(held: bool) -> Iterator[None]:
    """Held by one process per node (`held`) while its job's ranks build their datasets. streaming picks a free
    shared-memory prefix by listing /dev/shm, then registers `<prefix>_locals` after a barrier: two jobs starting on
    one node at once could pick the same prefix, and one would fail with FileExistsError. With this lock the jobs
    of a user register one after the other. It lives in /dev/shm, beside what it guards (one per node)."""
    if not held:
        yield
        return
    with open(SHM / f"lm2_streaming_registration_{os.getuid()}.lock", "a") as handle:
        deadline = time.monotonic() + REGISTRATION_WAIT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    yield  # without the lock, see REGISTRATION_WAIT_S
                    return
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
