"""Writing checkpoints: every rank saves its DeepSpeed shards and RNG state and reports what it wrote, then rank 0
publishes the manifest and `latest`, and prunes old checkpoints, only after a newer verified one is complete."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

from lm2.model.errors import CheckpointError
from lm2.pipeline.checkpoint.engine_io import stage, write_file
from lm2.pipeline.checkpoint.format import (
    LATEST,
    MANIFEST,
    UNIVERSAL_SUFFIX,
    Manifest,
    carry_file,
    read_manifest,
    rng_file,
    step_folders,
    tag_for,
    write_manifest,
)
from lm2.pipeline.checkpoint.universal import universal_checkpoint_info
from lm2.pipeline.checkpoint.verify import size_problems
from lm2.pipeline.files import fsync_dir, write_atomic


def code_version() -> str:
    """lm2's version plus the git commit of the source tree, when it is a checkout."""
    from importlib.metadata import version

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version('lm2')}+{commit}" if commit else version("lm2")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


@dataclass
class Retention:
    """Which checkpoints pruning counts: only complete ones this job verified, that is the one it resumed from
    (hashed against its manifest at the start) and the ones it wrote (manifests built from the hashes of files their
    writers had fsynced), whose files still have their recorded sizes. Hashing every old checkpoint at each save would
    cost minutes on a large run; a checkpoint this job has not verified is never counted, so a corrupt or foreign one
    cannot take the place of a good one. The newest `keep` counted ones stay, and everything older goes once there
    are `keep` of them: after a resume, older checkpoints stay until `keep` newer verified ones exist."""

    keep: int
    verified: list[str] = field(default_factory=list)
    """Names of the checkpoint folders this job verified or wrote."""

    def counted(self, root: Path) -> list[str]:
        """The verified checkpoints still complete, newest first."""
        names = []
        for name in sorted(set(self.verified), reverse=True):
            try:
                if not size_problems(root / name, read_manifest(root / name)):
                    names.append(name)
            except CheckpointError:  # its manifest is gone or unreadable: no longer a checkpoint
                continue
        return names

    def prune(self, root: Path) -> None:
        """Deletes the checkpoints (and their universal conversions) older than the newest `keep` counted ones, and
        folders without a manifest (saves that never finished) older than the newest counted one."""
        counted = self.counted(root)
        if not counted:
            return
        oldest_kept = counted[self.keep - 1] if len(counted) >= self.keep else None
        for folder in step_folders(root):
            stale = oldest_kept is not None and folder.name < oldest_kept
            unfinished = folder.name < counted[0] and not (folder / MANIFEST).is_file()
            if stale or unfinished:
                shutil.rmtree(folder, ignore_errors=True)
                shutil.rmtree(root / f"{folder.name}{UNIVERSAL_SUFFIX}", ignore_errors=True)


def _clear(folder: Path, retention: Retention) -> None:
    """Makes room for writing checkpoint `folder` again (the leftovers of an interrupted save, or a corrupt copy a
    resume skipped): `latest` first moves off it, to the newest counted checkpoint (or goes), so that it never names
    a deleted folder; then the folder goes, and its universal conversion with it (made from the old files)."""
    root = folder.parent
    latest = root / LATEST
    if latest.is_file() and latest.read_text().strip() == folder.name:
        others = [name for name in retention.counted(root) if name != folder.name]
        if others:
            write_atomic(latest, others[0] + "\n")
        else:
            latest.unlink()
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(root / f"{folder.name}{UNIVERSAL_SUFFIX}", ignore_errors=True)


def _entries(folder: Path, written: dict[Path, str]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of the files this rank wrote into `folder` (write_file fsynced each and hashed its bytes as
    they passed): the manifest that lists them is written only once they are on disk."""
    return {
        os.path.relpath(path, folder): {"bytes": path.stat().st_size, "sha256": sha256}
        for path, sha256 in written.items()
    }


def save(engine, root: Path, manifest: Manifest, retention: Retention, carry: dict[str, Any] | None = None) -> Path:
    """Every rank calls it with lm2's Engine (train/engine.py). Writes checkpoint `manifest.step` (DeepSpeed's shards
    with the manifest's client state, and for a ZeRO-1/2 layout what a resume at another layout needs; this rank's
    carried memory when given); each rank reports the files it wrote, and rank 0 writes the manifest of them all,
    moves `latest` and prunes."""
    folder = _begin(engine, root, manifest, retention)
    files = engine.deepspeed.checkpoint_engine
    try:
        _save_shards(engine, folder, manifest)
        written = {path: sha256 for path, sha256 in files.take_saved().items() if _inside(path, folder)}
        written |= {path: write_file(state, path) for path, state in _rank_files(folder, carry)}
        mine = _entries(folder, written)
    except (OSError, RuntimeError) as error:  # torch reports a full disk as a RuntimeError without errno
        raise _not_written(folder, error) from None
    _publish(folder, manifest, retention, mine)
    return folder


def _rank_files(folder: Path, carry: dict[str, Any] | None) -> list[tuple[Path, Any]]:
    """lm2's own files of this rank beside DeepSpeed's: its RNG state and its carried memory (when given)."""
    rank = dist.get_rank()
    files = [(rng_file(folder, rank), rng_state())]
    return files + ([(carry_file(folder, rank), carry)] if carry is not None else [])


def _inside(path: Path, folder: Path) -> bool:
    """Whether DeepSpeed saved `path` into this checkpoint's folder."""
    return path.parent.resolve() == folder.resolve()


