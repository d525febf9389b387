"""One job per run folder, one run per job: a lock on `<run_dir>/.lock` (on any cluster file system) and the
refusal of a start that would mix two runs' checkpoints and metrics in one folder."""

from __future__ import annotations

import errno
import fcntl
import os
import weakref
from pathlib import Path
from typing import IO

import torch.distributed as dist

from lm2.model.errors import CheckpointError
from lm2.pipeline.checkpoint.format import read_manifest, step_folders, tag_for
from lm2.pipeline.checkpoint.resume import named_checkpoint
from lm2.pipeline.config import RunConfig
from lm2.pipeline.launch.holders import Holder, is_gone

LOCK = ".lock"
OWNER = ".lock.owner"
"""Where flock is not available: the lock is this file, created exclusively and removed by its holder."""
NO_FLOCK = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)
"""flock's errors where the file system offers no locks (Lustre mounted noflock, NFS without a lock manager)."""


class RunFolderLock:
    """A job's hold on its run folder, as long as this object lives (and the process): an flock on `.lock`, whose
    holder line names the job, or without flock the file `.lock.owner` holding that line, removed on release."""

    def __init__(self, handle: IO | None = None, owner: Path | None = None, line: str = "") -> None:
        self.handle, self.owner = handle, owner
        if owner is not None:  # also at exit; a killed job's file is judged stale by the next (holders.is_gone)
            self._finalizer = weakref.finalize(self, _remove_if_ours, owner, line)

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # drops the flock
        if self.owner is not None:
            self._finalizer()


def _remove_if_ours(owner: Path, line: str) -> None:
    try:
        if owner.read_text().strip() == line:
            owner.unlink()
    except FileNotFoundError:
        pass


def _in_use(run_dir: Path, holder: Holder | None, text: str, lock_file: Path) -> CheckpointError:
    who = holder.line() if holder else text or "a process that has not written its name yet"
    return CheckpointError(
        f"{run_dir} is in use by another job ({who}): wait for it to end, or set logging.run_dir to another folder "
        f"(if that job is gone and its lock stays, remove {lock_file})"
    )


def _flocked(path: Path, line: str) -> IO:
    """`path` opened and flocked (raises what flock raises), its content replaced by the holder line."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise
    handle.truncate(0)
    handle.write(line + "\n")
    handle.flush()
    return handle


def _take_stale_flock(run_dir: Path, line: str) -> IO:
    """A new `.lock` in place of one whose flock outlived its holder (NFS keeps a crashed node's locks): flocked
    under a temporary name, then renamed over the old file, so the stale lock stays on a file nobody opens again."""
    fresh = run_dir / f"{LOCK}.new-{os.getpid()}"
    handle = _flocked(fresh, line)
    os.replace(fresh, run_dir / LOCK)
    return handle


def _owner_file_lock(run_dir: Path, line: str) -> RunFolderLock:
    """The lock where flock is not available: `.lock.owner` created exclusively (atomic on NFS and Lustre), or
    taken over once if its holder is provably gone."""
    owner = run_dir / OWNER
    for attempt in range(2):
        try:
            handle = os.open(owner, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            text = owner.read_text() if owner.is_file() else ""
            holder = Holder.parse(text)
            if attempt == 0 and (is_gone(holder) or not owner.exists()):
                owner.unlink(missing_ok=True)
                continue
            raise _in_use(run_dir, holder, text.strip(), owner) from None
        with os.fdopen(handle, "w") as file:
            file.write(line + "\n")
            file.flush()
            os.fsync(file.fileno())
        return RunFolderLock(owner=owner, line=line)
    raise _in_use(run_dir, None, "", owner)


def lock_run_folder(run_dir: Path) -> RunFolderLock:
    """Takes the run folder's lock for this process and writes who holds it (host, pid, SLURM job id). An flock on
    `<run_dir>/.lock`: the kernel drops it when the process ends, however it ends. Held by a job that has provably
    ended (holders.is_gone: NFS can keep a crashed node's flock), it is taken over; where the file system has no
    flock, `.lock.owner` is the lock. Raises CheckpointError naming the holder if another job has it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    line = Holder.this_process().line()
    try:
        return RunFolderLock(handle=_flocked(run_dir / LOCK, line))
    except BlockingIOError:
        text = (run_dir / LOCK).read_text()
        holder = Holder.parse(text)
        if not is_gone(holder):
            raise _in_use(run_dir, holder, text.strip(), run_dir / LOCK) from None
        return RunFolderLock(handle=_take_stale_flock(run_dir, line))
    except OSError as error:
        if error.errno not in NO_FLOCK:
            raise
        return _owner_file_lock(run_dir, line)


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


def claim_run_folder(run: RunConfig) -> RunFolderLock | None:
    """Rank 0 locks the run folder for the life of the job and checks the start (check_start); every rank raises
    the same CheckpointError if either fails. Returns the lock on rank 0 (keep it), None elsewhere.
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
                lock.release()
    dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise CheckpointError(problem[0])
    return lock
