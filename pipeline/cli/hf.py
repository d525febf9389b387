"""`lm2 export hf` and `lm2 import hf`: Hugging Face folders."""

from __future__ import annotations

import argparse


def cmd_export_hf(args: argparse.Namespace) -> None:
    """A checkpoint of any layout -> a Hugging Face folder (see pipeline/hf/)."""
    from lm2.pipeline.hf.export import export_hf

    result = export_hf(
        args.checkpoint,
        args.output,
        force=args.force,
        verify=args.verify,
        tokenizer=args.tokenizer,
        max_shard_size=args.max_shard_size,
    )
    print(result.summary())


def cmd_import_hf(args: argparse.Namespace) -> None:
    """A Hugging Face Llama -> a step-0 training checkpoint (under torchrun for a parallel layout)."""
    from lm2.pipeline.hf.importer import import_hf

    summary = import_hf(args.hf_dir, args.config, args.output, args.overrides, force=args.force)
    if summary is not None:  # rank 0
        print(summary)


def add_commands(commands) -> None:
    export = commands.add_parser("export", help="convert a checkpoint for other tools")
    export_jobs = export.add_subparsers(dest="export_command", required=True)
    hf = export_jobs.add_parser("hf", help="write a Hugging Face folder (vanilla: LlamaForCausalLM; LM2: remote code)")
    hf.add_argument("checkpoint", help="a run's checkpoints folder, its `latest` file, or one step_* folder")
    hf.add_argument("output", help="the folder to write (must not exist unless --force)")
    hf.add_argument(
        "--force", action="store_true", help="replace the output folder if it holds an earlier export (and only then)"
    )
    hf.add_argument(
        "--verify",
        action="store_true",
        help="check that the exported model's logits equal the training model's (fp32, 1e-4)",
    )
    hf.add_argument("--tokenizer", help="sentencepiece .model (default: the run's data.tokenizer)")
    hf.add_argument("--max-shard-size", default="5GB", help="split model.safetensors above this size")
    hf.set_defaults(run=cmd_export_hf)
    imports = commands.add_parser("import", help="start training from other tools' weights")
    import_jobs = imports.add_subparsers(dest="import_command", required=True)
    hf_in = import_jobs.add_parser("hf", help="a Hugging Face Llama -> a step-0 checkpoint (fresh memory)")
    hf_in.add_argument("hf_dir", help="a folder holding a LlamaForCausalLM (config.json, safetensors)")
    hf_in.add_argument("--config", required=True, help="the run YAML to train with; the model shape must match")
    hf_in.add_argument("--output", required=True, help="the checkpoints folder to write step_00000000 into")
    hf_in.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2")
    hf_in.add_argument(
        "--force", action="store_true", help="write step_00000000 even into a folder that already holds checkpoints"
    )
    hf_in.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    hf_in.set_defaults(run=cmd_import_hf)
