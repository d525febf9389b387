"""The sentencepiece wrapper and the embedded corpus."""

import gzip
import hashlib
import re
from pathlib import Path

import pytest

from lm2.model.errors import DataError
from lm2.pipeline.data.sources import find_input_files, read_all
from lm2.pipeline.data.tokenizer import Tokenizer, train_tokenizer
from lm2.pipeline.files import sha256_file
from tests.pipeline.data_fixtures import CORPUS


def test_trained_tokenizer_round_trips_and_records_ids(tokenizer_path):
    tokenizer = Tokenizer.load(tokenizer_path)
    text = "Fair is foul,\n\n  and foul is fair: 1234 é 😀"
    assert tokenizer.decode(tokenizer.encode(text)) == text  # identity normalization + byte fallback
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (512, 1, 2, 3)
    assert tokenizer.checksum == hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest()
    assert tokenizer.describe()["sha256"] == tokenizer.checksum


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_both_model_types_train(text_inputs, tmp_path, model_type):
    tokenizer = train_tokenizer(read_all(find_input_files([text_inputs])), tmp_path / "t.model", 400, model_type)
    assert tokenizer.vocab_size == 400 and not list(tmp_path.glob(".*tmp*"))


def test_vocabulary_too_large_for_the_text_is_a_clear_error(text_inputs, tmp_path):
    with pytest.raises(DataError, match="Lower --vocab-size"):
        train_tokenizer(read_all(find_input_files([text_inputs])), tmp_path / "t.model", 200_000)
    assert not (tmp_path / "t.model").exists()


def test_empty_inputs_are_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="no documents"):
        train_tokenizer(read_all(find_input_files([tmp_path])), tmp_path / "t.model", 400)


def test_loading_a_non_model_fails_clearly(tmp_path):
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a sentencepiece model"):
        Tokenizer.load(tmp_path / "bad.model")
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.model")


def test_embedded_corpus_matches_its_sources_md():
    table = dict(re.findall(r"\| (\S+\.txt\.gz) \| \d+ \| ([0-9a-f]{64}) \|", (CORPUS / "SOURCES.md").read_text()))
    files = sorted(p.name for p in CORPUS.glob("*.txt.gz"))
    assert sorted(table) == files and sum(p.stat().st_size for p in CORPUS.glob("*.gz")) < 2_000_000
    for name, digest in table.items():
        assert hashlib.sha256(gzip.decompress((CORPUS / name).read_bytes())).hexdigest() == digest
    assert sha256_file(CORPUS / "SOURCES.md")  # readable


def test_an_existing_tokenizer_is_replaced_only_with_force(text_inputs, tmp_path, capsys):
    from lm2.pipeline.cli import main

    model = tmp_path / "t.model"
    model.write_bytes(b"the tokenizer a dataset was prepared with")
    command = ["data", "tokenizer", str(text_inputs), "--output", str(model), "--vocab-size", "400"]
    assert main(command) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"lm2 data: data error: {model} exists:") and "--force" in line
    assert model.read_bytes() == b"the tokenizer a dataset was prepared with"
    assert main([*command, "--force"]) == 0 and Tokenizer.load(model).vocab_size == 400
