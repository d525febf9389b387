"""Tokens/s of `lm2 data prepare` per worker against raw SentencePieceProcessor.encode on the same text.

    python bench/prepare_throughput.py --tokenizer runs/tiny/tokenizer.model [--workers 2] [--doc-chars 4096]
        [--repeat 2] [inputs ...]

The inputs' text is cut at paragraph breaks into documents of about --doc-chars characters (pretraining corpora
are many documents of a few KB; --doc-chars 0 keeps every file whole, which with five books leaves workers idle)
and written as JSONL, repeated --repeat times. Raw encode runs single-threaded in this process on the same
documents. Prints one JSON line; `ratio_per_worker` is prepare's tokens/s per worker over raw encode's (the
target is >= 0.8; on a machine with as many cores as workers, prepare's own process competes with them).
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from lm2.pipeline.data.prepare import prepare
from lm2.pipeline.data.sources import find_input_files, read_all
from lm2.pipeline.data.tokenizer import Tokenizer


def cut_documents(texts: list[str], doc_chars: int) -> list[str]:
    """Each text cut after the paragraph break that passes doc_chars characters (0: texts unchanged)."""
    if doc_chars <= 0:
        return texts
    documents = []
    for text in texts:
        start = 0
        while start < len(text):
            cut = text.find("\n\n", start + doc_chars)
            end = len(text) if cut < 0 else cut + 2
            if text[start:end].strip():
                documents.append(text[start:end])
            start = end
    return documents


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("inputs", nargs="*", default=["corpus"])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--row-length", type=int, default=256)
    parser.add_argument("--doc-chars", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    import streaming  # noqa: F401  (its import takes seconds; keep it out of the timed region)

    tokenizer = Tokenizer.load(args.tokenizer)
    documents = cut_documents(list(read_all(find_input_files(args.inputs))), args.doc_chars) * args.repeat
    start = time.perf_counter()
    raw_tokens = sum(len(ids) + 1 for ids in tokenizer.processor.encode(documents, num_threads=1))
    raw_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "documents.jsonl"
        source.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
        start = time.perf_counter()
        metadata = prepare([source], Path(folder) / "shards", args.tokenizer, row_length=args.row_length,
                           workers=args.workers, progress=False)
        prepare_seconds = time.perf_counter() - start
    tokens = metadata["splits"]["train"]["tokens"]
    assert tokens == raw_tokens, f"prepare wrote {tokens} tokens, raw encode made {raw_tokens}"
    raw_rate, prepare_rate = raw_tokens / raw_seconds, tokens / prepare_seconds
    print(json.dumps({"bench": "prepare_throughput", "documents": len(documents), "tokens": tokens,
                      "workers": args.workers, "cpus": os.cpu_count(),
                      "raw_encode_tokens_per_s": round(raw_rate), "prepare_tokens_per_s": round(prepare_rate),
                      "prepare_tokens_per_s_per_worker": round(prepare_rate / args.workers),
                      "ratio_per_worker": round(prepare_rate / args.workers / raw_rate, 3)}))


if __name__ == "__main__":
    main()
