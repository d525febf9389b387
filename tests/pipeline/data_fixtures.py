"""Small real inputs for the data tests: a tokenizer trained once per session and a prepared dataset."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[2] / "corpus"


def write_inputs(folder: Path) -> Path:
    """A folder with a .txt document, a .jsonl of short documents and a non-input file that must be skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    macbeth = gzip.decompress((CORPUS / "shakespeare-macbeth.txt.gz").read_bytes()).decode()
    (folder / "macbeth.txt").write_text(macbeth[:20000])
    paragraphs = [p for p in macbeth[20000:60000].split("\n\n") if p.strip()]
    with open(folder / "scenes.jsonl", "w") as handle:
        for paragraph in paragraphs:
            handle.write(json.dumps({"text": paragraph, "meta": 1}) + "\n")
    (folder / "README.md").write_text("not an input")
    return folder


def tiny_model_config(row_length: int = 16, vocab_size: int = 512):
    from lm2.model.config import ModelConfig

    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        ffn_hidden_size=64,
        row_length=row_length,
        segment_length=row_length,
    )


def scene_texts() -> list[str]:
    """Short real documents: the paragraphs of the second part of Macbeth."""
    macbeth = gzip.decompress((CORPUS / "shakespeare-macbeth.txt.gz").read_bytes()).decode()
    return [p for p in macbeth[60000:100000].split("\n\n") if p.strip()]


def write_zst_jsonl(path: Path, texts: list[str], frames: int = 3) -> None:
    """JSON lines compressed as several concatenated zstd frames, as parallel compressors write them."""
    import zstandard

    lines = [json.dumps({"text": t}) + "\n" for t in texts]
    step = -(-len(lines) // frames)
    compressor = zstandard.ZstdCompressor()
    path.write_bytes(
        b"".join(compressor.compress("".join(lines[i : i + step]).encode()) for i in range(0, len(lines), step))
    )


def write_parquet(path: Path, texts: list[str | None], row_group_size: int, column: str = "text") -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: texts, "n": list(range(len(texts)))}), path, row_group_size=row_group_size)


def write_saved_dataset(folder: Path, texts: list[str], num_shards: int) -> None:
    from datasets import Dataset

    Dataset.from_dict({"text": texts, "n": list(range(len(texts)))}).save_to_disk(str(folder), num_shards=num_shards)


def write_mixed_inputs(folder: Path) -> list[str]:
    """One folder with every input kind (8 pieces); returns its documents in reading order (sorted paths)."""
    import zstandard

    texts = scene_texts()
    a, b, c, d = texts[:40], texts[40:90], texts[90:130], texts[130:170]
    folder.mkdir(parents=True, exist_ok=True)
    write_zst_jsonl(folder / "a.jsonl.zst", a)
    write_parquet(folder / "b.parquet", b[:20] + [None] + b[20:], row_group_size=17)  # 3 row groups, a null
    write_saved_dataset(folder / "c_saved", c, num_shards=2)
    (folder / "d.txt.zst").write_bytes(zstandard.ZstdCompressor().compress("\n\n".join(d).encode()))
    (folder / "e.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[170:200]))
    return a + b + c + ["\n\n".join(d)] + texts[170:200]
