"""Tokens/s of `lm2 data prepare` per worker against raw SentencePieceProcessor.encode on the same text.

    python bench/prepare_throughput.py --tokenizer runs/tiny/tokenizer.model [--workers 2] [inputs ...]

Prints one JSON line; `ratio_per_worker` is prepare's tokens/s per worker over raw encode's (target >= 0.8).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from lm2.pipeline.data.prepare import prepare
from lm2.pipeline.data.sources import find_input_files, read_all
from lm2.pipeline.data.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("inputs", nargs="*", default=["corpus"])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--row-length", type=int, default=256)
    args = parser.parse_args()
    import streaming  # noqa: F401  (its import takes seconds; keep it out of the timed region)

    tokenizer = Tokenizer.load(args.tokenizer)
    documents = list(read_all(find_input_files(args.inputs)))
    start = time.perf_counter()
    raw_tokens = sum(len(ids) + 1 for ids in tokenizer.processor.encode(documents, num_threads=1))
    raw_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        metadata = prepare(args.inputs, Path(folder) / "shards", args.tokenizer, row_length=args.row_length,
                           workers=args.workers, progress=False)
        prepare_seconds = time.perf_counter() - start
    tokens = metadata["splits"]["train"]["tokens"]
    raw_rate, prepare_rate = raw_tokens / raw_seconds, tokens / prepare_seconds
    print(json.dumps({"bench": "prepare_throughput", "tokens": tokens, "workers": args.workers,
                      "raw_encode_tokens_per_s": round(raw_rate), "prepare_tokens_per_s": round(prepare_rate),
                      "prepare_tokens_per_s_per_worker": round(prepare_rate / args.workers),
                      "ratio_per_worker": round(prepare_rate / args.workers / raw_rate, 3)}))


if __name__ == "__main__":
    main()
