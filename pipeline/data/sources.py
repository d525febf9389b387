"""Documents from raw text files, in one deterministic order.

- `.txt` / `.txt.gz`: the whole file is ONE document. Books and articles stay whole, so a memory model sees
  long coherent contexts; put one document per file, or use JSONL for many small documents.
- `.jsonl` / `.jsonl.gz`: one JSON object per line; its `text_field` (default "text") is the document.
- A folder: every file above in it, recursively; other files (README, licences) are skipped.

Files are read in sorted path order, documents in file order. Text must be UTF-8; whitespace-only
documents are skipped.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterable, Iterator

from lm2.model.errors import DataError

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


def _is_input(path: Path) -> bool:
    return path.name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)


def find_input_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expands files and folders into the sorted list of readable input files."""
    files: set[Path] = set()
    for path in map(Path, paths):
        if path.is_dir():
            files.update(p for p in path.rglob("*") if p.is_file() and _is_input(p))
        elif path.is_file():
            if not _is_input(path):
                raise DataError(f"{path}: unknown input type; inputs end in "
                                f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}")
            files.add(path)
        else:
            raise DataError(f"input {path} does not exist")
    if not files:
        raise DataError(f"no input files (*{', *'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}) in "
                        f"{', '.join(map(str, paths)) or 'the arguments'}")
    return sorted(files)


def _read_bytes(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read ({error})") from None


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: byte {error.start} is not valid UTF-8 ({error.reason}); re-encode the "
                        "file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    for number, line in enumerate(_read_bytes(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(_decode(line, where))
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise DataError(f"{where}: no string field {text_field!r}; set the text field name "
                            "(--text-field) to the one the records use")
        yield record[text_field]


def read_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """The non-blank documents of one input file."""
    if path.name.endswith(JSONL_SUFFIXES):
        documents: Iterable[str] = _jsonl_documents(path, text_field)
    else:
        documents = [_decode(_read_bytes(path), str(path))]
    return (doc for doc in documents if doc.strip())


def read_all(files: Iterable[Path], text_field: str = "text") -> Iterator[str]:
    """Every document of `files`, in order."""
    for path in files:
        yield from read_documents(path, text_field)
