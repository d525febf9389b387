"""One job per run folder, one run per job: a lock on `<run_dir>/.lock` and the refusal of a start that would mix
two runs' checkpoints and metrics in one folder."""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO

import torch.distributed as dist

from lm2.model.errors import CheckpointError
from lm2.pipeline.checkpoint.format import read_manifest, step_folders, tag_for
from lm2.pipeline.checkpoint.resume import named_checkpoint
from lm2.pipeline.config import RunConfig

LOCK = ".lock"


def _holder() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    return (
        f"host {socket.gethostname()}, pid {os.getpid()}"
        + (f", SLURM job {job}" if job else "")
        + f", since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    )


def lock_run_folder(run_dir: Path) -> IO:
    """Takes an exclusive flock on `<run_dir>/.lock` and writes who holds it into the file. The lock lasts as long
    as the returned handle stays open, and the kernel drops it when the process ends, however it ends: a killed
    job leaves a stale file but no stale lock. Raises CheckpointError naming the holder if another process has it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not written its name yet"
        handle.close()
        raise CheckpointError(
            f"{run_dir} is in use by another job ({holder}): wait for it to end, or set "
            "logging.run_dir to another folder"
        ) from None
    handle.truncate(0)
    handle.write(_holder() + "\n")
    handle.flush()
    return handle


def check_start(run_dir: Path, checkpoints: Path, resume: str) -> None:
    """Refuses a start whose saves would land among newer checkpoints of another run in the same folder: they
    would be pruned at once (older step numbers), `latest` would name a deleted folder, and metrics.jsonl would
    mix both runs. `resume` is checkpoint.resume (none, auto or a folder)."""
    if resume == "auto":  # continues the newest complete checkpoint, or starts the folder's first run
        return
    start = 0 if resume == "none" else read_manifest(named_checkpoint(resume)).step
    newer = [folder for folder in step_folders(checkpoints) if folder.name > tag_for(start)]  # zero-padded names
    if not newer:
        return
    if resume == "none":
        raise CheckpointError(
            f"{run_dir} already holds checkpoints of a run (newest {newer[0].name}): pass "
            "--resume auto to continue it, or set logging.run_dir to a new folder to start another"
        )
    raise CheckpointError(
        f"{run_dir} holds checkpoints newer than {resume} (newest {newer[0].name}), which this "
        "run's saves would mix with: set logging.run_dir to a new folder to resume it there"
    )


def claim_run_folder(run: RunConfig) -> IO | None:
    """Rank 0 locks the run folder for the life of the job and checks the start (check_start); every rank raises
    the same CheckpointError if either fails. Returns the lock's handle on rank 0 (keep it), None elsewhere.
    A collective."""
    run_dir = Path(run.logging.run_dir)
    lock, problem = None, [None]
    if dist.get_rank() == 0:
        try:
            lock = lock_run_folder(run_dir)
            check_start(run_dir, run.checkpoints, run.checkpoint.resume)
        except CheckpointError as error:
            problem = [str(error)]
            if lock is not None:
                lock.close()  # releases the lock
    dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise CheckpointError(problem[0])
    return lock
