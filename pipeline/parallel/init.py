"""Process groups: torch.distributed from the launcher's environment, then megatron-core's TP/PP/DP groups."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from lm2.pipeline.console import library_prints
from lm2.pipeline.launch.environment import launcher_environment
from lm2.pipeline.parallel.dims import ParallelDims


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(tp: int = 1, pp: int = 1, backend: str | None = None) -> ParallelDims:
    """Joins the process group described by RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (from torchrun, local.sh, or an
    srun task's SLURM variables) and builds megatron-core's groups. Without a launcher it is a world of one, which
    megatron-core's layers still need. Idempotent for the default group; returns the validated degrees."""
    os.environ.update(launcher_environment(os.environ))
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks on one node share its cores; oversubscribed OpenMP threads spin and slow every rank down
        # several-fold (torchrun sets OMP_NUM_THREADS=1 for the same reason).
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    if not dist.is_initialized():
        backend = backend or default_backend()
        if backend == "nccl":
            # Modulo: a task bound to its own GPU by the scheduler sees one device, numbered 0.
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=10))
    # DeepSpeed's comm layer adopts the existing group (PipelineModule talks through it before initialize).
    with library_prints():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    deepspeed.utils.logger.setLevel(logging.WARNING)  # its per-step INFO lines drown lm2's own log
    dims = ParallelDims(world_size=dist.get_world_size(), tp=tp, pp=pp)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, order="tp-cp-ep-dp-pp"
    )
    return dims


def host_group() -> dist.ProcessGroup:
    """A gloo group over the world for host-side flags: reducing a CPU tensor over it never waits for the device.
    On a NCCL world this creates one, a collective: call it once, on every rank."""
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def destroy_distributed() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def world_of_one() -> Iterator[None]:
    """megatron-core's layers need parallel_state even in one process. A group made here is destroyed afterwards
    and the launcher variables init_distributed sets are restored, so the caller's process is left as it was."""
    if dist.is_initialized():
        yield
        return
    saved = {key: os.environ.get(key) for key in LAUNCHER_VARIABLES}
    try:
        init_distributed()
        yield
    finally:
        destroy_distributed()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
