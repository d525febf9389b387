"""Verifying a checkpoint against its manifest before anything loads it: every file present with its size, its
sha256 as recorded, and no pickled type outside safe_load's allowlist.

The work is split by bytes, not by file count: the files go to workers (every rank's threads) largest first, each to
the worker with the fewest bytes so far, so a few large model files and many small optimizer partitions finish
together. One file's sha256 is sequential, so the largest file bounds the time. In a job every rank verifies its
share and all ranks receive every rank's findings (`Team.gather`), so they reach one decision together: no rank
can skip a checkpoint that another loads, or wait in a collective that another left.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm2.model.errors import CheckpointError
from lm2.pipeline.checkpoint.format import MANIFEST, Manifest, read_manifest
from lm2.pipeline.checkpoint.safe_load import UnsafeCheckpointError, refusal, unsafe_globals
from lm2.pipeline.files import sha256_file

Gather = Callable[[Any], list[Any]]
"""A value from every rank, in rank order, on every rank (all_gather_object); one process: [value]."""


def alone(value: Any) -> list[Any]:
    return [value]


def default_threads() -> int:
    """Threads per process: the CPUs this process may use, shared by the ranks of its node, at most 8 (sha256 and
    reads release the GIL; more threads than that only queue on the disk)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


@dataclass(frozen=True)
class Team:
    """Who verifies: rank `rank` of `size` processes, `threads` threads each; `gather` joins their findings."""

    rank: int = 0
    size: int = 1
    threads: int = field(default_factory=default_threads)
    gather: Gather = alone

    @property
    def workers(self) -> int:
        return self.size * self.threads


@dataclass(frozen=True)
class Verification:
    manifest: Manifest
    bytes: int
    seconds: float
    team: Team

    def describe(self, folder: Path) -> str:
        return (
            f"verified {folder.name}: {self.bytes / 1e9:.2f} GB in {len(self.manifest.files)} files in "
            f"{self.seconds:.1f} s ({self.team.size} rank(s) x {self.team.threads} thread(s))"
        )


def size_problems(folder: Path, manifest: Manifest) -> list[str]:
    """Files of the manifest that are missing or have another size than it records (cheap: no hashing)."""
    problems = []
    for name, entry in sorted(manifest.files.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{folder} is incomplete: it lacks {name} of its manifest")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}")
    return problems


def shares_by_bytes(sizes: dict[str, int], workers: int) -> list[list[str]]:
    """The files split over `workers`, balanced by bytes (largest first, each to the least loaded worker; ties by
    name and index, so every rank computes the same split)."""
    shares: list[list[str]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        worker = min(range(workers), key=lambda w: (loads[w], w))
        shares[worker].append(name)
        loads[worker] += sizes[name]
    return shares


def _readable(folder: Path) -> tuple[Manifest | None, str]:
    """(the manifest, the sha256 of its text) as this process sees the folder, or (None, the problem)."""
    try:
        manifest = read_manifest(folder)
    except CheckpointError as error:
        return None, str(error)
    problems = size_problems(folder, manifest)
    if problems:
        return None, f"{problems[0]} ({len(problems)} file(s) missing or truncated)"
    return manifest, hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()


def _file_problem(folder: Path, name: str, expected: str) -> tuple[bool, str] | None:
    """(unsafe, message) if the file is not what the manifest records or names a type outside the allowlist."""
    path = folder / name
    if sha256_file(path) != expected:
        return False, f"{path} does not match its checksum in the manifest: the file is corrupt"
    names = unsafe_globals(path) if name.endswith(".pt") else []
    return (True, str(refusal(path, names))) if names else None


def _check_share(folder: Path, manifest: Manifest, names: list[list[str]], progress: Callable[[str], None]):
    """This process's findings on its share (one list of files per thread)."""
    found = []
    with ThreadPoolExecutor(max(1, len(names))) as pool:
        futures = {
            pool.submit(lambda files: [_file_problem(folder, n, manifest.files[n]["sha256"]) for n in files], share): i
            for i, share in enumerate(names)
        }
        for future in as_completed(futures):
            found += [problem for problem in future.result() if problem is not None]
            progress(f"checked {len(names[futures[future]])} file(s)")
    return found


def verify(folder: Path, team: Team | None = None, progress: Callable[[str], None] = lambda _: None) -> Verification:
    """The verification of checkpoint `folder`, or CheckpointError (UnsafeCheckpointError for a file that could run
    code), the same on every rank of the team. A collective when the team has several ranks."""
    team = team or Team()
    started = time.perf_counter()
    manifest, digest = _readable(folder)
    seen = team.gather((manifest is not None, digest))  # the manifests' digests only: not every manifest everywhere
    problems = [problem for readable, problem in seen if not readable]
    if problems:
        raise CheckpointError(problems[0])
    if len({digest for _, digest in seen}) > 1:
        raise CheckpointError(
            f"the ranks read different {MANIFEST} files in {folder} (a network file system serving a stale copy?): "
            "run again once the file system has settled"
        )
    shares = shares_by_bytes({name: entry["bytes"] for name, entry in manifest.files.items()}, team.workers)
    mine = shares[team.rank * team.threads : (team.rank + 1) * team.threads]
    found = [
        problem for findings in team.gather(_check_share(folder, manifest, mine, progress)) for problem in findings
    ]
    unsafe = [message for is_unsafe, message in found if is_unsafe]
    if unsafe:
        raise UnsafeCheckpointError(unsafe[0])
    if found:
        raise CheckpointError(found[0][1] + (f" ({len(found)} files corrupt)" if len(found) > 1 else ""))
    total = sum(entry["bytes"] for entry in manifest.files.values())
    return Verification(manifest, total, time.perf_counter() - started, team)
