"""The cost of the memory's stability options (model.memory.write_rule, read_norm) against the paper's rule.

    python bench/memory_options.py --config configs/tiny.yaml [--rounds 15] [overrides]

One process on CPU (fp32, the fused memory kernels where they apply). Two measurements, each over four models of
the config that differ only in the options (paper, convex, paper + read norm, convex + read norm), in turn within
every round: a plain forward and backward of the whole model on one micro-batch (train.micro_batch rows), and of
the first block's memory module alone on random inputs. Reported: each option's seconds over the paper rule's, the
median of per-round ratios (1.0: free), and the paper rule's median milliseconds. Prints one JSON line, then a
summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from measure import interleaved, median_ratio

from lm2.model.lm import LM2Model, mean_loss
from lm2.pipeline.config import load_config
from lm2.pipeline.parallel.init import world_of_one
from lm2.pipeline.parallel.mpu import tensor_parallel

OPTIONS = {
    "paper": {},
    "convex": dict(write_rule="convex"),
    "paper+read_norm": dict(read_norm=True),
    "convex+read_norm": dict(write_rule="convex", read_norm=True),
}


def models(base) -> dict[str, LM2Model]:
    return {
        name: LM2Model(dataclasses.replace(base, memory=dataclasses.replace(base.memory, **fields)), tensor_parallel())
        for name, fields in OPTIONS.items()
    }


def model_step(model: LM2Model, rows: torch.Tensor):
    def run() -> None:
        model.zero_grad(set_to_none=True)
        mean_loss(model(rows[:, :-1]), rows[:, 1:]).backward()

    return run


def memory_step(model: LM2Model, xn: torch.Tensor):
    memory = model.layers[0].memory

    def run() -> None:
        memory.zero_grad(set_to_none=True)
        memory(xn.clone().requires_grad_(), model.cfg.segment_length).square().mean().backward()

    return run


def ratios(seconds: dict[str, list[float]]) -> dict[str, float]:
    out = {name: round(median_ratio(seconds[name], seconds["paper"]), 3) for name in OPTIONS if name != "paper"}
    out["paper_ms"] = round(1000 * sorted(seconds["paper"])[len(seconds["paper"]) // 2], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    run = load_config(args.config, args.overrides)
    cfg = run.model
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, cfg.vocab_size, (run.train.micro_batch, cfg.row_length + 1), generator=generator)
    xn = torch.randn(run.train.micro_batch, cfg.row_length, cfg.hidden_size, generator=generator)
    with world_of_one():
        built = models(cfg)
        report = {
            name: ratios(interleaved({option: make(model, data) for option, model in built.items()}, args.rounds))
            for name, make, data in (("model_step", model_step, rows), ("memory_module", memory_step, xn))
        }
    report.update(rounds=args.rounds, threads=torch.get_num_threads())
    print(json.dumps(report))
    for name in ("model_step", "memory_module"):
        shown = ", ".join(f"{option} x{report[name][option]}" for option in OPTIONS if option != "paper")
        print(f"{name}: paper {report[name]['paper_ms']} ms; {shown}")


if __name__ == "__main__":
    main()
