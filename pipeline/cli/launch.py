"""`lm2 launch`: start ranks on this machine, and what launch/slurm/*.sbatch ask before they start any."""

from __future__ import annotations

import argparse
import os


def cmd_launch_local(args: argparse.Namespace) -> None:
    """Runs `lm2 train TRAIN_ARGS` as --nproc ranks on this machine; exits with the job's code."""
    from lm2.model.errors import ConfigError
    from lm2.pipeline.launch.local import run_local

    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    raise SystemExit(run_local(args.nproc, train_args))


def cmd_launch_job_info(args: argparse.Namespace) -> None:
    """What train.sbatch needs before it starts the ranks, one value per line: the job's log folder and the requeue
    exit code. Loading and validating the config for the job's ranks here rejects a bad one (or a layout the
    allocation cannot hold) once per job, before any rank starts."""
    from lm2.pipeline.cli import build_parser
    from lm2.pipeline.cli.train import train_overrides
    from lm2.pipeline.config import load_config
    from lm2.pipeline.launch.exit_codes import EXIT_REQUEUE
    from lm2.pipeline.launch.slurm import job_log_dir

    train = build_parser().parse_args(["train", *args.train_args])
    run = load_config(train.config, train_overrides(train))
    run.validate(args.world_size)
    print(job_log_dir(run.logging.run_dir, os.environ["SLURM_JOB_ID"]).resolve())
    print(EXIT_REQUEUE)


def cmd_launch_config_value(args: argparse.Namespace) -> None:
    """One field of a config by its dotted path, e.g. data.tokenizer (prepare.sbatch reads it); a field that is not
    set (null) is a ConfigError, so a script never goes on with "None"."""
    from lm2.model.errors import ConfigError
    from lm2.pipeline.config import load_config

    value = load_config(args.config).to_dict()
    for key in args.field.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ConfigError(f"{args.config} has no field {args.field}")
        value = value[key]
    if value is None:
        raise ConfigError(
            f"{args.config} sets no {args.field}: set it in the config (for data.tokenizer: the .model to use or train)"
        )
    print(value)


def add_commands(commands) -> None:
    launch = commands.add_parser("launch", help="start training ranks; what the SLURM scripts ask of lm2")
    jobs = launch.add_subparsers(dest="launch_command", required=True)
    local = jobs.add_parser("local", help="run `lm2 train` as --nproc ranks on this machine (launch/local.sh)")
    local.add_argument("--nproc", type=int, required=True, help="processes (ranks) to start")
    local.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of `lm2 train`")
    local.set_defaults(run=cmd_launch_local)
    info = jobs.add_parser("job-info", help="(train.sbatch) check the config for the job's ranks; print its log folder")
    info.add_argument("world_size", type=int, help="the job's ranks")
    info.add_argument("train_args", nargs=argparse.REMAINDER, help="the arguments of `lm2 train`")
    info.set_defaults(run=cmd_launch_job_info)
    value = jobs.add_parser("config-value", help="(prepare.sbatch) print one field of a config")
    value.add_argument("config", help="run YAML")
    value.add_argument("field", help="dotted path, e.g. data.tokenizer")
    value.set_defaults(run=cmd_launch_config_value)
