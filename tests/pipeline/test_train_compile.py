"""train.compile: compiled blocks train the same model as eager ones (fp32, same batches), under ZeRO-3 (whose
hooks gather weights inside the blocks) and activation checkpointing, with the gate probes' hooks recording."""

from pathlib import Path

import pytest
import torch

from lm2.model.block import DecoderBlock
from lm2.pipeline.config import load_config
from lm2.pipeline.train.engine import build_engine
from lm2.pipeline.train.memory_monitor import MemoryMonitor
from lm2.pipeline.train.step import train_step

CONFIG = Path(__file__).parent / "tiny_train.yaml"


@pytest.mark.slow  # compiling takes 20-60 s on 2 cores
def test_compiled_blocks_give_the_eager_losses_and_gates(single_process):
    rows = torch.randint(0, 400, (3, 8, 33), generator=torch.Generator().manual_seed(0))
    losses, gates = {}, {}
    for compiled in (False, True):
        run = load_config(
            CONFIG,
            [f"train.compile={str(compiled).lower()}", "parallel.zero_stage=3", "train.activation_checkpointing=true"],
        )
        engine = build_engine(run, single_process)
        blocks = [m for m in engine.deepspeed.module.modules() if isinstance(m, DecoderBlock)]
        assert len(blocks) == 4 and all((b._compiled_call_impl is not None) == compiled for b in blocks)
        monitor = MemoryMonitor(engine.deepspeed.module, run.model.num_layers, engine.deepspeed.device)
        losses[compiled] = []
        for index, step in enumerate(rows):
            with monitor.recording(enabled=index != 1):  # hooks come and go, as on log steps
                losses[compiled].append(train_step(engine, [(r[:, :-1], r[:, 1:]) for r in step.split(2)])[0])
        gates[compiled] = monitor.summary()
    torch.testing.assert_close(torch.stack(losses[True]), torch.stack(losses[False]), rtol=1e-5, atol=1e-5)
    assert gates[False].isfinite().any()
    torch.testing.assert_close(gates[True], gates[False], rtol=1e-5, atol=1e-5, equal_nan=True)
