"""Data- and tensor-parallel scaling on this machine: DP=2 and TP=2 against one process, in the same run.

    python bench/scaling.py --config configs/tiny.yaml [--rounds 3] [--steps 4] [overrides...]

Each round launches the three layouts in turn (1 process, DP=2, TP=2; ranks on this machine, gloo, each rank
with cores/ranks threads) and times `--steps` optimizer steps of lm2's engine after one warm-up step, same global
batch. Ratios are layout tokens/s over one-process tokens/s, medians over rounds (DP target >= 1.6 on 2 cores).
Prints one JSON line, then a summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import median_ratio

LAYOUTS = {"single": (1, []), "dp2": (2, []), "tp2": (2, ["parallel.tp=2"])}


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from lm2.pipeline.config import load_config
    from lm2.pipeline.parallel.init import init_distributed
    from lm2.pipeline.train.engine import build_engine
    from lm2.pipeline.train.step import train_step

    run = load_config(args.config, args.overrides)
    engine = build_engine(run, init_distributed(run.parallel.tp, run.parallel.pp))
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    rows = torch.randint(
        0,
        run.model.vocab_size,
        (run.train.global_batch, run.model.row_length + 1),
        generator=torch.Generator().manual_seed(0),
    ).chunk(dp)[dp_rank]
    micro_batches = [(m[:, :-1], m[:, 1:]) for m in rows.split(run.train.micro_batch)]
    train_step(engine, micro_batches)  # warm-up
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss, _ = train_step(engine, micro_batches)
    loss.item()  # the steps are done (a no-op on CPU, a sync on GPU)
    dist.barrier()
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps({"seconds_per_step": (time.perf_counter() - start) / args.steps}))


def launch(args, nproc: int, layout: list[str], out: Path) -> float:
    from lm2.pipeline.launch.environment import free_port
    from lm2.pipeline.launch.local import rank_environment

    port = free_port()
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--out",
        str(out),
        "--config",
        args.config,
        "--steps",
        str(args.steps),
        *args.overrides,
        *layout,
    ]
    ranks = [subprocess.Popen(command, env=rank_environment(rank, nproc, port)) for rank in range(nproc)]
    if any(rank.wait() for rank in ranks):
        raise SystemExit(f"a rank of {layout or 'one process'} failed")
    return json.loads(out.read_text())["seconds_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from lm2.pipeline.config import load_config

    run = load_config(args.config, args.overrides)
    tokens = run.train.global_batch * run.model.row_length
    seconds: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            for name, (nproc, layout) in LAYOUTS.items():
                seconds[name].append(launch(args, nproc, layout, Path(folder) / f"{name}-{round_}.json"))
    result = {
        "bench": "scaling",
        "config": args.config,
        "overrides": args.overrides,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "zero_stage": run.parallel.zero_stage,
        "tokens_per_s": {name: tokens / statistics.median(s) for name, s in seconds.items()},
        "scaling": {name: median_ratio(seconds["single"], seconds[name]) for name in ("dp2", "tp2")},
    }
    print(json.dumps(result))
    print(
        f"DP=2 {result['scaling']['dp2']:.2f}x (target >= 1.6), TP=2 {result['scaling']['tp2']:.2f}x one process; "
        + ", ".join(f"{name} {value:,.0f} tokens/s" for name, value in result["tokens_per_s"].items())
    )


if __name__ == "__main__":
    main()
