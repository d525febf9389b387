"""Distributed preparation: K independent `lm2 data prepare --num-shards K --shard-index i` jobs, then `lm2 data merge`.

Part i of K reads a contiguous run of the input pieces (sources.py: a parquet row group, an arrow file of a
saved dataset, otherwise a whole file), chosen by bytes so the parts are about equal, and writes

    <output>/train/part-0000i-of-0000K/   its MDS shards and index.json
    <output>/val/part-0000i-of-0000K/     (when val_fraction > 0)
    <output>/parts/part-0000i-of-0000K.json   its lm2_data.json, written last: the part is complete

`merge` checks that all K parts are complete and agree (tokenizer, row length, packing, ...), writes each
split's index.json over the parts in order (streaming's merge_index) and the dataset's lm2_data.json with the
summed counts. The merged dataset's rows are part 0's rows, then part 1's, ...: each part is exactly what a
single-process prepare of its pieces writes, so the documents and their tokens come in the same order as a
single-process prepare of all the inputs; what differs is only at the K-1 junctions, where each part's last
row is padded instead of running on into the next part's first document, and the validation documents, which
are every 1/val_fraction-th document counted within each part. Row ids stay unique: part i of K numbers its
rows from i * 2^40 / K (val rows from 2^40 + i * 2^40 / K); a single-process prepare is part 0 of 1.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lm2.model.errors import DataError
from lm2.pipeline.data.metadata import DOCUMENTS_FILE, METADATA_FILE, VAL_ID_OFFSET
from lm2.pipeline.data.sources import Piece
from lm2.pipeline.data.storage import Location

PARTS_FOLDER = "parts"
_MUST_AGREE = (
    "format",
    "tokenizer",
    "row_length",
    "dtype",
    "val_fraction",
    "text_field",
    "answer_field",
    "packing",
    "truncate",
)


@dataclass(frozen=True)
class Part:
    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise DataError(f"--shard-index must be in [0, --num-shards), got index {self.index} of {self.count}")

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}"

    @property
    def metadata_name(self) -> str:
        return f"{PARTS_FOLDER}/{self.name}.json"

    def first_id(self, split: str) -> int:
        return (VAL_ID_OFFSET if split == "val" else 0) + self.index * (VAL_ID_OFFSET // self.count)

    @classmethod
    def from_environment(cls) -> Part | None:
        """The part of a SLURM array task (`sbatch --array=0-K-1`), or None outside an array job."""
        if "SLURM_ARRAY_TASK_ID" not in os.environ:
            return None
        first, last = int(os.environ["SLURM_ARRAY_TASK_MIN"]), int(os.environ["SLURM_ARRAY_TASK_MAX"])
        count = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        if last - first + 1 != count:
            raise DataError(
                f"the array job's task ids {first}..{last} are not consecutive ({count} tasks): "
                "submit with --array=0-K-1 (a % limit is fine, a :step is not)"
            )
        return cls(int(os.environ["SLURM_ARRAY_TASK_ID"]) - first, count)


def pieces_of_part(pieces: list[Piece], part: Part) -> list[Piece]:
    """Part `part`'s contiguous run of `pieces`. Part i starts at the first piece whose bytes' midpoint lies past
    i/K of all bytes (balance by size), moved so that every part gets at least one piece when there are enough."""
    if len(pieces) < part.count:
        raise DataError(
            f"{part.name} gets no input: the {len(pieces)} input piece(s) do not fill "
            f"{part.count} parts; lower --num-shards or split the inputs into more files"
        )
    total, start, midpoints = sum(piece.size for piece in pieces), 0, []
    for piece in pieces:
        midpoints.append(2 * start + piece.size)
        start += piece.size
    starts = [0] + [sum(m * part.count < 2 * i * total for m in midpoints) for i in range(1, part.count)]
    for i in range(1, part.count):  # at least one piece per part, and enough left for the parts after
        starts[i] = min(max(starts[i], starts[i - 1] + 1), len(pieces) - (part.count - i))
    ends = starts[1:] + [len(pieces)]
    return pieces[starts[part.index] : ends[part.index]]


def merge(output: str | Path) -> dict:
    """Joins the complete parts under `output` into one dataset; returns its lm2_data.json."""
    location = Location(output)
    if location.read_json(METADATA_FILE) is not None:
        raise DataError(f"{location.join(METADATA_FILE)} exists: {output} is already a complete dataset")
    names = [name for name in location.list(PARTS_FOLDER) if name.endswith(".json")]
    if not names:
        raise DataError(
            f"{location.join(PARTS_FOLDER)} holds no finished part: run `lm2 data prepare "
            "--num-shards K --shard-index i` for every i first"
        )
    parts = [location.read_json(f"{PARTS_FOLDER}/{name}") for name in names]
    count = parts[0]["part"]["count"]
    expected = [Part(i, count) for i in range(count)]
    missing = [part.index for part in expected if f"{part.name}.json" not in names]
    if missing or len(names) != count:
        raise DataError(
            f"{output}: parts {', '.join(map(str, missing)) or '?'} of {count} are not finished "
            f"(found {', '.join(names)}); run `lm2 data prepare --num-shards {count} --shard-index i` "
            "for each of them (or remove parts of another --num-shards)"
        )
    for name, part in zip(names, parts):
        for key in _MUST_AGREE:
            if part[key] != parts[0][key]:
                raise DataError(
                    f"{output}: {name} differs from {names[0]} in {key} ({part[key]!r} vs "
                    f"{parts[0][key]!r}); prepare every part with the same options"
                )
    splits = {}
    for split in parts[0]["splits"]:
        _merge_index(location, split, [part.name for part in expected])
        if parts[0]["packing"] == "document":
            _merge_documents(location, split, [part.name for part in expected])
        splits[split] = {
            key: sum(part["splits"][split].get(key, 0) for part in parts)
            for key in ("documents", "tokens", "rows", "padding", "truncated")
        }
        splits[split]["first_id"] = Part(0, 1).first_id(split)
    if "val" in splits and not splits["val"]["documents"]:
        raise DataError(
            f"{output}: --val-fraction {parts[0]['val_fraction']} selects no document in any of the "
            f"{count} parts: raise it, or give more (smaller) documents"
        )
    metadata = {key: value for key, value in parts[0].items() if key not in ("part", "inputs", "splits")}
    metadata.update(parts=count, splits=splits, inputs=[item for part in parts for item in part["inputs"]])
    write_json(location, METADATA_FILE, metadata)
    return metadata


def _merge_index(location: Location, split: str, part_names: list[str]) -> None:
    from streaming.base.util import merge_index

    if not location.remote:
        Path(location.join(split, "index.json")).unlink(missing_ok=True)  # a merge interrupted before the end
    try:
        merge_index(
            [location.join(split, name, "index.json") for name in part_names],
            location.join(split),
            keep_local=not location.remote,
        )  # remote: drop the local temporary copy
    except (OSError, RuntimeError) as error:
        raise DataError(f"cannot merge {location.join(split)} ({error}); is every part complete?") from None


def _merge_documents(location: Location, split: str, part_names: list[str]) -> None:
    """The split's table of documents (packing "document"): the parts' tables, in part order like the rows."""
    import numpy as np

    with tempfile.TemporaryDirectory() as folder:
        tables = [np.load(location.fetch(f"{split}/{name}/{DOCUMENTS_FILE}", Path(folder))) for name in part_names]
        merged = Path(folder, DOCUMENTS_FILE)
        np.save(merged, np.concatenate(tables))
        if location.remote:
            location.upload(merged, f"{split}/{DOCUMENTS_FILE}")
        else:
            shutil.copyfile(merged, location.join(split, DOCUMENTS_FILE))


def write_json(location: Location, name: str, data: dict) -> None:
    """Writes `name` last of a dataset or part: local atomically (rename), remote by one upload."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder, Path(name).name)
        local.write_text(text)
        if location.remote:
            location.upload(local, name)
        else:
            target = Path(location.join(name))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(local, target.with_name(f".{target.name}.tmp"))
            os.replace(target.with_name(f".{target.name}.tmp"), target)
