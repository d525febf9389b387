"""`lm2 ckpt`: inspect checkpoints, convert one to DeepSpeed's universal format."""

from __future__ import annotations

import argparse


def cmd_ckpt_inspect(args: argparse.Namespace) -> None:
    """Lists checkpoints: step, completeness, topology, size."""
    from pathlib import Path

    from lm2.pipeline.checkpoint.reader import inspect

    rows = inspect(Path(args.dir))
    if not rows:
        print(f"no checkpoints under {args.dir}")
    for row in rows:
        topo = row.get("topology") or {}
        layout = f"tp={topo['tp']} pp={topo['pp']} dp={topo['dp']} zero={topo['zero_stage']}" if topo else "-"
        state = "complete" if row["complete"] else f"INCOMPLETE ({row['problem']})"
        size = f"{row['bytes'] / 1e6:.1f} MB" if row.get("bytes") else "-"
        print(f"{row['folder']}  step={row['step']}  {state}  {layout}  {size}{'  <- latest' if row['latest'] else ''}")


def cmd_ckpt_universal(args: argparse.Namespace) -> None:
    """Converts a ZeRO-1/2 checkpoint for a resume at another layout, before the job that resumes it. It holds the
    run folder's lock meanwhile: no job trains in it, and no other conversion runs."""
    from pathlib import Path

    from lm2.pipeline.checkpoint.universal import convert_to_universal
    from lm2.pipeline.train.run_folder import lock_run_folder

    lock = lock_run_folder(Path(args.checkpoints).resolve().parent)
    try:
        print(convert_to_universal(args.checkpoints, args.tag))
    finally:
        lock.release()


def add_commands(commands) -> None:
    ckpt = commands.add_parser("ckpt", help="checkpoint tools")
    jobs = ckpt.add_subparsers(dest="ckpt_command", required=True)
    inspect = jobs.add_parser("inspect", help="list checkpoints with step, completeness and topology")
    inspect.add_argument("dir", help="a run's checkpoints folder, or one checkpoint")
    inspect.set_defaults(run=cmd_ckpt_inspect)
    universal = jobs.add_parser(
        "universal", help="convert a ZeRO-1/2 checkpoint to DeepSpeed's universal format (resume at another layout)"
    )
    universal.add_argument("checkpoints", help="a run's checkpoints folder")
    universal.add_argument("tag", help="the checkpoint to convert, e.g. step_00001000")
    universal.set_defaults(run=cmd_ckpt_universal)
