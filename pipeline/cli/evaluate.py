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

    result, scored = perplexity(args.model, args.data, split=args.split, context=args.context, device=args.device)
    print(
        f"perplexity {result.perplexity:.3f} (loss {result.loss:.4f} nats/token) over {result.tokens:,} tokens "
        f"of {scored}"
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
    ppl.set_defaults(run=cmd_eval_ppl)
