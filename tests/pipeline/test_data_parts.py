"""Distributed prepare: parts of the inputs prepared independently, merged into one dataset that holds the documents
of a single-process prepare in the same order (parts.py documents the row order)."""

import json
import shutil

import numpy as np
import pytest

from lm2.model.errors import DataError
from lm2.pipeline.cli import main
from lm2.pipeline.data.metadata import VAL_ID_OFFSET
from lm2.pipeline.data.parts import Part, merge, pieces_of_part
from lm2.pipeline.data.prepare import prepare
from lm2.pipeline.data.sources import find_input_files, list_pieces, read_piece
from lm2.pipeline.data.tokenizer import Tokenizer
from tests.pipeline.data_fixtures import write_mixed_inputs
from tests.pipeline.test_data_prepare import expected_whole_rows, read_rows

WIDTH = 17  # row_length 16 + 1


def concat_rows(documents: list[list[int]], width: int, pad: int) -> list[list[int]]:
    stream = [token for document in documents for token in document]
    stream += [pad] * (-len(stream) % width)
    return [stream[i : i + width] for i in range(0, len(stream), width)]


def real_tokens(rows: np.ndarray, pad: int) -> list[int]:
    return [int(t) for t in rows.reshape(-1) if t != pad]


def test_parts_are_contiguous_runs_of_pieces_balanced_by_bytes(tmp_path):
    write_mixed_inputs(tmp_path / "in")
    pieces = list_pieces(find_input_files([tmp_path / "in"]))
    for count in (1, 2, 3, len(pieces)):
        parts = [pieces_of_part(pieces, Part(i, count)) for i in range(count)]
        assert [p for part in parts for p in part] == pieces  # every piece once, in order
        if count > 1:
            sizes = [sum(p.size for p in part) for part in parts]
            assert max(sizes) - min(sizes) <= 2 * max(p.size for p in pieces)
    with pytest.raises(DataError, match="part-00008-of-00009 gets no input: the 8 input piece"):
        pieces_of_part(pieces, Part(8, 9))


