"""The `lm2` console entry point: one command, one subcommand per job (info, data, ...)."""

from __future__ import annotations

import argparse
import os
import sys

from lm2.model.errors import CheckpointError, ConfigError, DataError, LM2Error
from lm2.pipeline.console import human


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
    print(f"  total           {size(memory.total)}")
    if run.train.peak_tflops:
        print(
            f"tokens/s/device   {tokens_per_s_per_device(run, mfu, run.train.peak_tflops):,.0f} at MFU {mfu:.0%} "
            f"of train.peak_tflops={run.train.peak_tflops:g}"
        )
    else:
        print("tokens/s/device   set train.peak_tflops (e.g. 989 for an H100 in bf16) for an estimate")


def _model_config(path: str | None):
    from lm2.pipeline.config import load_config

    return load_config(path).model if path else None


def cmd_data_tokenizer(args: argparse.Namespace) -> None:
    """Trains a sentencepiece model on the inputs; the vocabulary defaults to the config's model.vocab_size."""
    from lm2.pipeline.data.sources import find_input_files, read_all
    from lm2.pipeline.data.tokenizer import train_tokenizer

    model = _model_config(args.config)
    vocab_size = args.vocab_size or (model.vocab_size if model else None)
    if vocab_size is None:
        raise DataError("give --vocab-size, or --config to take model.vocab_size")
    if model is not None and vocab_size > model.vocab_size:
        raise DataError(f"--vocab-size {vocab_size} exceeds model.vocab_size {model.vocab_size} of {args.config}")
    tokenizer = train_tokenizer(
        read_all(find_input_files(args.inputs), args.text_field), args.output, vocab_size, args.type
    )
    print(f"wrote {tokenizer.path}: {tokenizer.vocab_size} pieces, sha256 {tokenizer.checksum}")


def cmd_data_prepare(args: argparse.Namespace) -> None:
    """Tokenizes, packs and shards the inputs into an MDS dataset folder."""
    from lm2.pipeline.data.parts import Part
    from lm2.pipeline.data.prepare import prepare

    if (args.num_shards is None) != (args.shard_index is None):
        raise DataError("give --num-shards and --shard-index together")
    part = Part(args.shard_index, args.num_shards) if args.num_shards is not None else Part.from_environment()
    metadata = prepare(
        args.inputs,
        args.output,
        args.tokenizer,
        row_length=args.row_length,
        model=_model_config(args.config),
        workers=args.workers,
        val_fraction=args.val_fraction,
        text_field=args.text_field,
        packing=args.packing,
        part=part,
    )
    _print_counts(metadata)
    print(
        f"wrote {args.output}"
        + (f" {part.name}: run `lm2 data merge {args.output}` once every part is written" if part else "")
    )


def _print_counts(metadata: dict) -> None:
    for name, counts in metadata["splits"].items():
        print(
            f"{name:6s} {counts['documents']:,} documents, {counts['tokens']:,} tokens, {counts['rows']:,} rows "
            f"of {metadata['row_length'] + 1} ({counts['padding']:,} padding)"
        )


def cmd_data_merge(args: argparse.Namespace) -> None:
    """Joins the parts of a distributed prepare into one dataset (index.json per split, lm2_data.json)."""
    from lm2.pipeline.data.parts import merge

    metadata = merge(args.output)
    _print_counts(metadata)
    print(f"wrote {args.output} from {metadata['parts']} parts")


INPUTS_HELP = (
    ".txt/.jsonl files (optionally .gz or .zst), .parquet files, Hugging Face datasets saved with "
    "save_to_disk, or folders of them"
)


