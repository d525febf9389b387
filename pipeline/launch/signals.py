"""Stop signals: SIGTERM or SIGUSR1 make every rank finish its step, save one checkpoint together at the step
boundary and exit with EXIT_REQUEUE (exit_codes.py), which the launch scripts turn into a requeue."""

from __future__ import annotations

import signal

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
