"""Who holds something (a run folder's lock): host, pid and SLURM job id, written as one readable line, and whether
that holder is provably gone. A lock the file system keeps after its holder died (NFS after a node crash) or a
lock file left where the file system has no locks (Lustre mounted noflock) is stale only when this process can prove
it: SLURM says the job has ended (squeue, then sacct), or the job is this one (a requeued job runs again under its
id, after its previous run ended), or the holder ran on this host and its pid is gone. Anything else is taken to be
alive: a second job is refused rather than let in.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass

ACTIVE_STATES = {
    "PENDING",
    "RUNNING",
    "COMPLETING",
    "CONFIGURING",
    "SUSPENDED",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
    "RESV_DEL_HOLD",
    "SPECIAL_EXIT",
}
"""SLURM job states in which the job may still run (squeue's and sacct's names); every other state has ended."""

_LINE = re.compile(r"host (?P<host>\S+), pid (?P<pid>\d+)(?:, SLURM job (?P<job>\S+))?, since (?P<since>.+)")


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    job: str | None
    since: str

    @classmethod
    def this_process(cls) -> Holder:
        return cls(
            socket.gethostname(), os.getpid(), os.environ.get("SLURM_JOB_ID"), time.strftime("%Y-%m-%d %H:%M:%S")
        )

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        match = _LINE.fullmatch(text.strip())
        if match is None:
            return None
        return cls(match["host"], int(match["pid"]), match["job"], match["since"])

    def line(self) -> str:
        return (
            f"host {self.host}, pid {self.pid}"
            + (f", SLURM job {self.job}" if self.job else "")
            + f", since {self.since}"
        )


def _run(command: list[str]) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):  # no SLURM here, or its controller does not answer
        return None


def _state_alive(state: str) -> bool:
    """`RUNNING`, `CANCELLED by 123`, ... -> whether the job may still run."""
    return state.split()[0].rstrip("+") in ACTIVE_STATES


def slurm_job_alive(job: str) -> bool | None:
    """True while SLURM may still run `job`, False once it has ended, None if SLURM cannot tell (no squeue or
    sacct here, or no answer)."""
    queue = _run(["squeue", "-h", "-j", job, "-o", "%T"])
    if queue is not None and queue.returncode == 0 and queue.stdout.strip():
        return _state_alive(queue.stdout.strip())
    if queue is not None and "Invalid job id" in queue.stderr:
        return False  # the controller has forgotten it: it ended at least MinJobAge ago
    accounting = _run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"])
    if accounting is not None and accounting.returncode == 0 and accounting.stdout.strip():
        return _state_alive(accounting.stdout.strip().splitlines()[0])
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def is_gone(holder: Holder | None) -> bool:
    """Whether `holder` has provably ended (see the module's docstring); an unreadable holder is not."""
    if holder is None:
        return False
    if holder.job is not None:
        if holder.job == os.environ.get("SLURM_JOB_ID") and holder.pid != os.getpid():
            return True  # this job's previous run (a requeue): SLURM runs one at a time
        alive = slurm_job_alive(holder.job)
        if alive is not None:
            return not alive
    return holder.host == socket.gethostname() and not _pid_alive(holder.pid)
