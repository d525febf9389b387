import os
import warnings

import pytest

# Offline by default: tests never talk to a wandb server.
os.environ.setdefault("WANDB_MODE", "offline")
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
