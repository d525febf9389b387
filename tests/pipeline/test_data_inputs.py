"""Input kinds of `lm2 data prepare`: zstd JSON lines and text, parquet by row group, saved Hugging Face datasets."""

import json

import numpy as np
import pytest
import zstandard

from lm2.model.errors import DataError
from lm2.pipeline.data.prepare import prepare
from lm2.pipeline.data.sources import find_input_files, list_pieces, read_all, read_piece
from lm2.pipeline.data.tokenizer import Tokenizer
from tests.pipeline.data_fixtures import (
    scene_texts,
    write_mixed_inputs,
    write_parquet,
    write_saved_dataset,
    write_zst_jsonl,
)
from tests.pipeline.test_data_prepare import read_rows


def test_every_input_kind_is_read_in_path_order_and_prepared(tmp_path, tokenizer_path):
    documents = write_mixed_inputs(tmp_path / "in")
    files = find_input_files([tmp_path / "in"])
    assert [f.name for f in files] == ["a.jsonl.zst", "b.parquet", "c_saved", "d.txt.zst", "e.jsonl"]
    pieces = list_pieces(files)
    assert [(p.path.name, p.part) for p in pieces] == [
        ("a.jsonl.zst", None),
        ("b.parquet", 0),
        ("b.parquet", 1),
        ("b.parquet", 2),
        ("c_saved", 0),
        ("c_saved", 1),
        ("d.txt.zst", None),
        ("e.jsonl", None),
    ]
    assert list(read_all(files)) == documents  # the parquet null is skipped
    metadata = prepare([tmp_path / "in"], tmp_path / "out", tokenizer_path, row_length=16, workers=2, progress=False)
    expected = np.concatenate(Tokenizer.load(tokenizer_path).encode_documents(documents))
    rows, _ = read_rows(tmp_path / "out" / "train")
    assert np.array_equal(rows.reshape(-1)[: len(expected)], expected)
    assert metadata["splits"]["train"]["documents"] == len(documents)


def test_compressed_json_lines_are_streamed_not_read_whole(tmp_path):
    """Documents come out before a damaged tail of the file is reached; reaching it is a clear error."""
    texts = scene_texts() * 5  # a few hundred KB: far more than one read of the decompressor
    path = tmp_path / "docs.jsonl.zst"
    write_zst_jsonl(path, texts, frames=1)
    good = path.read_bytes()
    path.write_bytes(
        zstandard.ZstdCompressor().compress(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in texts))
        + b"\x28\xb5\x2f\xfd garbage" * 1000
    )
    (piece,) = list_pieces([path])
    documents = (chunk.text for chunk in read_piece(piece))
    assert [next(documents) for _ in range(3)] == texts[:3]
    with pytest.raises(DataError, match="docs.jsonl.zst: cannot read"):
        list(documents)
    path.write_bytes(good)
    assert [chunk.text for chunk in read_piece(piece)] == texts


def test_text_field_selects_the_parquet_and_dataset_column(tmp_path):
    texts = scene_texts()[:10]
    write_parquet(tmp_path / "p.parquet", texts, row_group_size=4, column="body")
    write_saved_dataset(tmp_path / "saved", texts, num_shards=1)
    assert list(read_all(find_input_files([tmp_path / "p.parquet"]), "body")) == texts
    with pytest.raises(DataError, match="no column 'text' \\(it has body, n\\); set the text field"):
        list(read_all(find_input_files([tmp_path / "p.parquet"])))
    with pytest.raises(DataError, match="column 'n' holds int64, not strings"):
        list(read_all(find_input_files([tmp_path / "saved"]), "n"))


