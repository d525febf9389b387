"""SLURM: an srun task's variables as a torch.distributed environment, the requeue note, the job's log folder.

One srun task per GPU: SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS become RANK/LOCAL_RANK/WORLD_SIZE, the rendezvous is
the allocation's first host at a port derived from the job id, so every task of every requeue of a job agrees on it
without talking to each other.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

PORT_BASE, PORT_SPAN = 15000, 15000
"""MASTER_PORT = PORT_BASE + job id mod PORT_SPAN: unprivileged and below Linux's ephemeral ports (32768+), so no
outgoing connection holds it; two jobs sharing a first node collide only if their ids differ by a multiple of 15000."""


def master_port(job_id: str) -> int:
    return PORT_BASE + int(job_id) % PORT_SPAN


def hostnames(nodelist: str) -> list[str]:
    """`node[01-03],gpu7` -> [node01, node02, node03, gpu7], expanded by SLURM itself (no controller call)."""
    result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return result.stdout.split()


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """SLURM_STEP_TASKS_PER_NODE ("8(x2),4": 8 on nodes 0-1, 4 on node 2) -> the count on node `node_id`."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise ValueError(f"cannot read tasks per node {tasks_per_node!r}")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts[node_id]


def distributed_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables of the srun task whose environment is `env`."""
    return {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env["SLURM_LOCALID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_WORLD_SIZE": str(tasks_on_node(env["SLURM_STEP_TASKS_PER_NODE"], int(env["SLURM_NODEID"]))),
        "MASTER_ADDR": hostnames(env["SLURM_JOB_NODELIST"])[0],
        "MASTER_PORT": str(master_port(env["SLURM_JOB_ID"])),
    }


def requeue_note(env: Mapping[str, str]) -> str:
    """ " (requeue k of job J)" for a job SLURM restarted, else ""."""
    restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    return f" (requeue {restarts} of job {env['SLURM_JOB_ID']})" if restarts and "SLURM_JOB_ID" in env else ""


def job_log_dir(run_dir: str, job_id: str) -> Path:
    """`<run_dir>/slurm/<job id>/`: one folder per job, appended to across its requeues."""
    return Path(run_dir) / "slurm" / job_id
