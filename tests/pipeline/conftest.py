import pytest

from tests.pipeline.data_fixtures import write_inputs
from tests.pipeline.eval_fixtures import lm2_folder, vanilla_folder


@pytest.fixture(scope="session")
def text_inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="session")
def tokenizer_path(text_inputs, tmp_path_factory):
    from lm2.pipeline.data.sources import find_input_files, read_all
    from lm2.pipeline.data.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tokenizer") / "tok.model"
    train_tokenizer(read_all(find_input_files([text_inputs])), path, vocab_size=512)
    return path


@pytest.fixture(scope="session")
def prepared(text_inputs, tokenizer_path, tmp_path_factory):
    """A dataset of 16-token rows in several shards, with a val split."""
    from lm2.pipeline.data.prepare import prepare

    output = tmp_path_factory.mktemp("prepared") / "shards"
    prepare(
        [text_inputs],
        output,
        tokenizer_path,
        row_length=16,
        val_fraction=0.25,
        shard_size_limit=1 << 12,
        progress=False,
    )
    return output


@pytest.fixture(scope="session")
def train_data(text_inputs, tmp_path_factory):
    """Tokenizer and dataset fitting tests/pipeline/tiny_train.yaml (vocabulary 400, rows of 32), as overrides."""
    from lm2.pipeline.data.prepare import prepare
    from lm2.pipeline.data.sources import find_input_files, read_all
    from lm2.pipeline.data.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("train_data")
    tokenizer = folder / "tok.model"
    train_tokenizer(read_all(find_input_files([text_inputs])), tokenizer, vocab_size=400)
    prepare([text_inputs], folder / "data", tokenizer, row_length=32, val_fraction=0.25, progress=False)
    return [f"data.streams=[{{path: {folder / 'data'}}}]", f"data.tokenizer={tokenizer}"]


@pytest.fixture(scope="session")
def train_documents(text_inputs, train_data, tmp_path_factory):
    """train_data's inputs and tokenizer prepared with --packing document, for train.carry.mode: document, as
    overrides."""
    from lm2.pipeline.data.prepare import prepare

    tokenizer = next(item.split("=", 1)[1] for item in train_data if item.startswith("data.tokenizer="))
    folder = tmp_path_factory.mktemp("train_documents")
    prepare(
        [text_inputs], folder / "data", tokenizer, row_length=32, val_fraction=0.25, packing="document", progress=False
    )
    return [f"data.streams=[{{path: {folder / 'data'}}}]", f"data.tokenizer={tokenizer}", "train.carry.mode=document"]


@pytest.fixture(scope="module")
def hf_lm2(tokenizer_path, tmp_path_factory):
    """A random LM2 Hugging Face folder (tests/pipeline/eval_fixtures.py)."""
    return lm2_folder(tokenizer_path, tmp_path_factory.mktemp("hf_lm2") / "lm2")


@pytest.fixture(scope="module")
def hf_vanilla(tokenizer_path, tmp_path_factory):
    """A random vanilla Llama Hugging Face folder holding 64 tokens."""
    return vanilla_folder(tokenizer_path, tmp_path_factory.mktemp("hf_vanilla") / "vanilla")
