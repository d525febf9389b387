"""How ranks come to exist and how they stop: the distributed environment from the launcher, the stop signals, the
requeue exit code, and `launch/local.sh`'s launcher (one process per rank on this machine).

A run stops early on SIGTERM or SIGUSR1: every rank finishes its step, they agree on the stop at the step boundary,
save one checkpoint and exit with EXIT_REQUEUE, which the launch scripts turn into a requeue.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping

from lm2.pipeline.parallel import slurm

EXIT_REQUEUE = 75
"""Exit code of every rank after a signal-triggered save (EX_TEMPFAIL); launch scripts requeue the job on it."""

EXIT_LM2_ERROR = 2
"""Exit code of every rank that stopped on an LM2Error (bad config, data or checkpoint); only rank 0 prints the
error, so a job reports it once."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""SLURM's preemption and time limit send SIGTERM; `#SBATCH --signal=USR1@<grace>` sends SIGUSR1 before them."""


class StopSignals:
    """Records SIGTERM/SIGUSR1 instead of dying. Installed first thing in `lm2 train`, so a signal that arrives while
    the model is being built is not lost: the run stops at its first step boundary."""

    def __init__(self) -> None:
        self.received = 0
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._record)

    def _record(self, signum, frame) -> None:
        self.received = signum


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_environment(env: Mapping[str, str]) -> dict[str, str]:
    """RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT for torch.distributed, to add to
    `env`: nothing under a launcher that sets them (torchrun, deepspeed, local.sh), the mapping of an srun task's
    SLURM variables, or a world of one."""
    if "WORLD_SIZE" in env:
        return {}
    if _is_srun_task(env):
        return slurm.distributed_environment(env)
    return {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }


def _is_srun_task(env: Mapping[str, str]) -> bool:
    """An srun task has a step id and a rank; the batch script itself has no step."""
    return "SLURM_STEP_ID" in env and "SLURM_PROCID" in env


def launched_rank(env: Mapping[str, str]) -> int:
    """This process's global rank as its launcher set it (torchrun, local.sh, deepspeed, an srun task); 0 alone."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"])
    if _is_srun_task(env):
        return int(env["SLURM_PROCID"])
    return 0


def launched_world_size(env: Mapping[str, str]) -> int:
    """The number of ranks of this job as its launcher set it; 1 alone."""
    if "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    if _is_srun_task(env):
        return int(env["SLURM_NTASKS"])
    return 1


def _die_with_parent() -> None:
    """In a rank, before exec: the kernel kills it if the launcher dies, even by SIGKILL (no orphaned ranks)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _rank_environment(rank: int, nproc: int, port: int) -> dict[str, str]:
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
    port = _free_port()
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
            subprocess.Popen(command, env=_rank_environment(rank, nproc, port), preexec_fn=_die_with_parent)
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


def main(argv: list[str] | None = None) -> int:
    """`python -m lm2.pipeline.parallel.launch --nproc N -- TRAIN_ARGS...` (what launch/local.sh runs)."""
    parser = argparse.ArgumentParser(
        prog="python -m lm2.pipeline.parallel.launch", description="Train on this machine, one process per rank."
    )
    parser.add_argument("--nproc", type=int, required=True, help="processes (ranks) to start")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of `lm2 train`")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error("--nproc must be at least 1")
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    return run_local(args.nproc, train_args)


if __name__ == "__main__":
    sys.exit(main())