def _add_data_commands(commands) -> None:
    data = commands.add_parser("data", help="train a tokenizer and write training shards")
    jobs = data.add_subparsers(dest="data_command", required=True)
    tokenizer = jobs.add_parser("tokenizer", help="train a sentencepiece tokenizer")
    tokenizer.add_argument("inputs", nargs="+", help=INPUTS_HELP)
    tokenizer.add_argument("--output", required=True, help="the .model file to write")
    tokenizer.add_argument("--vocab-size", type=int, help="pieces in the vocabulary (default: model.vocab_size)")
    tokenizer.add_argument("--config", help="run YAML whose model.vocab_size bounds the vocabulary")
    tokenizer.add_argument("--type", default="bpe", choices=("bpe", "unigram"), help="sentencepiece model type")
    tokenizer.add_argument(
        "--text-field", default="text", help="JSONL field or parquet/dataset column holding the text"
    )
    tokenizer.set_defaults(run=cmd_data_tokenizer)
    prepare = jobs.add_parser("prepare", help="tokenize, pack into rows and write MDS shards")
    prepare.add_argument("inputs", nargs="+", help=INPUTS_HELP)
    prepare.add_argument("--tokenizer", required=True, help="sentencepiece .model from `lm2 data tokenizer`")
    prepare.add_argument(
        "--output",
        required=True,
        help="dataset folder to create (must not exist), or a remote URL such as s3://bucket/prefix",
    )
    prepare.add_argument("--config", help="run YAML: rows get model.row_length; the vocabulary must fit")
    prepare.add_argument("--row-length", type=int, help="tokens per training row (default: model.row_length)")
    prepare.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    prepare.add_argument("--val-fraction", type=float, default=0.0, help="share of documents for the val split")
    prepare.add_argument("--text-field", default="text", help="JSONL field or parquet/dataset column holding the text")
    prepare.add_argument(
        "--packing",
        default="concat",
        choices=("concat", "whole"),
        help="concat: cut the document stream anywhere; whole: a document that fits in a row "
        "starts a new row rather than straddle two (the rest of the row is PAD)",
    )
    prepare.add_argument(
        "--num-shards",
        type=int,
        help="prepare one of this many parts of the inputs (with "
        "--shard-index; default in a SLURM array job: its task count), then `lm2 data merge`",
    )
    prepare.add_argument("--shard-index", type=int, help="which part, from 0 (default: the SLURM array task)")
    prepare.set_defaults(run=cmd_data_prepare)
    merge = jobs.add_parser("merge", help="join the parts of `prepare --num-shards` into one dataset")
    merge.add_argument("output", help="the --output the parts were prepared into")
    merge.set_defaults(run=cmd_data_merge)


def cmd_train(args: argparse.Namespace) -> None:
    """Trains under launch/local.sh, srun, torchrun or deepspeed (or alone: a world of one)."""
    from lm2.pipeline.parallel.launch import StopSignals

    signals = StopSignals()  # first: a preemption notice during start-up must not kill the rank

    from lm2.pipeline.config import load_config
    from lm2.pipeline.parallel.launch import launched_world_size

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    run = load_config(args.config, overrides)
    run.validate(launched_world_size(os.environ))  # in seconds, before the trainer's imports (the Trainer checks too)

    from lm2.pipeline.train.loop import Trainer
    from lm2.pipeline.train.step import NonFiniteLossError

    try:
        Trainer(run, signals, args.override_schedule).fit()
    except NonFiniteLossError as error:  # every rank alike (the loss is reduced first): rank 0 reports
        _report(f"lm2 train: {error}", args)
        raise SystemExit(3) from None


def cmd_ckpt_inspect(args: argparse.Namespace) -> None:
    """Lists checkpoints: step, completeness, topology, size."""
    from pathlib import Path

    from lm2.pipeline.checkpoint.resume import inspect

    rows = inspect(Path(args.dir))
    if not rows:
        print(f"no checkpoints under {args.dir}")
    for row in rows:
        topo = row.get("topology") or {}
        layout = f"tp={topo['tp']} pp={topo['pp']} dp={topo['dp']} zero={topo['zero_stage']}" if topo else "-"
        state = "complete" if row["complete"] else f"INCOMPLETE ({row['problem']})"
        size = f"{row['bytes'] / 1e6:.1f} MB" if row.get("bytes") else "-"
        print(f"{row['folder']}  step={row['step']}  {state}  {layout}  {size}{'  <- latest' if row['latest'] else ''}")


def cmd_export_hf(args: argparse.Namespace) -> None:
    """A checkpoint of any layout -> a Hugging Face folder (see pipeline/export/)."""
    from lm2.pipeline.export.export import export_hf

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
    from lm2.pipeline.export.importer import import_hf

    summary = import_hf(args.hf_dir, args.config, args.output, args.overrides)
    if summary is not None:  # rank 0
        print(summary)


