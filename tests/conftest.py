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


@pytest.fixture
def single_process():
    """A world of one: megatron-core's layers need parallel_state even without parallelism."""
    from lm2.pipeline.parallel.init import init_distributed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    return init_distributed()
