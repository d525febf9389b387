"""Training-step throughput of lm2's engine against a plain-PyTorch loop of the same model, in one run.

    python bench/train_step.py --config configs/tiny.yaml [--steps 20] [overrides...]

Single process. The reference is LM2Model + torch.optim.AdamW with the same batches, clipping and micro-batching,
without DeepSpeed; the ratio (lm2 tokens/s over reference tokens/s) is what lm2's machinery costs or saves. The
same pair is measured for the vanilla backbone (memory off), so the memory module's cost shows as a ratio too.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from lm2.model.lm import LM2Model, mean_loss
from lm2.pipeline.config import load_config
from lm2.pipeline.parallel.init import init_distributed
from lm2.pipeline.parallel.mpu import tensor_parallel
from lm2.pipeline.train.engine import build_engine
from lm2.pipeline.train.step import train_step


def batches(run, count: int):
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, run.model.vocab_size, (count, run.train.micro_batch, run.model.row_length + 1),
                         generator=generator)
    return [(r[:, :-1], r[:, 1:]) for r in rows]


def timed(step, micro_batches, steps: int, warmup: int = 2) -> float:
    """Seconds per optimizer step, after warmup steps."""
    for _ in range(warmup):
        step(micro_batches)
    start = time.perf_counter()
    for _ in range(steps):
        step(micro_batches)
    return (time.perf_counter() - start) / steps


def plain_step(model: LM2Model, optimizer, clip: float):
    def step(micro_batches):
        for inputs, labels in micro_batches:
            (mean_loss(model(inputs), labels) / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure(run, dims, steps: int) -> dict[str, float]:
    run = dataclasses.replace(run, parallel=dataclasses.replace(run.parallel, zero_stage=0))
    engine = build_engine(run, dims)
    micro_batches = batches(run, engine.grad_accum)
    lm2_s = timed(lambda mb: train_step(engine, mb), micro_batches, steps)
    model = LM2Model(run.model, tensor_parallel(), seed=run.train.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.optim.lr, betas=(run.optim.beta1, run.optim.beta2))
    plain_s = timed(plain_step(model, optimizer, run.optim.grad_clip), micro_batches, steps)
    tokens = run.train.global_batch * run.model.row_length
    return {"lm2_tokens_per_s": tokens / lm2_s, "plain_tokens_per_s": tokens / plain_s, "ratio": plain_s / lm2_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    dims = init_distributed()
    result = {"config": args.config, "threads": torch.get_num_threads()}
    for name, extra in (("lm2", []), ("vanilla", ["model.memory.enabled=false"])):
        run = load_config(args.config, args.overrides + extra)
        result[name] = measure(run, dims, args.steps)
    result["memory_cost_ratio"] = result["vanilla"]["lm2_tokens_per_s"] / result["lm2"]["lm2_tokens_per_s"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