def _add_conversion_commands(commands) -> None:
    export = commands.add_parser("export", help="convert a checkpoint for other tools")
    export_jobs = export.add_subparsers(dest="export_command", required=True)
    hf = export_jobs.add_parser("hf", help="write a Hugging Face folder (vanilla: LlamaForCausalLM; LM2: remote code)")
    hf.add_argument("checkpoint", help="a run's checkpoints folder, its `latest` file, or one step_* folder")
    hf.add_argument("output", help="the folder to write (must not exist unless --force)")
    hf.add_argument("--force", action="store_true", help="overwrite the output folder")
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
    hf_in.add_argument("overrides", nargs="*", help="dotted overrides, right after HF_DIR, e.g. parallel.tp=2")
    hf_in.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    hf_in.set_defaults(run=cmd_import_hf)


def cmd_eval_babilong(args: argparse.Namespace) -> None:
    """BABILong accuracy per task and length -> results.json, results.md, heatmap.png (see pipeline/eval/)."""
    from pathlib import Path

    from lm2.pipeline.eval.report import markdown
    from lm2.pipeline.eval.run_babilong import run

    output = Path(args.output or f"{args.model.rstrip('/')}-babilong")
    results = run(
        args.model,
        args.tasks.split(","),
        args.lengths.split(","),
        args.samples,
        Path(args.babi),
        Path(args.background),
        output,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
    )
    print(markdown(results), end="")
    print(f"wrote {output}/results.json, {output}/results.md and {output}/heatmap.png")


def cmd_eval_ppl(args: argparse.Namespace) -> None:
    """Perplexity on a prepared dataset's split or on text files."""
    from lm2.pipeline.eval.perplexity import perplexity

    result, scored = perplexity(args.model, args.data, split=args.split, context=args.context, device=args.device)
    print(
        f"perplexity {result.perplexity:.3f} (loss {result.loss:.4f} nats/token) over {result.tokens:,} tokens "
        f"of {scored}"
    )


def cmd_eval_mixture(args: argparse.Namespace) -> None:
    """The experiment's training documents: books plus bAbI stories in haystacks (see pipeline/eval/mixture.py)."""
    from lm2.pipeline.eval.mixture import write_mixture

    print(
        write_mixture(
            args.output,
            args.tokenizer,
            args.books,
            args.babi,
            args.row_length,
            args.stories_per_task,
            args.tasks.split(","),
            args.seed,
        )
    )


DEVICE_HELP = "cpu, cuda or cuda:N (default: the GPU when there is one); the model runs in fp32 on it"


