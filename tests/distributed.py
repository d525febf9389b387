"""run_distributed: run a module-level function on N real gloo ranks (after OLMo-core's testing helper).

Each rank gets RANK/WORLD_SIZE/MASTER_* in its environment, so the code under test initialises exactly as it
does under torchrun. A rank's exception fails the test with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, func: Callable, args: tuple, errors) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        func(*args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        from lm2.pipeline.parallel.init import destroy_distributed

        destroy_distributed()


def run_distributed(func: Callable, world_size: int, args: tuple[Any, ...] = ()) -> None:
    """Runs func(*args) on world_size spawned processes; raises if any rank fails."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_rank_main, args=(world_size, free_port(), func, args, errors), nprocs=world_size,
                           start_method="spawn")
    except mp.ProcessRaisedException as exc:
        details = []
        while not errors.empty():
            rank, tb = errors.get()
            details.append(f"--- rank {rank} ---\n{tb}")
        raise AssertionError("\n".join(details) or str(exc)) from None
