"""Documents from raw inputs, streamed in one deterministic order (no file is ever loaded whole).

- `.txt` / `.txt.gz` / `.txt.zst`: the whole file is ONE document. Books and articles stay whole, so a memory
  model sees long coherent contexts; put one document per file, or use JSONL for many small documents. A text is
  read and handed on in chunks of at most CHUNK_CHARS characters (`Chunk`), cut where the tokens of the whole text
  are cut too (after a newline, else before a word), so memory stays bounded for a file of any size, a single
  100 MB line included.
- `.jsonl` / `.jsonl.gz` / `.jsonl.zst`: one JSON object per line; its `text_field` (default "text") is the
  document. Read line by line through the decompressor. With an `answer_field`, each record is a (prompt, answer)
  pair, its `text_field` the prompt: `lm2 data prepare` puts the loss on the answer only.
- `.parquet`: the string column `text_field` is the documents, read one row group at a time.
- A Hugging Face dataset written by `Dataset.save_to_disk` (a folder with state.json and data-*.arrow files):
  the column `text_field`, read record batch by record batch from the memory-mapped arrow files. A saved
  DatasetDict is refused: give the folder of one split (e.g. `saved/train`). Other local dataset files
  (parquet, JSON lines) are read directly; datasets 5 no longer runs loading scripts.
- A folder: every input above in it, recursively; other files (README, licences) are skipped.

Inputs are read in sorted path order, documents in file order. Each input is made of pieces, the unit a
distributed prepare assigns to a slice: a parquet row group, an arrow file of a saved dataset, otherwise the
whole file. Text must be UTF-8 (an error names the file and the byte); whitespace-only and null documents are
skipped, and an empty (0-byte) input with a warning.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lm2.model.errors import DataError

TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.zst")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
_KINDS = f"{', '.join(SUFFIXES)} files, or a Hugging Face dataset folder (save_to_disk)"

_RECORD_BATCH = 1024
CHUNK_CHARS = 1 << 22
"""A text document is handed on in chunks of at most this many characters (4 Mi)."""
_READ_BYTES = 1 << 20


@dataclass(frozen=True)
class Chunk:
    """A document, or a part of a long text document: `first` starts it, `last` ends it (a document followed by
    EOS). Most documents are one chunk, both first and last. With an answer_field, `text` is a record's prompt and
    `answer` its answer."""

    text: str
    first: bool = True
    last: bool = True
    answer: str | None = None


def _is_input(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def _is_saved_dataset(folder: Path) -> bool:
    if (folder / "dataset_dict.json").is_file():
        raise DataError(f"{folder} is a saved DatasetDict: give the folder of one split, e.g. {folder}/train")
    return (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()


def _walk(folder: Path) -> Iterator[Path]:
    """Input files and saved datasets under `folder`; a saved dataset's own files are not inputs."""
    if _is_saved_dataset(folder):
        yield folder
        return
    for child in folder.iterdir():
        if child.is_dir():
            yield from _walk(child)
        elif child.is_file() and _is_input(child):
            yield child


def find_input_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expands files and folders into the sorted list of inputs (files and saved-dataset folders)."""
    paths = list(paths)
    files: set[Path] = set()
    for path in map(Path, paths):
        if path.is_dir():
            files.update(_walk(path))
        elif path.is_file():
            if not _is_input(path):
                raise DataError(f"{path}: unknown input type; inputs are {_KINDS}")
            files.add(path)
        else:
            raise DataError(f"input {path} does not exist")
    if not files:
        raise DataError(f"no inputs ({_KINDS}) in {', '.join(map(str, paths)) or 'the arguments'}")
    return sorted(files)


@dataclass(frozen=True)
class Piece:
    """A part of one input read as a unit: a parquet row group, a saved dataset's arrow file, or a whole file."""

    path: Path
    part: int | None
    """Row group of a parquet file, index of an arrow file of a saved dataset; None for a whole file."""
    size: int
    """Bytes it holds, to balance slices."""

    def __str__(self) -> str:
        if self.part is None:
            return str(self.path)
        return f"{self.path} row group {self.part}" if self.path.is_file() else f"{self.path} arrow file {self.part}"


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise DataError(f"{path}: not a readable parquet file ({error})") from None


def _arrow_files(folder: Path) -> list[Path]:
    try:
        names = [entry["filename"] for entry in json.loads((folder / "state.json").read_text())["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(f"{folder}/state.json is not a datasets save_to_disk state ({error})") from None
    return [folder / name for name in names]


def list_pieces(files: Iterable[Path]) -> list[Piece]:
    """The pieces of `files` (from find_input_files), in reading order."""
    pieces = []
    for path in files:
        if path.is_dir():
            pieces += [Piece(path, i, f.stat().st_size) for i, f in enumerate(_arrow_files(path))]
        elif path.name.endswith(PARQUET_SUFFIXES):
            metadata = _parquet_file(path).metadata
            pieces += [Piece(path, i, metadata.row_group(i).total_byte_size) for i in range(metadata.num_row_groups)]
        elif path.stat().st_size == 0:
            warnings.warn(f"skipping {path}: it is empty (0 bytes)", stacklevel=2)
        else:
            pieces.append(Piece(path, None, path.stat().st_size))
    return pieces


def _open(path: Path) -> BinaryIO:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True))
    return open(path, "rb")


def _read_errors() -> tuple[type[BaseException], ...]:
    import zstandard

    return OSError, EOFError, zstandard.ZstdError


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{where}: byte {error.start} is not valid UTF-8 ({error.reason}); re-encode the "
            "file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        with _open(path) as handle:
            yield from enumerate(handle, start=1)
    except _read_errors() as error:
        raise DataError(f"{path}: cannot read ({error})") from None


