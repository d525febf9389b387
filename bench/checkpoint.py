"""Checkpoint save and load time and size, against torch.save/torch.load of the same model, in the same run.

    python bench/checkpoint.py --config configs/tiny.yaml [--rounds 5] [overrides...]

One process. lm2's save (DeepSpeed shards, RNG state, manifest with sha256 of every file, `latest`) and load
(DeepSpeed load with optimizer and schedule, RNG state) of an engine after one step alternate with a plain
reference: torch.save / torch.load + load_state_dict of an LM2Model and its torch AdamW after one step. Bytes are
compared with the analytic size: weights plus AdamW's two moments (fp32: 4 + 8 bytes per parameter). Then
the training time a save costs, synchronous against asynchronous (checkpoint.async_save): training steps alone,
after a synchronous save, and after an asynchronous save started and until it is published (its background writer
shares the CPU with training).
Prints one JSON line, then a summary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from measure import interleaved, median_ratio, synchronize
from train_step import batches, plain_model, plain_step

from lm2.model.accounting import parameter_counts
from lm2.pipeline.checkpoint.format import Manifest, read_manifest
from lm2.pipeline.checkpoint.resume import load
from lm2.pipeline.checkpoint.save import PendingSave, Retention, save
from lm2.pipeline.config import load_config
from lm2.pipeline.parallel.init import host_group, init_distributed
from lm2.pipeline.train.engine import build_engine
from lm2.pipeline.train.step import train_step


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-between", type=int, default=3, help="training steps after each save")
    parser.add_argument(
        "--train-threads",
        type=int,
        help="torch's threads for training (default: every core); fewer leave the "
        "background writer a core of its own, as on a GPU node whose host CPU is mostly idle",
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    run = load_config(args.config, args.overrides)
    engine = build_engine(run, init_distributed())
    if args.train_threads:  # after init_distributed, which gives each rank its share of the cores
        torch.set_num_threads(args.train_threads)
    device = engine.deepspeed.device
    micro_batches = batches(run, engine.grad_accum, device)
    train_step(engine, micro_batches)
    model, optimizer = plain_model(run, device)
    plain_step(model, optimizer, run.optim.grad_clip, micro_batches)()
    steps = itertools.count(1)
    with tempfile.TemporaryDirectory() as tmp:
        root, reference = Path(tmp) / "checkpoints", Path(tmp) / "reference.pt"
        saved: list[Path] = []

        def lm2_save():
            manifest = Manifest(step=next(steps), layout=engine.layout, config=run.to_dict())
            saved.append(save(engine, root, manifest, Retention(keep=1)))

        def plain_save():
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, reference)

        def plain_load():
            state = torch.load(reference, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])

        seconds = interleaved({"lm2_save": lm2_save, "plain_save": plain_save}, args.rounds)
        seconds |= interleaved(
            {"lm2_load": lambda: load(engine.deepspeed, saved[-1], read_manifest(saved[-1])), "plain_load": plain_load},
            args.rounds,
        )
        lm2_bytes, plain_bytes = folder_bytes(saved[-1]), reference.stat().st_size
        seconds |= lost_rounds(engine, run, root, steps, args.rounds, args.steps_between, micro_batches)
    parameters = parameter_counts(run.model).total
    analytic = parameters * (4 + 8)
    result = {
        "bench": "checkpoint",
        "config": args.config,
        "overrides": args.overrides,
        "rounds": args.rounds,
        "train_threads": torch.get_num_threads(),
        "zero_stage": run.parallel.zero_stage,
        "parameters": parameters,
        "seconds": {name: statistics.median(s) for name, s in seconds.items()},
        "save_ratio": median_ratio(seconds["lm2_save"], seconds["plain_save"]),
        "load_ratio": median_ratio(seconds["lm2_load"], seconds["plain_load"]),
        "checkpoint_bytes": lm2_bytes,
        "async_lost_ratio": statistics.median(seconds["async_lost"]) / statistics.median(seconds["sync_lost"]),
        "bytes": {"lm2": lm2_bytes, "plain": plain_bytes, "analytic": analytic},
        "bytes_over_analytic": {"lm2": lm2_bytes / analytic, "plain": plain_bytes / analytic},
    }
    print(json.dumps(result))
    s = result["seconds"]
    print(
        f"save {s['lm2_save']:.3f} s (x{result['save_ratio']:.2f} torch.save), load {s['lm2_load']:.3f} s "
        f"(x{result['load_ratio']:.2f} torch.load); {lm2_bytes / 1e6:.1f} MB = x{lm2_bytes / analytic:.2f} the "
        f"analytic {analytic / 1e6:.1f} MB (torch.save x{plain_bytes / analytic:.2f})"
    )
    print(
        f"training time lost per save of {lm2_bytes / 1e9:.2f} GB: {s['async_lost']:.3f} s asynchronous against "
        f"{s['sync_lost']:.3f} s synchronous (x{result['async_lost_ratio']:.2f}; {args.steps_between} steps of "
        f"{s['steps'] / args.steps_between:.2f} s after each save); staging blocks the loop "
        f"{s['async_blocked']:.3f} s; CPU: {s['sync_save_cpu']:.3f} s a synchronous save, "
        f"{s['async_writer_cpu']:.3f} s the asynchronous writer"
    )


def lost_rounds(engine, run, root: Path, steps, rounds: int, between: int, micro_batches) -> dict[str, list[float]]:
    """The training time a save costs, synchronous against asynchronous. Each round times `between` training steps
    alone, then a synchronous save followed by as many steps, then an asynchronous save started, as many steps, and
    the wait until it is published (what the loop's next save or its end would wait for). A save's lost time is its
    round's seconds less the steps alone. Also the seconds an asynchronous save blocks its caller (staging), and the
    CPU seconds of a synchronous save (the process's, every thread) and of an asynchronous save's background writer
    (that thread's alone, staging not included): on a host whose cores all train, the writer's CPU is training time
    lost whatever the overlap."""
    group = host_group()
    retention = Retention(keep=1)

    def train() -> None:
        for _ in range(between):
            train_step(engine, micro_batches)

    def timed(action) -> float:
        synchronize()
        start = time.perf_counter()
        action()
        synchronize()
        return time.perf_counter() - start

    sync_cpu: list[float] = []

    def sync_save() -> None:
        started = time.process_time()
        save(engine, root, Manifest(step=next(steps), layout=engine.layout, config=run.to_dict()), retention)
        sync_cpu.append(time.process_time() - started)
        train()

    blocked: list[float] = []
    writer_cpu: list[float] = []

    def async_save() -> None:
        manifest = Manifest(step=next(steps), layout=engine.layout, config=run.to_dict())
        blocked.append(timed(lambda: pending.append(PendingSave.start(engine, root, manifest, retention))))
        train()
        pending[-1].poll(group, wait=True)
        writer_cpu.append(pending.pop().writer_cpu)

    pending: list[PendingSave] = []
    seconds: dict[str, list[float]] = {"steps": [], "sync_lost": [], "async_lost": []}
    for round in range(rounds + 1):  # the first round warms up
        alone, synced, background = timed(train), timed(sync_save), timed(async_save)
        if round:
            seconds["steps"].append(alone)
            seconds["sync_lost"].append(synced - alone)
            seconds["async_lost"].append(background - alone)
    seconds["async_blocked"] = blocked[1:]
    seconds["sync_save_cpu"], seconds["async_writer_cpu"] = sync_cpu[1:], writer_cpu[1:]
    return seconds


if __name__ == "__main__":
    main()
