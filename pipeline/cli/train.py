"""`lm2 info` and `lm2 train`."""

from __future__ import annotations

import argparse
import os

from lm2.pipeline.cli.common import VERBOSE_HELP, report
from lm2.pipeline.console import human
from lm2.pipeline.launch.exit_codes import EXIT_NONFINITE


def cmd_info(args: argparse.Namespace) -> None:
    """Parameter counts (embedding, backbone, memory) and FLOPs per token of a config, without building it."""
    from lm2.model.accounting import forward_flops_per_token, parameter_counts
    from lm2.pipeline.config import load_config

    run = load_config(args.config, args.overrides)
    dims = run.validate(args.world_size or run.parallel.tp * run.parallel.pp)
    model = run.model
    counts = parameter_counts(model)
    flops = forward_flops_per_token(model)
    share = counts.memory / (counts.total - counts.memory)
    print(f"config            {args.config}")
    print(
        f"memory            {'on' if model.memory.enabled else 'off'}"
        + (
            f": {model.memory.slots} slots x {model.memory_dim} dims, {model.memory.heads} heads, "
            f"segments of {model.segment_length} tokens"
            if model.memory.enabled
            else ""
        )
    )
    print(f"parameters        {human(counts.total)} ({counts.total:,})")
    print(f"  embedding       {human(counts.embedding)}")
    print(f"  backbone        {human(counts.backbone)}")
    print(f"  memory          {human(counts.memory)} (+{share:.1%} over embedding + backbone)")
    print(f"FLOPs per token   forward {human(flops)}, training (x3) {human(3 * flops)}")
    print(
        f"layout            {dims.world_size} rank(s): tp={dims.tp} pp={dims.pp} dp={dims.dp}, "
        f"{run.train.grad_accum(dims.dp)} micro-batch(es) of {run.train.micro_batch} rows per step and rank"
    )
    _print_plan(run, dims.dp, args.mfu)


def _print_plan(run, dp: int, mfu: float) -> None:
    """Per-device memory (pipeline/train/plan.py) and tokens/s at an MFU."""
    from lm2.pipeline.train.plan import memory_estimate, tokens_per_s_per_device

    params_bytes = 4 if run.train.precision == "fp32" else 2  # auto trains in bf16 on GPUs
    memory = memory_estimate(run, dp, params_bytes)
    par = run.parallel

    def size(n: int) -> str:
        return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

    print(
        f"memory per device dp={dp} tp={par.tp} pp={par.pp} ZeRO-{par.zero_stage} micro_batch={run.train.micro_batch}"
        f" {'fp32' if params_bytes == 4 else 'bf16'} (first pipeline stage; allocated tensors, no allocator slack)"
    )
    print(f"  weights         {size(memory.weights)}")
    print(f"  gradients       {size(memory.gradients)}")
    print(f"  optimizer       {size(memory.optimizer)}")
    if memory.gradient_bucket:
        print(f"  ZeRO bucket     {size(memory.gradient_bucket)} (gradient reduction)")
    chosen = "on" if memory.activation_checkpointing else "off"
    print(
        f"  activations     {size(memory.activations)}, {size(memory.activations_checkpointed)} with "
        f"activation checkpointing (train.activation_checkpointing: {chosen})"
    )
    print(f"  memory state    {size(memory.memory_state)} (part of the activations)")
    if memory.carried:
        print(f"  carried memory  {size(memory.carried)} (train.carry: every lane's state, twice)")
    print(f"  total           {size(memory.total)}")
    if memory.staging:
        print(
            f"host memory       {size(memory.staging)} per rank for asynchronous saves (checkpoint.async_save: "
            "its part of one checkpoint, kept for the next save)"
        )
    import torch

    from lm2.pipeline.train.peak import resolve_peak_tflops

    peak, _ = resolve_peak_tflops(
        run.train.peak_tflops, torch.cuda.get_device_name() if torch.cuda.is_available() else None
    )
    if peak:
        print(f"tokens/s/device   {tokens_per_s_per_device(run, mfu, peak):,.0f} at MFU {mfu:.0%} of {peak:g} TFLOP/s")
    else:
        print("tokens/s/device   set train.peak_tflops (e.g. 989 for an H100 in bf16) for an estimate")


def cmd_train(args: argparse.Namespace) -> None:
    """Trains under `lm2 launch local` (launch/local.sh), srun, torchrun or deepspeed (or alone: a world of one)."""
    from lm2.pipeline.launch.signals import StopSignals

    signals = StopSignals()  # first: a preemption notice during start-up must not kill the rank

    from lm2.pipeline.config import load_config
    from lm2.pipeline.launch.environment import launched_world_size

    run = load_config(args.config, train_overrides(args))
    run.validate(launched_world_size(os.environ))  # in seconds, before the trainer's imports (the Trainer checks too)

    from lm2.pipeline.train.build import ResumeOptions, build
    from lm2.pipeline.train.loop import Trainer
    from lm2.pipeline.train.step import NonFiniteLossError

    try:
        options = ResumeOptions(args.override_schedule, args.accept_config_changes, args.reset_memory)
        parts = build(run, options)
        Trainer(parts, signals).fit()
    except NonFiniteLossError as error:  # every rank alike (the loss is reduced first): rank 0 reports
        report(f"lm2 train: {error}", args)
        raise SystemExit(EXIT_NONFINITE) from None


def add_commands(commands) -> None:
    info = commands.add_parser("info", help="parameter counts and FLOPs per token of a config")
    info.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    info.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.memory.slots=64 parallel.tp=2")
    info.add_argument(
        "--world-size",
        type=int,
        help="ranks to check the layout against, as `lm2 train` does (default: tp * pp, so dp=1)",
    )
    info.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the tokens/s estimate")
    info.set_defaults(run=cmd_info)
    train = commands.add_parser("train", help="train a model (one process per rank: lm2 launch local, srun, torchrun)")
    add_train_arguments(train)
    train.set_defaults(run=cmd_train)


def add_train_arguments(train: argparse.ArgumentParser) -> None:
    """`lm2 train`'s arguments; `lm2 launch job-info` parses the same ones."""
    train.add_argument("--config", required=True, help="run YAML, e.g. configs/tiny.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 parallel.tp=2")
    train.add_argument("--resume", help="auto (newest complete checkpoint of the run), or a checkpoint folder")
    train.add_argument(
        "--override-schedule",
        action="store_true",
        help="resume although train.steps or the optim LR fields changed: the LR follows the config",
    )
    train.add_argument(
        "--accept-config-changes",
        action="store_true",
        help="resume although fields that change the data or the math changed (streams, seeds, batch, optimizer, "
        "precision, tokenizer): continue with the new values deliberately",
    )
    train.add_argument(
        "--reset-memory",
        action="store_true",
        help="with train.carry: resume with every lane's memory from M_0, keeping the data position (the way to "
        "resume at another data-parallel size or micro-batch)",
    )
    # The `deepspeed` launcher appends --local_rank=N; the rank comes from LOCAL_RANK in the environment anyway.
    train.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    # Also here, not only before the command: the launchers pass their arguments to `lm2 train`.
    train.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)


def train_overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides of parsed `lm2 train` arguments, --resume included."""
    return list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
