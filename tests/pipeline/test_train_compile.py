"""train.compile: the compiled blocks train the same model as the eager ones (fp32, same batches)."""

from pathlib import Path

import torch

from lm2.model.block import DecoderBlock
from lm2.pipeline.config import load_config
from lm2.pipeline.train.engine import build_engine
from lm2.pipeline.train.step import train_step

CONFIG = Path(__file__).parent / "tiny_train.yaml"


def test_compiled_blocks_give_the_eager_losses(single_process):
    rows = torch.randint(0, 400, (3, 8, 33), generator=torch.Generator().manual_seed(0))
    losses = {}
    for compiled in (False, True):
        run = load_config(CONFIG, [f"train.compile={str(compiled).lower()}", "parallel.zero_stage=0"])
        engine = build_engine(run, single_process)
        blocks = [m for m in engine.deepspeed.module.modules() if isinstance(m, DecoderBlock)]
        assert len(blocks) == 4 and all((b._compiled_call_impl is not None) == compiled for b in blocks)
        losses[compiled] = [train_step(engine, [(r[:, :-1], r[:, 1:]) for r in step.split(2)])[0].item()
                            for step in rows]
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-5, atol=1e-5)
