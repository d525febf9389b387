"""Processes for tests: run_distributed runs a module-level function on N real gloo ranks (after OLMo-core's testing
helper); lm2_cli runs an `lm2` command in a process of its own.

Each rank gets RANK/WORLD_SIZE/MASTER_* in its environment, so the code under test initialises exactly as it
does under torchrun. A rank's exception fails the test with that rank's traceback.

Both fork their processes from multiprocessing's fork server, which imports torch, megatron-core, DeepSpeed and
streaming once per pytest worker: a fresh interpreter spends 4-7 CPU-seconds importing them, for every rank and
command of every test, on a suite bound by its 2 cores. The server is a fresh single-threaded process (forking the
test process itself would copy its threads' state), and each child takes the test's current environment and
working directory, not the server's.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

multiprocessing.set_forkserver_preload(["lm2.pipeline.train.loop", "lm2.pipeline.hf.export"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _take_environment(env: dict) -> None:
    """A forked child starts with the fork server's environment: replace it with the test's."""
    os.environ.clear()
    os.environ.update(env)


def _rank_main(rank: int, world_size: int, port: int, env: dict, func: Callable, args: tuple, errors) -> None:
    _take_environment(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        func(*args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        from lm2.pipeline.parallel.init import destroy_distributed

        destroy_distributed()


def run_distributed(func: Callable, world_size: int, args: tuple[Any, ...] = (), fresh: bool = False) -> None:
    """Runs func(*args) on world_size processes; raises if any rank fails. fresh: start new interpreters instead,
    for what is read at process start only (glibc's MALLOC_* variables)."""
    method = "spawn" if fresh else "forkserver"
    errors = mp.get_context(method).SimpleQueue()
    try:
        mp.start_processes(
            _rank_main,
            args=(world_size, free_port(), dict(os.environ), func, args, errors),
            nprocs=world_size,
            start_method=method,
        )
    except mp.ProcessRaisedException as exc:
        details = []
        while not errors.empty():
            rank, tb = errors.get()
            details.append(f"--- rank {rank} ---\n{tb}")
        raise AssertionError("\n".join(details) or str(exc)) from None


def _cli_main(argv: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    _take_environment(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    from lm2.pipeline.cli import main

    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def lm2_cli(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`lm2 *argv` in a process of its own, forked from the fork server (see above): exit code, stdout and stderr
    as subprocess.run(capture_output=True, text=True) gives them. What a library prints while it is imported is not
    in them (the server imported it): a test of the console reads a fresh process instead."""
    with tempfile.TemporaryDirectory() as folder:
        out, err = Path(folder, "stdout"), Path(folder, "stderr")
        process = mp.get_context("forkserver").Process(
            target=_cli_main, args=(argv, dict(os.environ), os.getcwd(), str(out), str(err))
        )
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["lm2", *argv], timeout)
        return subprocess.CompletedProcess(["lm2", *argv], process.exitcode, out.read_text(), err.read_text())
