"""Tokens/s of `lm2 data prepare` per worker against raw SentencePieceProcessor.encode on the same text, by input
format and number of workers.

    python bench/prepare_throughput.py --tokenizer runs/tiny/tokenizer.model [--workers 1,2] [--doc-chars 4096]
        [--repeat 2] [--formats jsonl.zst,parquet] [inputs ...]

The inputs' text is cut at paragraph breaks into documents of about --doc-chars characters (pretraining corpora
are many documents of a few KB; --doc-chars 0 keeps every file whole, which with five books leaves workers idle)
and written in each format (zstd JSON lines; parquet with row groups of 1024 documents), repeated --repeat times.
Raw encode runs single-threaded in this process on the same documents, in the same run. Prints one JSON line per
(format, workers); `ratio_per_worker` is prepare's tokens/s per worker over raw encode's (the target is >= 0.8;
on a machine with as many cores as workers, prepare's own process - reading, decompressing, packing, writing -
competes with them), `scaling` is tokens/s over the tokens/s of the first worker count.
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


def write_inputs(documents: list[str], folder: Path, form: str) -> Path:
    if form == "jsonl.zst":
        import zstandard

        path = folder / "documents.jsonl.zst"
        path.write_bytes(
            zstandard.ZstdCompressor().compress("".join(json.dumps({"text": d}) + "\n" for d in documents).encode())
        )
    elif form == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "documents.parquet"
        pq.write_table(pa.table({"text": documents}), path, row_group_size=1024)
    else:
        raise SystemExit(f"unknown format {form}: jsonl.zst or parquet")
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("inputs", nargs="*", default=["corpus"])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--formats", default="jsonl.zst,parquet")
    parser.add_argument("--row-length", type=int, default=256)
    parser.add_argument("--doc-chars", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    import streaming  # noqa: F401  (its import takes seconds; keep it out of the timed region)

    tokenizer = Tokenizer.load(args.tokenizer)
    documents = cut_documents(list(read_all(find_input_files(args.inputs))), args.doc_chars) * args.repeat
    start = time.perf_counter()
    raw_tokens = sum(len(ids) + 1 for ids in tokenizer.processor.encode(documents, num_threads=1))
    raw_rate = raw_tokens / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as folder:
        for form in args.formats.split(","):
            source = write_inputs(documents, Path(folder), form)
            first_rate = None
            for workers in map(int, args.workers.split(",")):
                output = Path(folder) / f"shards-{form}-{workers}"
                start = time.perf_counter()
                metadata = prepare(
                    [source], output, args.tokenizer, row_length=args.row_length, workers=workers, progress=False
                )
                rate = metadata["splits"]["train"]["tokens"] / (time.perf_counter() - start)
                assert metadata["splits"]["train"]["tokens"] == raw_tokens, "prepare and raw encode disagree"
                first_rate = first_rate or rate
                print(
                    json.dumps(
                        {
                            "bench": "prepare_throughput",
                            "format": form,
                            "documents": len(documents),
                            "tokens": raw_tokens,
                            "input_mb": round(source.stat().st_size / 1e6, 2),
                            "workers": workers,
                            "cpus": os.cpu_count(),
                            "raw_encode_tokens_per_s": round(raw_rate),
                            "prepare_tokens_per_s": round(rate),
                            "prepare_tokens_per_s_per_worker": round(rate / workers),
                            "ratio_per_worker": round(rate / workers / raw_rate, 3),
                            "scaling": round(rate / first_rate, 2),
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
