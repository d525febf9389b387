"""`lm2 data prepare`: tokenize documents in worker processes, pack them into rows, write MDS shards.

Rows are `row_length + 1` tokens, so a row gives `row_length` inputs and their shifted labels; packing.py says how
documents become rows (concat, whole, document). With `answer_field`, each JSONL record is a prompt (its
`text_field`) and an answer, and the loss covers only the answer's tokens and EOS: the rows carry a loss mask.
The output folder:

    <output>/lm2_data.json   what the rows are (tokenizer sha256, row length, packing, counts): see metadata.py
    <output>/train/          MDS shards (zstd, xxh64 per shard) + index.json, read by streaming.py; with packing
                             "document", documents.npy (each document's row count, in row order)
    <output>/val/            the same for the validation documents, when val_fraction > 0

Locally, everything is written to a hidden temporary folder next to <output> and renamed at the end, so an
interrupted or failed run leaves no folder that looks complete. A remote <output> (s3://bucket/prefix, ...)
receives each shard as soon as it is written (streaming's MDSWriter uploads it and deletes the local copy) and
lm2_data.json last, so only a finished dataset has one. The same inputs, tokenizer and options give
byte-identical output: documents are encoded in parallel but consumed in input order. Many machines can
prepare one dataset together: see parts.py.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import shutil
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lm2.model.config import ModelConfig
from lm2.model.errors import DataError
from lm2.pipeline.data.metadata import DOCUMENTS_FILE, FORMAT, METADATA_FILE, check_vocab_fits
from lm2.pipeline.data.packing import PACKINGS, DocumentPacker, StreamPacker
from lm2.pipeline.data.parts import Part, pieces_of_part, write_json
from lm2.pipeline.data.sources import Chunk, Piece, find_input_files, list_pieces, read_piece
from lm2.pipeline.data.storage import Location
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
    """PAD tokens: the last row's fill, plus the row ends skipped by packing "whole" or "document"."""
    truncated: int = 0
    """Documents cut to their last row (truncate)."""
    first_id: int = 0


