"""lm2 data prepare: packing, determinism, split, metadata and every bad input."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from lm2.model.errors import DataError
from lm2.pipeline.cli import main
from lm2.pipeline.data.metadata import VAL_ID_OFFSET
from lm2.pipeline.data.prepare import is_validation, prepare
from lm2.pipeline.data.sources import find_input_files, read_all
from lm2.pipeline.data.tokenizer import Tokenizer
from tests.pipeline.data_fixtures import tiny_model_config


def read_rows(split_folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """All rows of a split in write order, read with streaming's own reader (no shuffling)."""
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    index = json.loads((split_folder / "index.json").read_text())
    tokens, ids = [], []
    raw_folder = Path(tempfile.mkdtemp())
    for shard_info in index["shards"]:
        zipped = (split_folder / shard_info["zip_data"]["basename"]).read_bytes()
        raw = raw_folder / shard_info["raw_data"]["basename"]  # merged parts: part-*/shard.*.mds
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_bytes(decompress("zstd", zipped))
        shard = reader_from_json(str(raw_folder), None, shard_info)
        shard.validate(allow_unsafe_types=False)
        for i in range(shard.samples):
            sample = shard[i]
            tokens.append(sample["tokens"])
            ids.append(sample["id"])
    return np.stack(tokens), np.array(ids)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rows_are_the_documents_with_eos_packed_in_order(prepared, text_inputs, tokenizer_path):
    tokenizer = Tokenizer.load(tokenizer_path)
    documents = list(read_all(find_input_files([text_inputs])))
    metadata = json.loads((prepared / "lm2_data.json").read_text())
    for split, first_id in (("train", 0), ("val", VAL_ID_OFFSET)):
        chosen = [d for i, d in enumerate(documents) if is_validation(i, 0.25) == (split == "val")]
        expected = np.concatenate(tokenizer.encode_documents(chosen))
        rows, ids = read_rows(prepared / split)
        counts = metadata["splits"][split]
        assert rows.shape == (counts["rows"], 17) and rows.dtype == np.uint16
        assert counts["documents"] == len(chosen) and counts["tokens"] == len(expected)
        assert counts["rows"] * 17 == counts["tokens"] + counts["padding"] and counts["padding"] < 17
        flat = rows.reshape(-1)
        assert np.array_equal(flat[: len(expected)], expected)
        assert (flat[len(expected) :] == tokenizer.pad_id).all()
        assert np.array_equal(ids, first_id + np.arange(len(ids)))
    assert metadata["row_length"] == 16 and metadata["tokenizer"]["sha256"] == tokenizer.checksum
    assert len(list((prepared / "train").glob("*.mds.zstd"))) > 1


def expected_whole_rows(documents: list[list[int]], width: int, pad: int) -> list[list[int]]:
    """The "whole" layout written out plainly: rows as lists, a short document that does not fit the current
    row closes it with PAD, long documents run on across rows."""
    rows, row = [], []
    for document in documents:
        if len(document) <= width and len(row) + len(document) > width:
            rows.append(row + [pad] * (width - len(row)))
            row = []
        for token in document:
            row.append(token)
            if len(row) == width:
                rows.append(row)
                row = []
    if row:
        rows.append(row + [pad] * (width - len(row)))
    return rows


def test_whole_packing_keeps_short_documents_in_one_row(tmp_path, tokenizer_path):
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat while john went to the kitchen and mary took the apple".split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 30)))) for _ in range(300)]
    inputs = write(tmp_path / "in", "docs.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
    metadata = prepare([inputs], tmp_path / "out", tokenizer_path, row_length=16, packing="whole", progress=False)
    tokenizer = Tokenizer.load(tokenizer_path)
    documents = [d.tolist() for d in tokenizer.encode_documents(texts)]
    assert any(len(d) > 17 for d in documents) and any(len(d) <= 17 for d in documents)
    expected = expected_whole_rows(documents, 17, tokenizer.pad_id)
    rows, _ = read_rows(tmp_path / "out" / "train")
    assert rows.tolist() == expected
    counts = metadata["splits"]["train"]
    assert counts["padding"] == int((rows == tokenizer.pad_id).sum()) > 17  # more than the last row's fill
    assert counts["tokens"] == sum(map(len, documents)) and metadata["packing"] == "whole"
    with pytest.raises(DataError, match="--packing must be one of concat, whole"):
        prepare([inputs], tmp_path / "bad", tokenizer_path, row_length=16, packing="best-fit", progress=False)


def test_validation_documents_are_spread_evenly():
    chosen = [i for i in range(20) if is_validation(i, 0.25)]
    assert chosen == [3, 7, 11, 15, 19]
    assert not any(is_validation(i, 0.0) for i in range(20))


def test_same_inputs_give_byte_identical_shards(text_inputs, tokenizer_path, tmp_path):
    one = prepare(
        [text_inputs],
        tmp_path / "one",
        tokenizer_path,
        row_length=16,
        workers=1,
        progress=False,
        shard_size_limit=1 << 12,
    )
    two = prepare(
        [text_inputs],
        tmp_path / "two",
        tokenizer_path,
        row_length=16,
        workers=2,
        progress=False,
        shard_size_limit=1 << 12,
    )
    assert one == two
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "two")


