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

    return ModelConfig(vocab_size=vocab_size, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                       ffn_hidden_size=64, row_length=row_length, segment_length=row_length)
