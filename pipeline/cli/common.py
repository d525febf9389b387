"""What every `lm2` command shares: how an error that every rank meets is reported once."""

from __future__ import annotations

import argparse
import os
import sys

VERBOSE_HELP = (
    "show every library notice (lm2 hides known-irrelevant ones), and have every rank print its errors "
    "(not only rank 0)"
)


def report(line: str, args: argparse.Namespace) -> None:
    """An error every rank meets alike is printed by rank 0 alone (all ranks with --verbose), so a job shows it once."""
    from lm2.pipeline.launch.environment import launched_rank

    if args.verbose or launched_rank(os.environ) == 0:
        print(line, file=sys.stderr, flush=True)