def test_the_prepared_folder_gets_the_mode_of_any_new_folder(text_inputs, tokenizer_path, tmp_path):
    """The umask's mode, as mkdir gives it: a staging folder made 0700 (tempfile.mkdtemp) and renamed into place
    would keep a shared cluster's other users out of the dataset."""
    prepare([text_inputs], tmp_path / "out", tokenizer_path, row_length=16, progress=False)
    (tmp_path / "probe").mkdir()
    mode = (tmp_path / "probe").stat().st_mode & 0o777
    assert {
        oct(path.stat().st_mode & 0o777) for path in [tmp_path / "out", *(tmp_path / "out").rglob("*")] if path.is_dir()
    } == {oct(mode)}


def test_model_config_sets_row_length_and_bounds_the_vocabulary(text_inputs, tokenizer_path, tmp_path):
    metadata = prepare(
        [text_inputs], tmp_path / "ok", tokenizer_path, model=tiny_model_config(row_length=32), progress=False
    )
    assert metadata["row_length"] == 32
    with pytest.raises(DataError, match="model.vocab_size is 256"):
        prepare(
            [text_inputs], tmp_path / "small", tokenizer_path, model=tiny_model_config(vocab_size=256), progress=False
        )
    with pytest.raises(DataError, match="differs from model.row_length"):
        prepare(
            [text_inputs],
            tmp_path / "mismatch",
            tokenizer_path,
            row_length=8,
            model=tiny_model_config(),
            progress=False,
        )
    assert not (tmp_path / "small").exists() and not (tmp_path / "mismatch").exists()


def write(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("latin1.txt", "caf\u00e9".encode("latin-1"), "not valid UTF-8"),
        ("docs.jsonl", b'{"body": "x"}\n', "no string field 'text'"),
        ("docs.jsonl", b'{"text": "ok"}\nnot json\n', "line 2: not JSON"),
        ("broken.txt.gz", b"\x1f\x8b not gzip", "cannot read"),
        ("empty.txt", b"   \n\n", "no documents"),
    ],
)
def test_bad_inputs_fail_clearly_and_leave_nothing(tmp_path, tokenizer_path, name, data, message):
    inputs = write(tmp_path / "in", name, data)
    with pytest.raises(DataError, match=message):
        prepare([inputs], tmp_path / "out", tokenizer_path, row_length=16, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no output, no temporary folder


def test_missing_inputs_and_existing_output_are_refused(tmp_path, tokenizer_path, text_inputs):
    with pytest.raises(DataError, match="does not exist"):
        prepare([tmp_path / "nothere"], tmp_path / "out", tokenizer_path, row_length=16, progress=False)
    with pytest.raises(DataError, match="no inputs"):
        prepare([write(tmp_path / "other", "notes.md", b"x")], tmp_path / "out", tokenizer_path, row_length=16)
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match="already exists"):
        prepare([text_inputs], tmp_path / "out", tokenizer_path, row_length=16, progress=False)
    with pytest.raises(DataError, match="selects none"):
        prepare(
            [write(tmp_path / "one", "a.txt", b"one doc")],
            tmp_path / "o2",
            tokenizer_path,
            row_length=16,
            val_fraction=0.3,
            progress=False,
        )
    assert not (tmp_path / "o2").exists()


def test_cli_prepares_and_reports_errors_without_traceback(tmp_path, tokenizer_path, text_inputs, capsys):
    config = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    assert (
        main(
            [
                "data",
                "prepare",
                str(text_inputs),
                "--tokenizer",
                str(tokenizer_path),
                "--config",
                str(config),
                "--output",
                str(tmp_path / "shards"),
                "--workers",
                "2",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "shards" / "lm2_data.json").read_text())["row_length"] == 256
    assert (
        main(
            [
                "data",
                "prepare",
                str(tmp_path / "missing"),
                "--tokenizer",
                str(tokenizer_path),
                "--row-length",
                "8",
                "--output",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    error = capsys.readouterr().err
    assert "data error: input" in error and "Traceback" not in error
    assert main(["data", "tokenizer", str(text_inputs), "--output", str(tmp_path / "t.model")]) == 2
    assert "--vocab-size" in capsys.readouterr().err
