import os
import sys
import warnings

import pytest

# Offline by default: tests never talk to a wandb server.
os.environ.setdefault("WANDB_MODE", "offline")
# One OpenMP thread per process (before torch loads; tests' subprocesses inherit it): the suite runs on pytest-xdist
# workers and most tests launch ranks of their own, so threads sized to the cores oversubscribe them, and OpenMP's
# spinning threads then slowed jobs several-fold (a one-step training run: 9 s alone, 66 s in the suite).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The venv's tools first, as the launchers have them (launch/*.sh activate it): DeepSpeed JIT-builds a C++ op in
# every training process, and the venv's ninja and the system's keep build logs the other cannot read, so
# alternating between them rebuilt it (about 30 CPU-seconds) in every other process of the suite.
os.environ["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


@pytest.fixture(autouse=True)
def _restore_environment():
    """A test that runs `lm2` in-process (cli.main) must not leave its settings (e.g. the quiet-console variables for
    wandb) in the environment of later tests' subprocesses."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _destroy_leftover_groups():
    """A test that initialised a process group in this process must not leak it into the next one."""
    yield
    from lm2.pipeline.parallel.init import destroy_distributed

    destroy_distributed()


@pytest.fixture
def single_process():
    """A world of one: megatron-core's layers need parallel_state even without parallelism. The launcher
    variables init_distributed sets are restored afterwards, so subprocesses of later tests start clean."""
    from lm2.pipeline.parallel.dims import ParallelDims
    from lm2.pipeline.parallel.init import world_of_one

    with world_of_one():
        yield ParallelDims(world_size=1)
