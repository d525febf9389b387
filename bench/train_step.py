"""Training-step throughput of lm2's engine against a plain-PyTorch loop, and LM2 against its vanilla backbone.

    python bench/train_step.py --config configs/tiny.yaml [--rounds 7] [--steps 2] [--profile] [--compile] [--carry]
        [overrides]

One process, on the engine's device: a GPU when there is one (bf16, nccl; every timing waits for the GPU's
queued work), else the CPU (fp32, gloo). Five subjects share each round, in turn: lm2's engine (DeepSpeed, the
config's ZeRO stage) and a plain loop (LM2Model + torch.optim.AdamW, fused like the engine's, same batches,
clipping and micro-batching, eager) for LM2, the same two for the vanilla backbone (memory off), and the engine for
LM2's own backbone (memory.layers=[]: attention within segments, RoPE restarting per segment, no memory banks).
Reported, as medians of per-round ratios:
- engine_vs_plain: plain seconds / engine seconds (1.0: lm2's machinery costs nothing; target >= 0.9);
- lm2_vs_vanilla: LM2 tokens/s over vanilla tokens/s (engine), its ideal (vanilla FLOPs / LM2 FLOPs, analytic),
  their quotient (efficiency; target >= 0.9), and the peak memory ratio. Peak memory here is weights + gradients
  + AdamW state after a step plus the bytes autograd saves for backward in one micro-batch (exact counts, not RSS);
- backbone_vs_vanilla and lm2_vs_backbone: the same ratio in two parts, the segmented attention alone, then the
  memory banks added to it, with memory_per_flop: the banks' FLOPs per second over the backbone's (1.0: the
  memory costs as much per FLOP as the backbone it is added to).
--profile prints torch.profiler's top operators of the plain LM2 step; --compile adds both engines with
train.compile=true (compiled blocks; the first, untimed round compiles); --carry adds LM2's engine with carried
memory (train.carry.mode=state) and reports carry_overhead, its step time over the engine's without (target
<= 1.02). Prints one JSON line, then a summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys

import torch
from measure import interleaved, median_ratio, saved_activation_bytes, state_bytes, synchronize

from lm2.model.accounting import forward_flops_per_token
from lm2.model.lm import LM2Model, mean_loss
from lm2.pipeline.config import load_config
from lm2.pipeline.parallel.init import init_distributed
from lm2.pipeline.parallel.mpu import tensor_parallel
from lm2.pipeline.train.carry import CarriedMemory
from lm2.pipeline.train.engine import build_engine, params_dtype
from lm2.pipeline.train.step import train_step


def batches(run, count: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(
        0, run.model.vocab_size, (count, run.train.micro_batch, run.model.row_length + 1), generator=generator
    ).to(device)
    return [(r[:, :-1], r[:, 1:]) for r in rows]


def plain_step(model: LM2Model, optimizer, clip: float, micro_batches):
    def step():
        for inputs, labels in micro_batches:
            (mean_loss(model(inputs), labels) / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def carried_step(run, dims, micro_batches):
    """LM2's engine with train.carry.mode=state, its lanes carried from step to step."""
    run = dataclasses.replace(
        run, train=dataclasses.replace(run.train, carry=dataclasses.replace(run.train.carry, mode="state"))
    )
    engine = build_engine(run, dims)
    carry = CarriedMemory.of_engine(engine, run)
    batches = [{"input_ids": inputs, "labels": labels} for inputs, labels in micro_batches]
    steps = iter(range(1 << 62))

    def step():
        train_step(engine, carry.micro_batches(next(steps), batches))
        carry.commit()

    return step


def repeat(step, times: int):
    def run():
        for _ in range(times):
            step()

    return run


def plain_model(run, device: torch.device):
    """The same model in the engine's dtype (bf16 on GPU) on its device; torch's fused AdamW, the engine's
    implementation, updates the weights in that dtype (the engine keeps fp32 master weights: more work, so the
    reference errs on the fast side)."""
    model = LM2Model(run.model, tensor_parallel(params_dtype(run.train)), seed=run.train.seed).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=run.optim.lr, betas=(run.optim.beta1, run.optim.beta2), fused=True
    )
    return model, optimizer


def peak_bytes(run, micro_batches, device: torch.device) -> int:
    """Weights, grads and AdamW state after a step, plus one micro-batch's saved activations (plain model)."""
    model, optimizer = plain_model(run, device)
    plain_step(model, optimizer, run.optim.grad_clip, micro_batches)()
    inputs, labels = micro_batches[0]
    activations = saved_activation_bytes(model, lambda: mean_loss(model(inputs), labels))
    return state_bytes(model, optimizer) + activations


def backbone_split(seconds: dict[str, list[float]], flops: dict[str, int]) -> dict:
    """LM2/vanilla as vanilla -> LM2's backbone -> LM2, to tell which part falls short of its FLOPs: the segmented
    attention or the memory banks. memory_per_flop: the banks' FLOPs (LM2's less the backbone's) over the seconds
    they add, against the backbone's FLOPs over its seconds, the median over same-round pairs."""
    lm2, backbone = seconds["lm2/engine"], seconds["backbone/engine"]
    memory_flops = flops["lm2"] - flops["backbone"]
    # A round where LM2 was no slower than its backbone (noise) counts as infinitely efficient, not as an error.
    per_flop = [memory_flops * b / (flops["backbone"] * (m - b)) if m > b else math.inf for m, b in zip(lm2, backbone)]
    return {
        "backbone_vs_vanilla": {
            "tokens_per_s_ratio": median_ratio(seconds["vanilla/engine"], backbone),
            "ideal_flops_ratio": flops["vanilla"] / flops["backbone"],
        },
        "lm2_vs_backbone": {
            "tokens_per_s_ratio": median_ratio(backbone, lm2),
            "ideal_flops_ratio": flops["backbone"] / flops["lm2"],
            "memory_per_flop": statistics.median(per_flop),
        },
    }


