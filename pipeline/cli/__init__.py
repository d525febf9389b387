"""The `lm2` command: one subcommand per job. Each module of this package adds its commands to the parser and
imports what a command needs only when it runs, so `lm2 --help` and bad arguments answer at once.

    info, train                      train.py
    data tokenizer|prepare|merge|babilong  data.py
    ckpt inspect|universal           ckpt.py
    export hf, import hf             hf.py
    eval babilong|ppl                evaluate.py
    launch local|job-info|config-value     launch.py
"""

from __future__ import annotations

import argparse

from lm2.model.errors import CheckpointError, ConfigError, DataError, LM2Error
from lm2.pipeline.cli import ckpt, data, evaluate, hf, launch, train
from lm2.pipeline.cli.common import VERBOSE_HELP, report


class Parser(argparse.ArgumentParser):
    """Options and positionals in the order people type them (`lm2 train --config C a.b=1 --resume auto c.d=2`):
    a command's parser reads them with argparse's intermixed parsing, which argparse applies only where asked and
    cannot apply to a parser of subcommands or of a remainder (`lm2 launch local -- ...`), which stay as they are.
    Subcommands' parsers are of this class too (argparse makes them of their parent's class)."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing or any(a.nargs in (argparse.PARSER, argparse.REMAINDER) for a in self._actions):
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls parse_known_args itself
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lm2", description="Pretrain LM2 large memory models.")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (train, data, ckpt, hf, evaluate, launch):
        module.add_commands(commands)
    return parser


def _kind(error: LM2Error) -> str:
    for kind, name in (
        (DataError, "data error"),
        (CheckpointError, "checkpoint error"),
        (ConfigError, "configuration error"),
    ):
        if isinstance(error, kind):
            return name
    return "error"


def main(argv: list[str] | None = None) -> int:
    from lm2.pipeline.console import quiet_libraries
    from lm2.pipeline.launch.exit_codes import EXIT_LM2_ERROR

    args = build_parser().parse_args(argv)
    if not args.verbose:
        quiet_libraries()  # before the command imports them
    try:
        args.run(args)
    except LM2Error as error:
        report(f"lm2 {args.command}: {_kind(error)}: {error}", args)
        return EXIT_LM2_ERROR
    return 0
