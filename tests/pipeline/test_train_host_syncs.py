"""No host sync inside a training step except on log steps and before a checkpoint.

On a GPU, reading a tensor's value on the host (`.item()`, `.tolist()`, `float(t)`, `bool(t)`, ...) waits for every
kernel queued so far. torch's sync debug mode sees this on CUDA only, so the test counts the reads themselves: it
wraps torch.Tensor's value-reading methods with a counter for a real training run, and attributes each read to the
code that made it. Reads made by lm2's own code must happen only on log steps and before the final save; reads
inside DeepSpeed and torch (ZeRO's overflow check, Adam's host-side step counter) are theirs and are not counted.
"""

import collections
import inspect
import json
from pathlib import Path

import pytest
import torch

import lm2.model
import lm2.pipeline
from tests.distributed import run_distributed

CONFIG = Path(__file__).parent / "tiny_train.yaml"
VALUE_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy")
LM2_SOURCE = tuple(str(Path(package.__file__).parent) for package in (lm2.model, lm2.pipeline))


def _lm2_caller() -> str | None:
    """`file:function` of the code that called the wrapped method, if it is lm2's."""
    caller = inspect.currentframe().f_back.f_back  # this frame <- the counting wrapper <- the reading code
    if caller.f_code.co_filename.startswith(LM2_SOURCE):
        return f"{Path(caller.f_code.co_filename).name}:{caller.f_code.co_name}"
    return None


def _train_counting_reads(overrides: list[str], out: str) -> None:
    from lm2.pipeline.config import load_config
    from lm2.pipeline.train.build import build
    from lm2.pipeline.train.loop import Trainer

    trainer = Trainer(build(load_config(CONFIG, overrides)))
    reads: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in VALUE_READS}

    def counting(name):
        def read(self, *args, **kwargs):
            caller = _lm2_caller()
            if caller is not None:
                reads[caller] += 1
            return originals[name](self, *args, **kwargs)

        return read

    for name in VALUE_READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        trainer.fit()
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
    Path(out).write_text(json.dumps(reads))


@pytest.mark.parametrize("carry", ["none", "state", "document"])
def test_lm2_reads_tensors_on_the_host_only_on_log_steps_and_saves(train_data, train_documents, tmp_path, carry):
    """Also with carried memory: lanes, resets and slot norms add no read of their own."""
    steps, log_every = 8, 4  # steps 4 and 8 log; step 8 also saves; steps 1-3 and 5-7 must not read
    out = tmp_path / "reads.json"
    data = train_documents if carry == "document" else train_data + [f"train.carry.mode={carry}"]
    run_distributed(
        _train_counting_reads,
        world_size=1,
        args=(
            data
            + [
                f"logging.run_dir={tmp_path / 'run'}",
                f"train.steps={steps}",
                f"train.log_every={log_every}",
                "train.eval_every=0",
                "checkpoint.every=0",
                "logging.wandb=disabled",
            ],
            str(out),
        ),
    )
    reads = json.loads(out.read_text())
    log_steps = steps // log_every
    # One read of the non-finite watch per log step and one before the save; one transfer of the metrics per log
    # step. A read in every step would count at least `steps` times.
    assert reads == {"step.py:check": log_steps + 1, "loop.py:_train_metrics": log_steps}, reads
