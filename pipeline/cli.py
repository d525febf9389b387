"""The `lm2` console entry point: one command, one subcommand per job (info, data, ...)."""

from __future__ import annotations

import argparse
import sys

from lm2.model.config import LM2ConfigError


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def cmd_info(args: argparse.Namespace) -> None:
    """Parameter counts (embedding, backbone, memory) and FLOPs per token of a config, without building it."""
    from lm2.model.accounting import forward_flops_per_token, parameter_counts
    from lm2.pipeline.config import load_config

    model = load_config(args.config, args.overrides).model
    counts = parameter_counts(model)
    flops = forward_flops_per_token(model)
    share = counts.memory / (counts.total - counts.memory)
    print(f"config            {args.config}")
    print(f"memory            {'on' if model.memory.enabled else 'off'}"
          + (f": {model.memory.slots} slots x {model.memory_dim} dims, {model.memory.heads} heads, "
             f"segments of {model.segment_length} tokens" if model.memory.enabled else ""))
    print(f"parameters        {_human(counts.total)} ({counts.total:,})")
    print(f"  embedding       {_human(counts.embedding)}")
    print(f"  backbone        {_human(counts.backbone)}")
    print(f"  memory          {_human(counts.memory)} (+{share:.1%} over embedding + backbone)")
    print(f"FLOPs per token   forward {_human(flops)}, training (x3) {_human(3 * flops)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lm2", description="Pretrain LM2 large memory models.")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="parameter counts and FLOPs per token of a config")
    info.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    info.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.memory.slots=64")
    info.set_defaults(run=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except LM2ConfigError as error:
        print(f"lm2 {args.command}: configuration error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
