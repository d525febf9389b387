"""`lm2 data prepare`: tokenize documents in worker processes, pack them into rows, write MDS shards.

Rows are `row_length + 1` tokens of the stream "doc0 EOS doc1 EOS ...", cut without overlap, so a row gives
`row_length` inputs and their shifted labels; the last row of a split is filled with PAD. With packing "whole",
a document that fits in one row never straddles two: the row it would overflow is filled with PAD (ignored by
the loss) and the document starts the next one. Tasks whose question must see its context (bAbI stories in
haystacks) need that; a books-only corpus loses nothing with the default "concat". The output folder:

    <output>/lm2_data.json   what the rows are (tokenizer sha256, row length, counts): see metadata.py
    <output>/train/          MDS shards (zstd, xxh64 per shard) + index.json, read by streaming.py
    <output>/val/            the same for the validation documents, when val_fraction > 0

Everything is written to a hidden temporary folder next to <output> and renamed at the end, so an
interrupted or failed run leaves no folder that looks complete. The same inputs, tokenizer and options give
byte-identical output: documents are encoded in parallel but consumed in input order.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from lm2.model.config import ModelConfig
from lm2.model.errors import DataError
from lm2.pipeline.data.metadata import FORMAT, METADATA_FILE, VAL_ID_OFFSET, check_vocab_fits
from lm2.pipeline.data.sources import find_input_files, read_all
from lm2.pipeline.data.tokenizer import Tokenizer

# Documents are sent to workers in batches of about this many characters: large enough to amortise the
# inter-process traffic, small enough to keep every worker busy.
_BATCH_CHARS = 1 << 18


@dataclass
class SplitCounts:
    documents: int = 0
    tokens: int = 0
    """Real tokens, EOS included, PAD excluded."""
    rows: int = 0
    padding: int = 0
    """PAD tokens: the last row's fill, plus the row ends skipped by packing "whole"."""
    first_id: int = 0


PACKINGS = ("concat", "whole")


class RowPacker:
    """Cuts a token stream into rows of `width` tokens; `finish` pads the last partial row. With `whole`, a
    document of at most `width` tokens that would straddle a row boundary starts a new row instead."""

    def __init__(self, width: int, pad_id: int, dtype: np.dtype, whole: bool = False) -> None:
        self.width, self.pad_id, self.dtype, self.whole = width, pad_id, dtype, whole
        self.pending = np.empty(0, dtype=dtype)
        self.padding = 0

    def add(self, tokens: np.ndarray) -> np.ndarray:
        closed = np.empty((0, self.width), self.dtype)
        if self.whole and len(tokens) <= self.width < len(self.pending) + len(tokens):
            closed = self._pad_pending()
        stream = np.concatenate([self.pending, tokens.astype(self.dtype)])
        full = len(stream) // self.width * self.width
        self.pending = stream[full:]
        return np.concatenate([closed, stream[:full].reshape(-1, self.width)])

    def finish(self) -> np.ndarray:
        """The last, padded row (none if the stream ended on a row boundary)."""
        return self._pad_pending() if len(self.pending) else np.empty((0, self.width), self.dtype)

    def _pad_pending(self) -> np.ndarray:
        padding = self.width - len(self.pending)
        row = np.concatenate([self.pending, np.full(padding, self.pad_id, self.dtype)])
        self.pending = np.empty(0, dtype=self.dtype)
        self.padding += padding
        return row[None, :]


class _SplitWriter:
    """One split's packer, MDS writer and counts."""

    def __init__(self, folder: Path, packer: RowPacker, first_id: int, size_limit: int) -> None:
        from streaming import MDSWriter  # streaming imports torch: keep `lm2 data` startup light until here

        self.packer = packer
        self.counts = SplitCounts(first_id=first_id)
        self.writer = MDSWriter(out=str(folder), compression="zstd", hashes=["xxh64"], size_limit=size_limit,
                                columns={"tokens": f"ndarray:{packer.dtype.name}:{packer.width}", "id": "int64"})

    def add_document(self, tokens: np.ndarray) -> None:
        self.counts.documents += 1
        self.counts.tokens += len(tokens)
        self._write(self.packer.add(tokens))

    def close(self) -> None:
        self._write(self.packer.finish())
        self.counts.padding = self.packer.padding
        self.writer.finish()

    def _write(self, rows: np.ndarray) -> None:
        for row in rows:
            self.writer.write({"tokens": row, "id": self.counts.first_id + self.counts.rows})
            self.counts.rows += 1


def is_validation(index: int, val_fraction: float) -> bool:
    """Document `index` goes to val: every 1/val_fraction-th document, spread evenly and deterministically."""
    return int((index + 1) * val_fraction) > int(index * val_fraction)


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for document in documents:
        batch.append(document)
        chars += len(document)
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(tokenizer_path)


