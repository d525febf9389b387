"""`lm2 launch local` (what launch/local.sh runs): `lm2 train` as one process per rank on this machine.

Unlike torchrun's agent (which forwards SIGTERM, kills the ranks 30 s later and exits 1, and dies on SIGUSR1), this
launcher forwards SIGTERM/SIGUSR1/SIGINT/SIGHUP to every rank and waits for them however long a save takes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

from lm2.pipeline.launch.environment import free_port
from lm2.pipeline.launch.exit_codes import EXIT_LM2_ERROR, EXIT_REQUEUE
from lm2.pipeline.launch.signals import STOP_SIGNALS


def _die_with_parent() -> None:
    """In a rank, before exec: the kernel kills it if the launcher dies, even by SIGKILL (no orphaned ranks)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def rank_environment(rank: int, nproc: int, port: int) -> dict[str, str]:
    env = {
        **os.environ,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


FAILURE_GRACE_S = 60
"""After a rank ends with a non-zero code, how long the others may take to end by themselves (they may be a moment
from exiting with the requeue code, or hang in a collective) before they are killed; srun's --wait in train.sbatch."""


def run_local(nproc: int, train_args: list[str]) -> int:
    """Runs `lm2 train *train_args` as `nproc` ranks on this machine and returns the job's exit code.

    Unlike torchrun's agent (which forwards SIGTERM, kills the ranks 30 s later and exits 1, and dies on SIGUSR1), this
    launcher forwards SIGTERM/SIGUSR1/SIGINT/SIGHUP to every rank and waits for them however long the save takes. The
    ranks stay in the launcher's process group, so a signal to the group reaches them too. The exit code is the first
    failing rank's (EXIT_REQUEUE after a stop signal), 0 when all succeed."""
    port = free_port()
    command = [sys.executable, "-m", "lm2.pipeline.cli", "train", *train_args]
    ranks: list[subprocess.Popen] = []

    def forward(signum, frame) -> None:
        for process in ranks:
            if process.returncode is None:  # not reaped yet, so the pid is still this rank's
                os.kill(process.pid, signum)

    for signum in (*STOP_SIGNALS, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        ranks.extend(
            subprocess.Popen(command, env=rank_environment(rank, nproc, port), preexec_fn=_die_with_parent)
            for rank in range(nproc)
        )
        return _wait_for_ranks(ranks)
    finally:
        for process in ranks:
            if process.returncode is None:  # still running (or not yet reaped): no rank outlives the launcher
                process.kill()
                process.wait()


def _wait_for_ranks(ranks: list[subprocess.Popen]) -> int:
    """0 when every rank succeeds, else the exit code of the first rank to fail (in the order they ended), as a shell
    reports it (128 + the signal's number when killed); the others get FAILURE_GRACE_S to end, then are killed.
    An LM2Error is rank 0's to report: the launcher adds a line only when another rank stopped on one alone."""
    rank_of = {process.pid: rank for rank, process in enumerate(ranks)}
    first_failure: int | None = None
    deadline = float("inf")
    while any(process.returncode is None for process in ranks) and time.monotonic() < deadline:
        pid, status = os.waitpid(-1, os.WNOHANG)  # reaps in the order the ranks end
        if pid not in rank_of:
            time.sleep(0.1)
            continue
        rank, code = rank_of[pid], os.waitstatus_to_exitcode(status)
        ranks[rank].returncode = code
        if code and first_failure is None:
            first_failure, deadline = code, time.monotonic() + FAILURE_GRACE_S
            if code not in (EXIT_REQUEUE, EXIT_LM2_ERROR):
                cause = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                print(f"lm2 launch: rank {rank} {cause}; stopping the other ranks", file=sys.stderr)
    if first_failure is None:
        return 0
    if first_failure == EXIT_LM2_ERROR and ranks[0].returncode != EXIT_LM2_ERROR:
        failed = [rank for rank, process in enumerate(ranks) if process.returncode == EXIT_LM2_ERROR]
        print(
            f"lm2 launch: rank(s) {', '.join(map(str, failed))} stopped on an lm2 error that rank 0 did not report; "
            "rerun with --verbose to have every rank print its errors",
            file=sys.stderr,
        )
    return 128 - first_failure if first_failure < 0 else first_failure