class _SplitWriter:
    """One split's packer, MDS writer and counts, and with packing "document" its table of documents."""

    def __init__(
        self, folder: Path, remote: str | None, packer, masked: bool, truncate: bool, first_id: int, size_limit: int
    ):
        from streaming import MDSWriter  # streaming imports torch: keep `lm2 data` startup light until here

        self.folder, self.packer, self.remote, self.masked, self.truncate = folder, packer, remote, masked, truncate
        self.documents = isinstance(packer, DocumentPacker)
        self.counts = SplitCounts(first_id=first_id)
        self.rows_per_document: list[int] = []
        self._document_rows = 0  # rows of the current document so far
        self._tail = np.empty((2, 0), np.int64)  # --truncate: the current document's last tokens so far
        columns = {"tokens": f"ndarray:{packer.dtype.name}:{packer.width}", "id": "int64"}
        if masked:
            columns["mask"] = f"ndarray:uint8:{packer.width}"
        if self.documents:
            columns |= {"document": "int64", "position": "int64"}
        try:
            self.writer = MDSWriter(
                out=(str(folder), remote) if remote else str(folder),
                compression="zstd",
                hashes=["xxh64"],
                size_limit=size_limit,
                keep_local=False,
                columns=columns,
            )
        except Exception as error:  # every storage backend raises its own types
            raise DataError(
                f"cannot write to {remote} ({error}); check the URL, the bucket and the credentials "
                "(S3_ENDPOINT_URL for S3-compatible stores)"
            ) from None

    def add_document(self, piece: np.ndarray, first: bool = True, last: bool = True) -> None:
        """piece: [2, n] tokens and loss mask (packing.py) of a document, or of the part of a long one that `first`
        and `last` describe (sources.Chunk)."""
        if self.truncate:
            piece = self._truncated(piece, first, last)
            if piece is None:
                return
        rows = self.packer.add(piece, first, last)
        self._write(rows, self.counts.documents, self._document_rows)
        self._document_rows += len(rows)
        if last:
            if self.documents:
                self.rows_per_document.append(self._document_rows)
            self._document_rows = 0
            self.counts.documents += 1
        self.counts.tokens += piece.shape[1]

    def _truncated(self, piece: np.ndarray, first: bool, last: bool) -> np.ndarray | None:
        """--truncate: the document's last `width` tokens once its last piece arrives (None before)."""
        self._tail = piece if first else np.concatenate([self._tail, piece], axis=1)
        self._tail = self._tail[:, -self.packer.width - 1 :]  # one more than a row: enough to tell it was longer
        if not last:
            return None
        if self._tail.shape[1] > self.packer.width:
            self.counts.truncated += 1
        return self._tail[:, -self.packer.width :]

    def close(self) -> None:
        self._write(self.packer.finish(), None)
        self.counts.padding = self.packer.padding
        self._uploading(self.writer.finish)
        if self.documents:
            self._write_documents()

    def _write(self, rows: np.ndarray, document: int | None, first_position: int = 0) -> None:
        for position, row in enumerate(rows, start=first_position):
            sample = {"tokens": row[0], "id": self.counts.first_id + self.counts.rows}
            if self.masked:
                sample["mask"] = row[1].astype(np.uint8)
            if self.documents:  # numbered from the split's (or part's) first row id: unique across parts
                sample |= {"document": self.counts.first_id + document, "position": position}
            self._uploading(self.writer.write, sample)
            self.counts.rows += 1

    def _write_documents(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        np.save(self.folder / DOCUMENTS_FILE, np.array(self.rows_per_document, dtype=np.int64))
        if self.remote:
            folder, _, split = self.remote.rpartition("/")
            self._uploading(Location(folder).upload, self.folder / DOCUMENTS_FILE, f"{split}/{DOCUMENTS_FILE}")

    def _uploading(self, call, *args) -> None:
        try:
            call(*args)
        except Exception as error:
            # MDSWriter reports a failed upload (in its threads) as a bare Exception on the next call.
            if not self.remote or "threads failed" not in str(error):
                raise
            raise DataError(
                f"uploading shards to {self.remote} failed (see the log above); the output is "
                "incomplete (no lm2_data.json): remove it and run again"
            ) from None


def is_validation(index: int, val_fraction: float) -> bool:
    """Document `index` goes to val: every 1/val_fraction-th document, spread evenly and deterministically."""
    return int((index + 1) * val_fraction) > int(index * val_fraction)


def _batches(chunks: Iterable[Chunk]) -> Iterator[list[Chunk]]:
    batch, chars = [], 0
    for chunk in chunks:
        batch.append(chunk)
        chars += len(chunk.text) + len(chunk.answer or "")
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(tokenizer_path)


def _encode_batch(chunks: list[Chunk]) -> list[tuple[np.ndarray, bool, bool]]:
    """Each chunk as ([2, n], first, last): its tokens (EOS last where it ends its document) and their loss mask: 1
    everywhere for a text; for a prompt and its answer, 0 on the prompt's tokens and 1 on the answer's and EOS."""
    texts = iter(_worker_tokenizer.encode_chunks([chunk for chunk in chunks if chunk.answer is None]))
    encoded = []
    for chunk in chunks:
        if chunk.answer is None:
            tokens = next(texts)
            mask = np.ones_like(tokens)
        else:
            tokens, answer_from = _prompt_and_answer(chunk.text, chunk.answer)
            mask = (np.arange(len(tokens)) >= answer_from).astype(np.int64)
        encoded.append((np.stack([tokens, mask]), chunk.first, chunk.last))
    return encoded


def _prompt_and_answer(prompt: str, answer: str) -> tuple[np.ndarray, int]:
    """The tokens of prompt + answer + EOS, tokenized as one text, and the index of the first token the loss covers.
    One text, because that is how a model reads its answer at inference: tokenized alone, the answer would get a
    word-start piece of its own from sentencepiece's dummy prefix (" kitchen." -> "▁▁", "k", ... where the prompt's
    continuation is "▁k", ...), which a model would learn to emit and no prompt would ever contain. The loss starts
    at the first token that differs from the prompt's own tokens (a token the seam merges counts as the answer's)."""
    prompt_ids = _worker_tokenizer.encode(prompt)
    joint = _worker_tokenizer.encode(prompt + answer)
    answer_from = next((i for i, (a, b) in enumerate(zip(prompt_ids, joint)) if a != b), len(prompt_ids))
    return np.array([*joint, _worker_tokenizer.eos_id], dtype=np.int64), min(answer_from, len(joint))


def encode_in_order(
    batches: Iterable[list[Chunk]], tokenizer_path: str, workers: int
) -> Iterator[list[tuple[np.ndarray, bool, bool]]]:
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
        raise DataError(
            f"--row-length {row_length} differs from model.row_length {model.row_length} of the "
            "config; drop one of them"
        )
    resolved = row_length if row_length is not None else (model.row_length if model else None)
    if resolved is None or resolved < 1:
        raise DataError("give a positive --row-length, or --config to take model.row_length")
    return resolved


def prepare(
    inputs: Iterable[str | Path],
    output: str | Path,
    tokenizer_path: str | Path,
    *,
    row_length: int | None = None,
    model: ModelConfig | None = None,
    workers: int = 1,
    val_fraction: float = 0.0,
    text_field: str = "text",
    answer_field: str | None = None,
    packing: str = "concat",
    truncate: bool = False,
    shard_size_limit: int = 1 << 26,
    part: Part | None = None,
    progress: bool = True,
) -> dict:
    """Tokenizes, packs and shards `inputs` into `output`; returns the metadata written to lm2_data.json.

    Args:
        inputs: files and folders (see sources.py for what counts as a document).
        output: the dataset folder to create (it must not exist yet), or a remote URL (s3://bucket/prefix).
        tokenizer_path: the sentencepiece .model to encode with.
        row_length: tokens per training row; rows hold row_length + 1 tokens. Defaults to model.row_length.
        model: if given, the tokenizer must fit its embedding and row_length must match it.
        workers: encoding processes.
        val_fraction: share of documents (every 1/val_fraction-th) written to the val split.
        text_field: the JSONL field or parquet/dataset column holding the text (with answer_field: the prompt).
        answer_field: the JSONL field of each record's answer: the loss then covers only the answer and EOS.
        packing: concat, whole or document (packing.py).
        truncate: cut a document longer than a row to its last row_length + 1 tokens (its end stays: for
            prompt/answer data read by a model of a short context).
        shard_size_limit: bytes of uncompressed rows per shard.
        part: write only this part of the inputs, into output's part folders (parts.py); merge them after.
        progress: show progress (input bytes, MB/s, ETA, documents, tokens) on stderr.
    """
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
    pieces = list_pieces(files)
    if part is not None:
        pieces = pieces_of_part(pieces, part)
    location = Location(output)
    _check_output(location, part)
    staging = _staging_folder(location)
    try:
        counts = _write_splits(
            pieces,
            staging,
            location,
            part,
            tokenizer,
            row_length,
            workers,
            val_fraction,
            (text_field, answer_field),
            packing,
            truncate,
            shard_size_limit,
            progress,
        )
        metadata = {
            "format": FORMAT,
            "tokenizer": tokenizer.describe(),
            "row_length": row_length,
            "dtype": _row_dtype(tokenizer).name,
            "val_fraction": val_fraction,
            "text_field": text_field,
            "answer_field": answer_field,
            "packing": packing,
            "truncate": truncate,
            "splits": {k: asdict(v) for k, v in counts.items()},
            "inputs": [str(f) for f in files] if part is None else [str(p) for p in pieces],
        }
        if part is not None:
            metadata["part"] = {"index": part.index, "count": part.count}
        _publish(location, part, staging, metadata)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metadata


def _staging_folder(location: Location) -> Path:
    """Where the splits are written before they are published. A local output is staged next to its final place
    (same file system: renames) in a folder made by mkdir, so that it is published with the umask's mode like any
    other folder (tempfile.mkdtemp makes it 0700: nobody else on a shared cluster could read the dataset); a remote
    one in a private temporary folder, from which it is uploaded."""
    if location.remote:
        return Path(tempfile.mkdtemp(prefix=".lm2-prepare-"))
    final = Path(location.url)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".lm2-prepare-{final.name}-{secrets.token_hex(4)}"
    staging.mkdir()
    return staging


def _check_output(location: Location, part: Part | None) -> None:
    if part is None:
        if Path(location.url).exists() if not location.remote else location.holds_anything():
            raise DataError(
                f"{location.url} already exists: delete it or choose another --output (prepare never overwrites shards)"
            )
        return
    if location.read_json(part.metadata_name) is not None:
        raise DataError(f"{location.join(part.metadata_name)} exists: {part.name} is already prepared")
    for split in ("train", "val"):
        if not location.holds_anything(f"{split}/{part.name}"):
            continue
        if location.remote:
            raise DataError(
                f"{location.join(split, part.name)} holds objects of an unfinished run: delete them "
                "and run this part again"
            )
        shutil.rmtree(location.join(split, part.name))  # an interrupted run's: local parts are renamed in last


def _split_places(location: Location, part: Part | None, staging: Path, split: str) -> tuple[Path, str | None]:
    """Where a split's shards are written: a local folder, and the remote folder they are uploaded to."""
    remote = location.join(split, *([part.name] if part else [])) if location.remote else None
    return staging / split, remote


def _publish(location: Location, part: Part | None, staging: Path, metadata: dict) -> None:
    """Makes the written splits visible (local: renames) and writes lm2_data.json last."""
    name = part.metadata_name if part else METADATA_FILE
    if location.remote:
        write_json(location, name, metadata)
    elif part is None:
        write_json(Location(staging), METADATA_FILE, metadata)
        if Path(location.url).exists():
            raise DataError(f"{location.url} appeared while preparing: delete it or choose another --output")
        os.rename(staging, location.url)
    else:
        for split in metadata["splits"]:
            target = Path(location.join(split, part.name))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging / split, target)
        write_json(location, name, metadata)


