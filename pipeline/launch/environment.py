"""The distributed environment a rank gets from its launcher (torchrun, deepspeed, `lm2 launch local`, an srun
task), or a world of one."""

from __future__ import annotations

import socket
from collections.abc import Mapping

from lm2.pipeline.launch import slurm


def free_port() -> int:
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
        "MASTER_PORT": str(free_port()),
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
