"""`lm2 eval`: BABILong and perplexity of exported Hugging Face folders."""

from __future__ import annotations

import argparse


def cmd_eval_babilong(args: argparse.Namespace) -> None:
    """BABILong accuracy per task and length -> results.json, results.md, heatmap.png (see pipeline/eval/)."""
    from pathlib import Path

    from lm2.pipeline.eval.babilong.evaluate import run
    from lm2.pipeline.eval.babilong.report import markdown

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
    print(f"wrote {output}/results.json, {output}/results.md, {output}/heatmap.png and {output}/distance.png")


def cmd_eval_ppl(args: argparse.Namespace) -> None:
    """Perplexity on a prepared dataset's split or on text files."""
    from lm2.pipeline.eval.perplexity import perplexity

    result, scored = perplexity(
        args.model, args.data, split=args.split, context=args.context, device=args.device, carry=args.carry
    )
    print(
        f"perplexity {result.perplexity:.3f} (loss {result.loss:.4f} nats/token) over {result.tokens:,} tokens "
        f"of {scored}"
    )


def cmd_eval_memory(args: argparse.Namespace) -> None:
    """An LM2 model's slot norms over a long text and its loss with the memory read off and on."""
    from pathlib import Path

    from lm2.pipeline.eval.memory import evaluate_memory

    output = Path(args.output or f"{args.model.rstrip('/')}-memory")
    results = evaluate_memory(args.model, args.text, args.segments, output, args.device)
    print(
        f"loss {results['loss_memory_on']:.4f} with the memory read on, {results['loss_memory_off']:.4f} with it off, "
        f"over {results['tokens']:,} tokens ({args.segments} segments); wrote {output}/memory.json and "
        f"{output}/memory.png"
    )


DEVICE_HELP = "cpu, cuda or cuda:N (default: the GPU when there is one); the model runs in fp32 on it"


def add_commands(commands) -> None:
    from lm2.pipeline.eval.babilong.babi import HELDOUT_FOLDER

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
    ppl.add_argument(
        "--carry",
        action="store_true",
        help="LM2, text files: score each document in pieces of --context tokens with the memory carried from "
        "piece to piece (a new document starts from fresh memory)",
    )
    ppl.set_defaults(run=cmd_eval_ppl)
    memory = jobs.add_parser(
        "memory", help="an LM2 model's memory over a long text: slot norms, loss with the read off"
    )
    memory.add_argument("--model", required=True, help="an LM2 folder written by `lm2 export hf`")
    memory.add_argument("--text", nargs="+", required=True, help=".txt/.jsonl files or folders (documents joined)")
    memory.add_argument("--segments", type=int, default=256, help="segments of the text to run (one fresh memory)")
    memory.add_argument("--output", help="results folder (default: MODEL-memory)")
    memory.add_argument("--device", help=DEVICE_HELP)
    memory.set_defaults(run=cmd_eval_memory)