def _jsonl_documents(path: Path, text_field: str, answer_field: str | None) -> Iterator[Chunk]:
    for number, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(_decode(line, where))
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not JSON ({error.msg})") from None
        for field, option in ((text_field, "--text-field"), (answer_field, "--answer-field")):
            if field is not None and not (isinstance(record, dict) and isinstance(record.get(field), str)):
                raise DataError(f"{where}: no string field {field!r}; set {option} to the one the records use")
        yield Chunk(record[text_field], answer=None if answer_field is None else record[answer_field])


_WORD_START = re.compile(r"(?<=\S) (?=\S)")


def _cut(text: str, limit: int) -> int:
    """Where a chunk of `text` ends, at most `limit` characters in: after its last newline; else before its last
    space between two words (sentencepiece's pieces never span a newline, nor start inside a word, so the chunks'
    tokens are the whole text's); else at `limit`, inside one unbroken word as long as a chunk."""
    newline = text.rfind("\n", 0, limit)
    if newline > 0:
        return newline + 1
    spaces = [match.start() for match in _WORD_START.finditer(text, max(0, limit - 4096), limit)]
    return spaces[-1] if spaces and spaces[-1] > 0 else limit


def _decoded(decoder: codecs.IncrementalDecoder, data: bytes, offset: int, path: Path, final: bool = False) -> str:
    """`data`, the bytes of `path` from `offset` on, decoded (a character split across reads is completed by the
    next); a DataError naming the first byte that is not UTF-8."""
    pending = len(decoder.getstate()[0])
    try:
        return decoder.decode(data, final)
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: byte {offset - pending + error.start} is not valid UTF-8 ({error.reason}); re-encode the "
            "file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _text_chunks(path: Path) -> Iterator[Chunk]:
    """The file's text as one document, in chunks of at most CHUNK_CHARS characters (see _cut)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    text, offset, first = "", 0, True
    try:
        with _open(path) as handle:
            while block := handle.read(_READ_BYTES):
                text += _decoded(decoder, block, offset, path)
                offset += len(block)
                while len(text) >= CHUNK_CHARS:
                    cut = _cut(text, CHUNK_CHARS)
                    yield Chunk(text[:cut], first, False)
                    text, first = text[cut:], False
    except _read_errors() as error:
        raise DataError(f"{path}: cannot read ({error})") from None
    text += _decoded(decoder, b"", offset, path, final=True)
    if not first or text.strip():  # a document of whitespace alone is skipped, as every other kind's
        yield Chunk(text, first, True)


def _column(batches: Iterable, text_field: str, where: str) -> Iterator[str]:
    import pyarrow as pa

    for batch in batches:
        if text_field not in batch.schema.names:
            raise DataError(
                f"{where}: no column {text_field!r} (it has {', '.join(batch.schema.names)}); set "
                "the text field name (--text-field) to the one holding the text"
            )
        column = batch.column(text_field)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise DataError(f"{where}: column {text_field!r} holds {column.type}, not strings")
        yield from (text for text in column.to_pylist() if text is not None)


def _parquet_documents(piece: Piece, text_field: str) -> Iterator[str]:
    parquet = _parquet_file(piece.path)
    if text_field not in parquet.schema_arrow.names:
        raise DataError(
            f"{piece.path}: no column {text_field!r} (it has {', '.join(parquet.schema_arrow.names)}); "
            "set the text field name (--text-field) to the one holding the text"
        )
    batches = parquet.iter_batches(batch_size=_RECORD_BATCH, row_groups=[piece.part], columns=[text_field])
    yield from _column(batches, text_field, str(piece))


def _arrow_documents(piece: Piece, text_field: str) -> Iterator[str]:
    import pyarrow as pa

    file = _arrow_files(piece.path)[piece.part]
    try:
        with pa.memory_map(str(file)) as source:
            yield from _column(pa.ipc.open_stream(source), text_field, str(piece))
    except (OSError, pa.ArrowInvalid) as error:
        raise DataError(f"{file}: cannot read ({error}); save the dataset again") from None


def read_piece(piece: Piece, text_field: str = "text", answer_field: str | None = None) -> Iterator[Chunk]:
    """The non-blank documents of one piece, as chunks; with answer_field, JSONL records' prompts and answers."""
    if answer_field is not None and not piece.path.name.endswith(JSONL_SUFFIXES):
        raise DataError(
            f"{piece.path}: --answer-field applies to .jsonl inputs only; give the prompts and answers as JSON lines"
        )
    if piece.path.is_file() and piece.path.name.endswith(TEXT_SUFFIXES):
        return _text_chunks(piece.path)
    if piece.path.is_dir():
        chunks = (Chunk(text) for text in _arrow_documents(piece, text_field))
    elif piece.path.name.endswith(PARQUET_SUFFIXES):
        chunks = (Chunk(text) for text in _parquet_documents(piece, text_field))
    else:
        chunks = _jsonl_documents(piece.path, text_field, answer_field)
    return (chunk for chunk in chunks if (chunk.text if chunk.answer is None else chunk.answer).strip())


def read_all(files: Iterable[Path], text_field: str = "text") -> Iterator[str]:
    """The text of every document of `files`, in order; a long text document in chunks (cut at line ends: what a
    tokenizer trains on, line by line)."""
    for piece in list_pieces(files):
        yield from (chunk.text for chunk in read_piece(piece, text_field))


def read_documents(files: Iterable[Path], text_field: str = "text") -> Iterator[str]:
    """Every document of `files` whole, in order (a long text document joined from its chunks)."""
    parts: list[str] = []
    for piece in list_pieces(files):
        for chunk in read_piece(piece, text_field):
            parts.append(chunk.text)
            if chunk.last:
                yield "".join(parts)
                parts = []