def test_bad_inputs_of_the_new_kinds_fail_clearly(tmp_path, tokenizer_path):
    from datasets import Dataset, DatasetDict

    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="bad.parquet: not a readable parquet file"):
        prepare([tmp_path / "bad.parquet"], tmp_path / "out", tokenizer_path, row_length=16, progress=False)
    (tmp_path / "bad.txt.zst").write_bytes(b"not zstd")
    with pytest.raises(DataError, match="bad.txt.zst: cannot read"):
        prepare([tmp_path / "bad.txt.zst"], tmp_path / "out", tokenizer_path, row_length=16, progress=False)
    DatasetDict({"train": Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match="saved DatasetDict: give the folder of one split, e.g. .*dict/train"):
        find_input_files([tmp_path / "dict"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet", "bad.txt.zst", "dict"]


def test_a_long_text_is_streamed_in_chunks_that_keep_the_tokens_of_the_whole_text(
    tmp_path, tokenizer_path, monkeypatch
):
    """Chunks of 300 characters read 64 bytes at a time (a character of 2 or 4 bytes split between reads), cut at
    line ends and, in a line longer than a chunk, before a word: the rows are those of the whole text encoded at
    once, packed with whole documents too."""
    from lm2.pipeline.data import sources

    monkeypatch.setattr(sources, "CHUNK_CHARS", 300)
    monkeypatch.setattr(sources, "_READ_BYTES", 64)
    long_line = " ".join(f"wörd{i}😀" for i in range(400))  # no newline for ~4000 characters
    text = "\n".join(scene_texts()[:30]) + "\n" + long_line + "\n\n  The end.\n"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "book.txt").write_text(text)
    (tmp_path / "in" / "notes.jsonl").write_text(json.dumps({"text": "A short one."}) + "\n")
    (piece, _) = list_pieces(find_input_files([tmp_path / "in"]))
    chunks = list(read_piece(piece))
    assert len(chunks) > 20 and "".join(c.text for c in chunks) == text
    assert [(c.first, c.last) for c in (chunks[0], chunks[1], chunks[-1])] == [
        (True, False),
        (False, False),
        (False, True),
    ]
    assert all(len(c.text) <= 300 for c in chunks) and any(c.text.startswith(" wörd") for c in chunks)
    tokenizer = Tokenizer.load(tokenizer_path)
    expected = np.concatenate(tokenizer.encode_documents([text, "A short one."]))
    for packing in ("concat", "whole"):
        out = tmp_path / packing
        metadata = prepare([tmp_path / "in"], out, tokenizer_path, row_length=16, packing=packing, progress=False)
        rows, _ = read_rows(out / "train")
        flat = rows.reshape(-1)
        assert metadata["splits"]["train"]["documents"] == 2
        assert np.array_equal(flat[flat != tokenizer.pad_id], expected[expected != tokenizer.pad_id]), packing


def test_a_100_mb_single_line_is_read_in_bounded_memory(tmp_path):
    import tracemalloc

    from lm2.pipeline.data.sources import CHUNK_CHARS

    path = tmp_path / "line.txt"
    word = b"memory " * 1024
    with open(path, "wb") as handle:
        for _ in range(100 * 2**20 // len(word)):
            handle.write(word)
    (piece,) = list_pieces([path])
    tracemalloc.start()
    total, count = 0, 0
    try:
        for chunk in read_piece(piece):
            total += len(chunk.text)
            count += 1
            assert chunk.last or chunk.text.endswith("memory")  # cut before a word, never inside one
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == path.stat().st_size >= 100 * 10**6 and count >= total // CHUNK_CHARS
    assert peak < 6 * CHUNK_CHARS, f"{peak / 2**20:.0f} MiB held for a 100 MiB line"  # a few chunks, not the file


def test_an_empty_input_is_skipped_with_a_warning_and_alone_is_one_clear_error(tmp_path, tokenizer_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.txt").write_bytes(b"")
    (tmp_path / "in" / "book.txt").write_text("Some text.\n")
    with pytest.warns(UserWarning, match=r"skipping .*empty.txt: it is empty \(0 bytes\)"):
        metadata = prepare([tmp_path / "in"], tmp_path / "out", tokenizer_path, row_length=16, progress=False)
    assert metadata["splits"]["train"]["documents"] == 1
    with pytest.warns(UserWarning, match="empty.txt"), pytest.raises(DataError, match="no documents in 0 input piece"):
        prepare([tmp_path / "in" / "empty.txt"], tmp_path / "none", tokenizer_path, row_length=16, progress=False)
    assert not (tmp_path / "none").exists()


def test_non_utf8_input_names_the_file_and_the_byte(tmp_path, tokenizer_path):
    """Also past the first read of a text, and in a JSON line: one line naming the file, the byte and the fix."""
    from tests.distributed import lm2_cli

    text = ("x" * (3 * 2**20 + 5)).encode() + "café".encode("latin-1") + b"\n"
    (tmp_path / "latin1.txt").write_bytes(text)
    with pytest.raises(DataError, match=rf"latin1.txt: byte {3 * 2**20 + 8} is not valid UTF-8 .*iconv"):
        list(read_all([tmp_path / "latin1.txt"]))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl line 2: byte 13 is not valid UTF-8"):
        list(read_all([tmp_path / "latin1.jsonl"]))
    result = lm2_cli(
        [
            "data",
            "prepare",
            str(tmp_path / "latin1.txt"),
            "--tokenizer",
            str(tokenizer_path),
            "--row-length",
            "16",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("lm2 data:")]
    assert result.returncode == 2 and len(errors) == 1 and "is not valid UTF-8" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