def _row_dtype(tokenizer: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)


def _documents(pieces: list[Piece], fields: tuple[str, str | None], bar: tqdm) -> Iterator[Chunk]:
    for piece in pieces:
        yield from read_piece(piece, *fields)
        bar.update(piece.size)


def _packer(packing: str, width: int, tokenizer: Tokenizer):
    dtype = _row_dtype(tokenizer)
    if packing == "document":
        return DocumentPacker(width, tokenizer.pad_id, dtype)
    return StreamPacker(width, tokenizer.pad_id, dtype, whole=packing == "whole")


def _write_splits(
    pieces: list[Piece],
    staging: Path,
    location: Location,
    part: Part | None,
    tokenizer: Tokenizer,
    row_length: int,
    workers: int,
    val_fraction: float,
    fields: tuple[str, str | None],
    packing: str,
    truncate: bool,
    size_limit: int,
    progress: bool,
) -> dict[str, SplitCounts]:
    numbering = part or Part(0, 1)
    names = ["train", "val"] if val_fraction else ["train"]
    splits = {
        name: _SplitWriter(
            *_split_places(location, part, staging, name),
            _packer(packing, row_length + 1, tokenizer),
            fields[1] is not None,
            truncate,
            numbering.first_id(name),
            size_limit,
        )
        for name in names
    }
    index = tokens = 0
    with tqdm(
        desc="preparing", total=sum(p.size for p in pieces), unit="B", unit_scale=True, disable=not progress
    ) as bar:
        for encoded in encode_in_order(_batches(_documents(pieces, fields, bar)), str(tokenizer.path), workers):
            for piece, first, last in encoded:
                split = "val" if val_fraction and is_validation(index, val_fraction) else "train"
                splits[split].add_document(piece, first, last)
                index += last
                tokens += piece.shape[1]
            bar.set_postfix(documents=f"{index:,}", tokens=f"{tokens:,}", refresh=False)
    for writer in splits.values():
        writer.close()
    if not index:
        raise DataError(f"no documents in {len(pieces)} input piece(s): every one is empty or whitespace")
    if val_fraction and not splits["val"].counts.documents and (part is None or part.count == 1):
        # A part may hold too few documents for one; merge checks the dataset's total instead.
        raise DataError(
            f"--val-fraction {val_fraction} of {index} document(s) selects none: raise it, or give "
            "more (smaller) documents"
        )
    return {name: writer.counts for name, writer in splits.items()}