def _encode_batch(texts: list[str]) -> list[np.ndarray]:
    return _worker_tokenizer.encode_documents(texts)


def encode_in_order(batches: Iterable[list[str]], tokenizer_path: str, workers: int) -> Iterator[list[np.ndarray]]:
    """Encodes batches on `workers` processes, yielding results in input order with a bounded backlog."""
    if workers == 1:
        _init_worker(tokenizer_path)
        yield from map(_encode_batch, batches)
        return
    # spawn, not fork: the caller may hold threads (torch, tqdm) that a fork would copy mid-flight.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_batch, (batch,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _resolve_row_length(row_length: int | None, model: ModelConfig | None) -> int:
    if model is not None and row_length is not None and row_length != model.row_length:
        raise DataError(f"--row-length {row_length} differs from model.row_length {model.row_length} of the "
                        "config; drop one of them")
    resolved = row_length if row_length is not None else (model.row_length if model else None)
    if resolved is None or resolved < 1:
        raise DataError("give a positive --row-length, or --config to take model.row_length")
    return resolved


def _check_output(output: Path) -> None:
    if output.exists():
        raise DataError(f"{output} already exists: delete it or choose another --output "
                        "(prepare never overwrites shards)")


def prepare(inputs: Iterable[str | Path], output: str | Path, tokenizer_path: str | Path, *,
            row_length: int | None = None, model: ModelConfig | None = None, workers: int = 1,
            val_fraction: float = 0.0, text_field: str = "text", packing: str = "concat",
            shard_size_limit: int = 1 << 26, progress: bool = True) -> dict:
    """Tokenizes, packs and shards `inputs` into `output`; returns the metadata written to lm2_data.json.

    Args:
        inputs: files and folders (see sources.py for what counts as a document).
        output: the dataset folder to create; it must not exist yet.
        tokenizer_path: the sentencepiece .model to encode with.
        row_length: tokens per training row; rows hold row_length + 1 tokens. Defaults to model.row_length.
        model: if given, the tokenizer must fit its embedding and row_length must match it.
        workers: encoding processes.
        val_fraction: share of documents (every 1/val_fraction-th) written to the val split.
        text_field: the JSONL field holding the text.
        packing: "concat" cuts the document stream anywhere; "whole" keeps documents that fit in a row whole.
        shard_size_limit: bytes of uncompressed rows per shard.
        progress: show a progress bar on stderr.
    """
    output = Path(output)
    row_length = _resolve_row_length(row_length, model)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    if packing not in PACKINGS:
        raise DataError(f"--packing must be one of {', '.join(PACKINGS)}, got {packing!r}")
    tokenizer = Tokenizer.load(tokenizer_path)
    if model is not None:
        check_vocab_fits(tokenizer.vocab_size, model, f"tokenizer {tokenizer.path}")
    files = find_input_files(inputs)
    _check_output(output)
    temporary = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        counts = _write_splits(files, temporary, tokenizer, row_length, workers, val_fraction, text_field,
                               packing == "whole", shard_size_limit, progress)
        metadata = {"format": FORMAT, "tokenizer": tokenizer.describe(), "row_length": row_length,
                    "dtype": _row_dtype(tokenizer).name, "val_fraction": val_fraction, "text_field": text_field,
                    "packing": packing, "inputs": [str(f) for f in files], "splits": {k: asdict(v) for k, v in counts.items()}}
        (temporary / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        _check_output(output)
        os.rename(temporary, output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return metadata


def _row_dtype(tokenizer: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)


def _write_splits(files: list[Path], folder: Path, tokenizer: Tokenizer, row_length: int, workers: int,
                  val_fraction: float, text_field: str, whole: bool, size_limit: int,
                  progress: bool) -> dict[str, SplitCounts]:
    def packer() -> RowPacker:
        return RowPacker(row_length + 1, tokenizer.pad_id, _row_dtype(tokenizer), whole)

    splits = {"train": _SplitWriter(folder / "train", packer(), 0, size_limit)}
    if val_fraction:
        splits["val"] = _SplitWriter(folder / "val", packer(), VAL_ID_OFFSET, size_limit)
    index = 0
    with tqdm(desc="tokenizing", unit=" docs", disable=not progress) as bar:
        for encoded in encode_in_order(_batches(read_all(files, text_field)), str(tokenizer.path), workers):
            for tokens in encoded:
                splits["val" if val_fraction and is_validation(index, val_fraction) else "train"].add_document(tokens)
                index += 1
            bar.update(len(encoded))
    for writer in splits.values():
        writer.close()
    if not index:
        raise DataError(f"no documents in {len(files)} input file(s): every file is empty or whitespace")
    if val_fraction and not splits["val"].counts.documents:
        raise DataError(f"--val-fraction {val_fraction} of {index} document(s) selects none: raise it, or give "
                        "more (smaller) documents")
    return {name: writer.counts for name, writer in splits.items()}
