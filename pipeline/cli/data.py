"""`lm2 data`: tokenizer, prepare, merge, babilong."""

from __future__ import annotations

import argparse
from pathlib import Path

from lm2.model.errors import DataError


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
    if Path(args.output).exists() and not args.force:
        raise DataError(
            f"{args.output} exists: datasets and checkpoints made with it name it by its sha256, and a new model "
            "would not match them; choose another --output, or pass --force to replace it"
        )
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
        answer_field=args.answer_field,
        packing=args.packing,
        truncate=args.truncate,
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
            f"of {metadata['row_length'] + 1} ({counts['padding']:,} padding"
            + (f", {counts['truncated']:,} documents cut to their last row" if counts.get("truncated") else "")
            + ")"
        )


def cmd_data_merge(args: argparse.Namespace) -> None:
    """Joins the parts of a distributed prepare into one dataset (index.json per split, lm2_data.json)."""
    from lm2.pipeline.data.parts import merge

    metadata = merge(args.output)
    _print_counts(metadata)
    print(f"wrote {args.output} from {metadata['parts']} parts")


def cmd_data_babilong(args: argparse.Namespace) -> None:
    """BABILong training samples as prompt/answer records (pipeline/data/babilong.py)."""
    from lm2.pipeline.data.babilong import Budget, write_babilong

    print(
        write_babilong(
            args.output,
            args.tokenizer,
            args.books,
            args.babi,
            Budget(args.min_tokens, args.max_tokens),
            args.samples_per_task,
            args.tasks.split(","),
            args.seed,
            text_records=args.text,
            book_documents_path=args.book_documents,
        )
    )


INPUTS_HELP = (
    ".txt/.jsonl files (optionally .gz or .zst), .parquet files, Hugging Face datasets saved with "
    "save_to_disk, or folders of them"
)


def add_commands(commands) -> None:
    data = commands.add_parser("data", help="train a tokenizer and write training shards")
    jobs = data.add_subparsers(dest="data_command", required=True)
    tokenizer = jobs.add_parser("tokenizer", help="train a sentencepiece tokenizer")
    tokenizer.add_argument("inputs", nargs="+", help=INPUTS_HELP)
    tokenizer.add_argument("--output", required=True, help="the .model file to write")
    tokenizer.add_argument("--vocab-size", type=int, help="pieces in the vocabulary (default: model.vocab_size)")
    tokenizer.add_argument("--config", help="run YAML whose model.vocab_size bounds the vocabulary")
    tokenizer.add_argument("--type", default="bpe", choices=("bpe", "unigram"), help="sentencepiece model type")
    tokenizer.add_argument("--force", action="store_true", help="replace an existing model at --output")
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
        "--answer-field",
        help="JSONL field of each record's answer: the record is a prompt (--text-field) and an answer, and the "
        "loss covers only the answer and EOS",
    )
    prepare.add_argument(
        "--packing",
        default="concat",
        choices=("concat", "whole", "document"),
        help="concat: cut the document stream anywhere; whole: a document that fits in a row starts a new row "
        "rather than straddle two (the rest of the row is PAD); document: every document in rows of its own, "
        "consecutive rows overlapping by one token (for train.carry.mode: document)",
    )
    prepare.add_argument(
        "--truncate",
        action="store_true",
        help="cut a document longer than a row to its last row (its end, e.g. an answer, stays)",
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
    babilong = jobs.add_parser(
        "babilong", help="write BABILong training samples: prompt/answer records of bAbI facts in book haystacks"
    )
    babilong.add_argument("--output", required=True, help="the .jsonl file to write")
    babilong.add_argument("--tokenizer", required=True, help="sentencepiece .model measuring the samples")
    babilong.add_argument(
        "--books", nargs="+", required=True, help=".txt(.gz) books or folders of them (not the evaluation's corpus/)"
    )
    babilong.add_argument("--babi", required=True, help="folder of bAbI qaN_*_train.txt files")
    babilong.add_argument(
        "--max-tokens", type=int, required=True, help="a record's prompt + answer + EOS hold at most this many tokens"
    )
    babilong.add_argument(
        "--min-tokens", type=int, default=0, help="record lengths are drawn uniformly from --min-tokens to --max-tokens"
    )
    babilong.add_argument("--tasks", default="qa1,qa2,qa3,qa4,qa5", help="bAbI tasks to place in haystacks")
    babilong.add_argument("--samples-per-task", type=int, default=4000, help="training samples per task")
    babilong.add_argument("--seed", type=int, default=0, help="samples, lengths, sentences and fact positions")
    babilong.add_argument(
        "--text", action="store_true", help='write {"text": prompt + answer} records (a prepare without loss masks)'
    )
    babilong.add_argument(
        "--book-documents", help="also write the books, in pieces of 100 sentences, as text documents into this .jsonl"
    )
    babilong.set_defaults(run=cmd_data_babilong)
