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
    documents = read_piece(piece)
    assert [next(documents) for _ in range(3)] == texts[:3]
    with pytest.raises(DataError, match="docs.jsonl.zst: cannot read"):
        list(documents)
    path.write_bytes(good)
    assert list(read_piece(piece)) == texts


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