def _begin(engine, root: Path, manifest: Manifest, retention: Retention) -> Path:
    """Clears the folder of checkpoint `manifest.step` (rank 0) and starts recording the files saved into it."""
    folder = root / tag_for(manifest.step)
    if dist.get_rank() == 0 and folder.exists():
        _clear(folder, retention)
    dist.barrier()
    engine.deepspeed.checkpoint_engine.take_saved()  # only this save's files
    return folder


def _save_shards(engine, folder: Path, manifest: Manifest) -> None:
    client_state = {"lm2": manifest.client_state()}
    if engine.layout.reshardable:
        client_state[UNIVERSAL_CHECKPOINT_INFO] = universal_checkpoint_info(engine, engine.model)
    engine.deepspeed.save_checkpoint(str(folder.parent), tag=folder.name, client_state=client_state, save_latest=False)


def _publish(folder: Path, manifest: Manifest, retention: Retention, mine: dict[str, dict[str, Any]]) -> None:
    """Every rank's report to rank 0, which writes the manifest, moves `latest` and prunes."""
    root = folder.parent
    rank = dist.get_rank()
    tables: list[dict] | None = [{} for _ in range(dist.get_world_size())] if rank == 0 else None
    dist.gather_object(mine, tables, dst=0)
    if rank == 0:
        try:
            fsync_dir(folder)
            write_manifest(folder, dataclasses.replace(manifest, files=_joined(tables)))
            write_atomic(root / LATEST, folder.name + "\n")
        except OSError as error:
            raise _not_written(folder, error) from None
        retention.verified.append(folder.name)
        retention.prune(root)
    dist.barrier()


class PendingSave:
    """An asynchronous save (checkpoint.async_save): `start` captures this rank's state at the save step (DeepSpeed's
    state dicts, the RNG state and carried memory, copied to host memory) and writes, fsyncs and hashes the files on
    a background thread while training goes on. `poll` (a collective: every rank calls it at the same step
    boundaries) publishes the checkpoint (manifest, `latest`, pruning) once every rank's files are written."""

    def __init__(self, folder: Path, manifest: Manifest, retention: Retention, staged: list[tuple[Path, Any]], files):
        self.folder, self.manifest, self.retention = folder, manifest, retention
        self.started = time.perf_counter()
        self.mine: dict[str, dict[str, Any]] | None = None
        self.error: BaseException | None = None
        self.writer_cpu = 0.0
        """CPU seconds the background writer took (serializing, fsyncing, hashing), once it is done."""
        self._thread = threading.Thread(
            target=self._write, args=(staged, files), name=f"lm2-save-{folder.name}", daemon=True
        )
        self._thread.start()

    @classmethod
    def start(
        cls, engine, root: Path, manifest: Manifest, retention: Retention, carry: dict[str, Any] | None = None
    ) -> PendingSave:
        folder = _begin(engine, root, manifest, retention)
        files = engine.deepspeed.checkpoint_engine
        files.start_staging()
        try:
            _save_shards(engine, folder, manifest)  # the shards' state dicts are staged, not written
        except (OSError, RuntimeError) as error:
            raise _not_written(folder, error) from None
        finally:
            staged = files.end_staging()
        staged = [(path, state) for path, state in staged if _inside(path, folder)]
        staged += [(path, stage(state)) for path, state in _rank_files(folder, carry)]
        return cls(folder, manifest, retention, staged, files)

    def _write(self, staged: list[tuple[Path, Any]], files) -> None:
        started = time.thread_time()
        try:
            self.mine = _entries(self.folder, {path: files.write_staged(state, path) for path, state in staged})
        except BaseException as error:  # reported by poll, on the training thread
            self.error = error
            # Now, not at the next step boundary: a full disk must not fail training's own writes meanwhile.
            shutil.rmtree(self.folder, ignore_errors=True)
        finally:
            self.writer_cpu = time.thread_time() - started

    def poll(self, group, wait: bool = False) -> bool:
        """Whether the checkpoint is published: True once every rank's files are written, after publishing it; with
        `wait`, waits for this rank's writes first. Raises the CheckpointError of a failed write on every rank."""
        if wait:
            self._thread.join()
        flag = np.array([self._thread.is_alive(), self.error is not None], dtype=np.int32)
        dist.all_reduce(torch.from_numpy(flag), op=dist.ReduceOp.MAX, group=group)
        if flag[0]:
            return False
        if self.error is not None:
            raise _not_written(self.folder, self.error) from None
        if flag[1]:
            raise CheckpointError(
                f"could not write checkpoint {self.folder}: another rank failed to write its files (see its error)"
            )
        _publish(self.folder, self.manifest, self.retention, self.mine)
        return True

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


def _joined(tables: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Every rank's files in one table, sorted by name."""
    return dict(sorted((name, entry) for table in tables for name, entry in table.items()))


def _not_written(folder: Path, error: Exception) -> CheckpointError:
    """The error of a save that failed on this rank (a full disk, a lost mount), after removing what it wrote: the
    previous checkpoint and `latest` are untouched. The launcher stops the other ranks when this one exits."""
    shutil.rmtree(folder, ignore_errors=True)
    root = folder.parent
    latest = root / LATEST
    then = (
        f"continue with --resume auto from {root / latest.read_text().strip()}, which is intact"
        if latest.is_file()
        else "start again"
    )
    free = shutil.disk_usage(root).free / 2**20
    return CheckpointError(
        f"could not write checkpoint {folder} ({error}); {free:.0f} MiB are free on its disk: make "
        f"room (or lower checkpoint.keep) and {then}"
    )