def _add_eval_commands(commands) -> None:
    from lm2.pipeline.eval.babi import HELDOUT_FOLDER

    evaluate = commands.add_parser("eval", help="evaluate an exported Hugging Face folder")
    jobs = evaluate.add_subparsers(dest="eval_command", required=True)
    babilong = jobs.add_parser("babilong", help="BABILong accuracy per task and context length")
    babilong.add_argument("--model", required=True, help="a folder written by `lm2 export hf`")
    babilong.add_argument("--tasks", default="qa1,qa2,qa3,qa4,qa5", help="comma-separated, among qa1..qa10")
    babilong.add_argument("--lengths", default="0k,1k,2k,4k", help="comma-separated: 0k, 4k, 128k (k = 1024), 512")
    babilong.add_argument("--samples", type=int, default=100, help="questions per task and length")
    babilong.add_argument(
        "--babi",
        default=str(HELDOUT_FOLDER),
        help="folder with one qaN_*.txt(.gz) per task (default: lm2's held-out stories)",
    )
    babilong.add_argument("--background", default="corpus", help="folder of .txt(.gz) books for the haystack")
    babilong.add_argument("--output", help="results folder (default: MODEL-babilong)")
    babilong.add_argument("--seed", type=int, default=0, help="haystack sentences and fact positions")
    babilong.add_argument("--max-new-tokens", type=int, default=16, help="greedy answer length")
    babilong.add_argument("--device", help=DEVICE_HELP)
    babilong.set_defaults(run=cmd_eval_babilong)
    ppl = jobs.add_parser("ppl", help="perplexity on a prepared dataset (val split) or on text files")
    ppl.add_argument("--model", required=True, help="a folder written by `lm2 export hf`")
    ppl.add_argument("data", nargs="+", help="a `lm2 data prepare` folder, or .txt/.jsonl files or folders")
    ppl.add_argument("--split", default="val", help="split of a prepared dataset")
    ppl.add_argument("--context", type=int, help="tokens per window on text files (default 1024)")
    ppl.add_argument("--device", help=DEVICE_HELP)
    ppl.set_defaults(run=cmd_eval_ppl)
    mixture = jobs.add_parser("mixture", help="write the LM2-vs-vanilla experiment's training documents (jsonl)")
    mixture.add_argument("--output", required=True, help="the .jsonl file to write")
    mixture.add_argument("--tokenizer", required=True, help="sentencepiece .model measuring the haystacks")
    mixture.add_argument("--books", nargs="+", required=True, help=".txt(.gz) books or folders of them")
    mixture.add_argument("--babi", required=True, help="folder of bAbI qaN_*_train.txt files")
    mixture.add_argument("--row-length", type=int, required=True, help="haystacks reach up to this many tokens")
    mixture.add_argument("--tasks", default="qa1,qa2,qa3,qa4,qa5", help="bAbI tasks to place in haystacks")
    mixture.add_argument("--stories-per-task", type=int, default=4000, help="training samples per task")
    mixture.add_argument("--seed", type=int, default=0, help="haystack lengths, sentences and positions")
    mixture.set_defaults(run=cmd_eval_mixture)


VERBOSE_HELP = (
    "show every library notice (lm2 hides known-irrelevant ones), and have every rank print its errors "
    "(not only rank 0)"
)


def _report(line: str, args: argparse.Namespace) -> None:
    """An error every rank meets alike is printed by rank 0 alone (all ranks with --verbose), so a job shows it once."""
    from lm2.pipeline.parallel.launch import launched_rank

    if args.verbose or launched_rank(os.environ) == 0:
        print(line, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lm2", description="Pretrain LM2 large memory models.")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
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
    _add_data_commands(commands)
    train = commands.add_parser("train", help="train a model (launch one process per rank: torchrun, srun)")
    train.add_argument("--config", required=True, help="run YAML, e.g. configs/tiny.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 parallel.tp=2")
    train.add_argument("--resume", help="auto (newest complete checkpoint of the run), or a checkpoint folder")
    train.add_argument(
        "--override-schedule",
        action="store_true",
        help="resume although train.steps or the optim LR fields changed: the LR follows the config",
    )
    # The `deepspeed` launcher appends --local_rank=N; the rank comes from LOCAL_RANK in the environment anyway.
    train.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    # Also here, not only before the command: launch/local.sh and srun pass their arguments to `lm2 train`.
    train.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    train.set_defaults(run=cmd_train)
    ckpt = commands.add_parser("ckpt", help="checkpoint tools")
    ckpt_jobs = ckpt.add_subparsers(dest="ckpt_command", required=True)
    inspect = ckpt_jobs.add_parser("inspect", help="list checkpoints with step, completeness and topology")
    inspect.add_argument("dir", help="a run's checkpoints folder, or one checkpoint")
    inspect.set_defaults(run=cmd_ckpt_inspect)
    _add_conversion_commands(commands)
    _add_eval_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lm2.pipeline.console import quiet_libraries
    from lm2.pipeline.parallel.launch import EXIT_LM2_ERROR

    args = build_parser().parse_args(argv)
    if not args.verbose:
        quiet_libraries()  # before the command imports them
    try:
        args.run(args)
    except LM2Error as error:
        kind = (
            "data error"
            if isinstance(error, DataError)
            else "checkpoint error"
            if isinstance(error, CheckpointError)
            else "configuration error"
            if isinstance(error, ConfigError)
            else "error"
        )
        _report(f"lm2 {args.command}: {kind}: {error}", args)
        return EXIT_LM2_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