@pytest.mark.parametrize("packing", ["concat", "whole"])
def test_merged_parts_hold_the_single_process_documents_in_order(
    tmp_path, tokenizer_path, packing, monkeypatch, capsys
):
    write_mixed_inputs(tmp_path / "in")
    tokenizer = Tokenizer.load(tokenizer_path)
    single = prepare(
        [tmp_path / "in"], tmp_path / "single", tokenizer_path, row_length=16, packing=packing, progress=False
    )
    count = 3
    for index in range(count):
        if packing == "concat":
            prepare(
                [tmp_path / "in"],
                tmp_path / "dist",
                tokenizer_path,
                row_length=16,
                packing=packing,
                part=Part(index, count),
                shard_size_limit=1 << 12,
                progress=False,
            )
        else:  # the way an array job runs it: the part from SLURM's environment
            for key, value in (("ID", index), ("MIN", 0), ("MAX", count - 1), ("COUNT", count)):
                monkeypatch.setenv(f"SLURM_ARRAY_TASK_{key}", str(value))
            assert (
                main(
                    [
                        "data",
                        "prepare",
                        str(tmp_path / "in"),
                        "--tokenizer",
                        str(tokenizer_path),
                        "--row-length",
                        "16",
                        "--packing",
                        packing,
                        "--output",
                        str(tmp_path / "dist"),
                    ]
                )
                == 0
            )
            assert f"part-{index:05d}-of-00003" in capsys.readouterr().out
    assert main(["data", "merge", str(tmp_path / "dist")]) == 0
    merged = json.loads((tmp_path / "dist" / "lm2_data.json").read_text())

    # The documented order: part 0's rows, then part 1's, ...; each part packs its own documents.
    pieces = list_pieces(find_input_files([tmp_path / "in"]))
    expected, first_ids = [], []
    layout = expected_whole_rows if packing == "whole" else concat_rows
    for index in range(count):
        documents = [c.text for p in pieces_of_part(pieces, Part(index, count)) for c in read_piece(p)]
        part_rows = layout([t.tolist() for t in tokenizer.encode_documents(documents)], WIDTH, tokenizer.pad_id)
        first_ids += [index * (VAL_ID_OFFSET // count) + i for i in range(len(part_rows))]
        expected += part_rows
    rows, ids = read_rows(tmp_path / "dist" / "train")
    assert rows.tolist() == expected and ids.tolist() == first_ids

    # The same documents and tokens, in the same order, as one process writes; rows differ only at junctions.
    single_rows, _ = read_rows(tmp_path / "single" / "train")
    assert real_tokens(rows, tokenizer.pad_id) == real_tokens(single_rows, tokenizer.pad_id)
    counts, single_counts = merged["splits"]["train"], single["splits"]["train"]
    assert (counts["documents"], counts["tokens"]) == (single_counts["documents"], single_counts["tokens"])
    assert single_counts["rows"] <= counts["rows"] <= single_counts["rows"] + count - 1
    assert counts["rows"] == len(rows) and counts["padding"] == int((rows == tokenizer.pad_id).sum())
    assert merged["parts"] == count and merged["packing"] == packing and "part" not in merged


def test_a_merged_dataset_with_val_is_read_by_the_loader(tmp_path, tokenizer_path):
    from lm2.pipeline.data.config import DataConfig, StreamConfig
    from lm2.pipeline.data.streaming import build_train_loader
    from lm2.pipeline.parallel.dims import ParallelDims
    from tests.pipeline.data_fixtures import tiny_model_config

    write_mixed_inputs(tmp_path / "in")
    parts = [
        prepare(
            [tmp_path / "in"],
            tmp_path / "dist",
            tokenizer_path,
            row_length=16,
            val_fraction=0.25,
            part=Part(i, 2),
            shard_size_limit=1 << 12,
            progress=False,
        )
        for i in range(2)
    ]
    merged = merge(tmp_path / "dist")
    for split in ("train", "val"):
        rows, ids = read_rows(tmp_path / "dist" / split)
        assert len(rows) == merged["splits"][split]["rows"] == sum(p["splits"][split]["rows"] for p in parts)
        assert len(set(ids.tolist())) == len(ids) and (ids >= VAL_ID_OFFSET).all() == (split == "val")
    loader = build_train_loader(
        DataConfig(streams=[StreamConfig(str(tmp_path / "dist"))]), ParallelDims(1), 0, 4, tiny_model_config()
    )
    read = [i for batch in loader for i in batch["id"].tolist()]
    _, ids = read_rows(tmp_path / "dist" / "train")
    assert len(read) == len(set(read)) == len(ids) // 4 * 4 and set(read) <= set(ids.tolist())


def test_a_part_too_small_for_a_val_document_merges_and_the_total_is_checked(tmp_path, tokenizer_path):
    """Every 4th document of a part goes to val (counted within the part): a one-document part has none."""

    def prepare_parts(inputs, output):
        return [
            prepare([inputs], output, tokenizer_path, row_length=16, val_fraction=0.25, part=Part(i, 2), progress=False)
            for i in range(2)
        ]

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(
        "".join(json.dumps({"text": f"Document {i} of many."}) + "\n" for i in range(8))
    )
    (tmp_path / "in" / "b.txt").write_text("The only document of the small file.\n")
    parts = prepare_parts(tmp_path / "in", tmp_path / "dist")
    assert [p["splits"]["val"]["documents"] for p in parts] == [2, 0]
    merged = merge(tmp_path / "dist")
    assert merged["splits"]["val"]["documents"] == 2 and merged["splits"]["train"]["documents"] == 7
    rows, _ = read_rows(tmp_path / "dist" / "val")
    assert len(rows) == merged["splits"]["val"]["rows"] == parts[0]["splits"]["val"]["rows"] > 0

    (tmp_path / "in" / "a.jsonl").unlink()
    (tmp_path / "in" / "c.txt").write_text("Another single document.\n")
    prepare_parts(tmp_path / "in", tmp_path / "none")
    with pytest.raises(DataError, match="--val-fraction 0.25 selects no document in any of the 2 parts"):
        merge(tmp_path / "none")


def test_incomplete_or_disagreeing_parts_are_not_merged(tmp_path, tokenizer_path, text_inputs):
    def part(index: int, count: int = 2, **options) -> dict:
        return prepare(
            [text_inputs],
            tmp_path / "dist",
            tokenizer_path,
            row_length=16,
            part=Part(index, count),
            progress=False,
            **options,
        )

    with pytest.raises(DataError, match="holds no finished part"):
        merge(tmp_path / "dist")
    part(0)
    with pytest.raises(DataError, match="parts 1 of 2 are not finished .* --num-shards 2 --shard-index i"):
        merge(tmp_path / "dist")
    with pytest.raises(DataError, match="part-00000-of-00002 is already prepared"):
        part(0)
    (tmp_path / "dist" / "train" / "part-00001-of-00002").mkdir()  # an interrupted run's leftover
    part(1, packing="whole")
    with pytest.raises(DataError, match="part-00001-of-00002.json differs from part-00000-of-00002.json in packing"):
        merge(tmp_path / "dist")
    (tmp_path / "dist" / "parts" / "part-00001-of-00002.json").unlink()
    shutil.rmtree(tmp_path / "dist" / "train" / "part-00001-of-00002")
    part(1)
    assert merge(tmp_path / "dist")["splits"]["train"]["documents"] == sum(1 for _ in read_piece_all(text_inputs))
    with pytest.raises(DataError, match="already a complete dataset"):
        merge(tmp_path / "dist")
    with pytest.raises(DataError, match="gets no input: the 2 input piece"):
        part(0, count=3)
    with pytest.raises(DataError, match="--shard-index must be in \\[0, --num-shards\\)"):
        Part(3, 3)


def read_piece_all(inputs):
    return (d for p in list_pieces(find_input_files([inputs])) for d in read_piece(p))
