import os
import warnings

import pytest

# Offline by default: tests never talk to a wandb server.
os.environ.setdefault("WANDB_MODE", "offline")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


@pytest.fixture(autouse=True)
def _destroy_leftover_groups():
    """A test that initialised a process group in this process must not leak it into the next one."""
    yield
    from lm2.pipeline.parallel.init import destroy_distributed

    destroy_distributed()


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def single_process():
    """A world of one: megatron-core's layers need parallel_state even without parallelism. The launcher
    variables init_distributed sets are removed afterwards, so subprocesses of later tests start clean."""
    from lm2.pipeline.parallel.init import init_distributed

    saved = {key: os.environ.pop(key) for key in LAUNCHER_VARIABLES if key in os.environ}
    yield init_distributed()
    for key in LAUNCHER_VARIABLES:
        os.environ.pop(key, None)
    os.environ.update(saved)