def profile(step) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with torch_profile(activities=activities) as prof:
        step()
        synchronize()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=20), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per subject per round")
    parser.add_argument("--profile", action="store_true", help="print the plain LM2 step's top operators")
    parser.add_argument("--compile", action="store_true", help="also time both engines with train.compile=true")
    parser.add_argument("--carry", action="store_true", help="also time LM2's engine with train.carry.mode=state")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    dims = init_distributed()
    runs = {
        "lm2": load_config(args.config, args.overrides),
        "vanilla": load_config(args.config, args.overrides + ["model.memory.enabled=false"]),
    }
    subjects, micro_batches = {}, {}
    for name, run in runs.items():
        engine = build_engine(run, dims)
        device = engine.deepspeed.device
        micro_batches[name] = batches(run, engine.grad_accum, device)
        subjects[f"{name}/engine"] = repeat(lambda e=engine, mb=micro_batches[name]: train_step(e, mb), args.steps)
        model, optimizer = plain_model(run, device)
        subjects[f"{name}/plain"] = repeat(
            plain_step(model, optimizer, run.optim.grad_clip, micro_batches[name]), args.steps
        )
    if args.compile:
        for name, run in runs.items():
            engine = build_engine(dataclasses.replace(run, train=dataclasses.replace(run.train, compile=True)), dims)
            subjects[f"{name}/engine-compiled"] = repeat(
                lambda e=engine, mb=micro_batches[name]: train_step(e, mb), args.steps
            )
    if args.carry:
        subjects["lm2/engine-carry"] = repeat(carried_step(runs["lm2"], dims, micro_batches["lm2"]), args.steps)
    backbone = load_config(args.config, args.overrides + ["model.memory.layers=[]"])
    backbone_engine = build_engine(backbone, dims)
    subjects["backbone/engine"] = repeat(lambda: train_step(backbone_engine, micro_batches["lm2"]), args.steps)
    seconds = interleaved(subjects, args.rounds)
    tokens = args.steps * runs["lm2"].train.global_batch * runs["lm2"].model.row_length
    flops = {name: forward_flops_per_token(run.model) for name, run in runs.items()}
    flops["backbone"] = forward_flops_per_token(backbone.model)
    peaks = {name: peak_bytes(run, micro_batches[name], device) for name, run in runs.items()}
    speed = median_ratio(seconds["vanilla/engine"], seconds["lm2/engine"])
    ideal = flops["vanilla"] / flops["lm2"]
    result = {
        "bench": "train_step",
        "config": args.config,
        "overrides": args.overrides,
        "device": str(device),
        "dtype": str(params_dtype(runs["lm2"].train)),
        "threads": torch.get_num_threads(),
        "zero_stage": runs["lm2"].parallel.zero_stage,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "tokens_per_s": {name: tokens / statistics.median(s) for name, s in seconds.items()},
        "engine_vs_plain": {name: median_ratio(seconds[f"{name}/plain"], seconds[f"{name}/engine"]) for name in runs},
        "lm2_vs_vanilla": {
            "tokens_per_s_ratio": speed,
            "ideal_flops_ratio": ideal,
            "efficiency": speed / ideal,
            "peak_memory_ratio": peaks["lm2"] / peaks["vanilla"],
        },
        "peak_bytes": peaks,
        **backbone_split(seconds, flops),
    }
    if args.compile:
        result["compiled_vs_eager"] = {
            name: median_ratio(seconds[f"{name}/engine"], seconds[f"{name}/engine-compiled"]) for name in runs
        }
        result["lm2_vs_vanilla_compiled"] = median_ratio(
            seconds["vanilla/engine-compiled"], seconds["lm2/engine-compiled"]
        )
    if args.carry:
        result["carry_overhead"] = median_ratio(seconds["lm2/engine-carry"], seconds["lm2/engine"])
    print(json.dumps(result))
    ratios = result["engine_vs_plain"]
    print(f"engine vs plain loop: LM2 {ratios['lm2']:.2f}, vanilla {ratios['vanilla']:.2f} (target >= 0.9)")
    print(
        f"LM2 vs vanilla: tokens/s {speed:.2f} of an ideal {ideal:.2f} (efficiency {speed / ideal:.2f}, "
        f"target >= 0.9), peak memory x{peaks['lm2'] / peaks['vanilla']:.2f}"
    )
    print("tokens/s: " + ", ".join(f"{name} {value:,.0f}" for name, value in result["tokens_per_s"].items()))
    bb, mem = result["backbone_vs_vanilla"], result["lm2_vs_backbone"]
    print(
        f"LM2's backbone (memory.layers=[]) vs vanilla: tokens/s {bb['tokens_per_s_ratio']:.2f} of an ideal "
        f"{bb['ideal_flops_ratio']:.2f}; LM2 vs its backbone: {mem['tokens_per_s_ratio']:.2f} of an ideal "
        f"{mem['ideal_flops_ratio']:.2f} (the memory's FLOPs/s: {mem['memory_per_flop']:.2f} of the backbone's)"
    )
    if args.compile:
        gains = result["compiled_vs_eager"]
        print(
            f"train.compile vs eager (engine): LM2 {gains['lm2']:.2f}x, vanilla {gains['vanilla']:.2f}x; "
            f"LM2 vs vanilla compiled {result['lm2_vs_vanilla_compiled']:.2f}"
        )
    if args.carry:
        print(
            f"carried memory (state): LM2 step time x{result['carry_overhead']:.3f} of the engine's without "
            "(target <= 1.02)"
        )
    if args.profile:
        profile(subjects["lm2/plain"])


if __name__ == "__main__":
    main()
