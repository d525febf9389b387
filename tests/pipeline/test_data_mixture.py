"""data.streams with proportions on 2 real gloo ranks: the share of rows from each stream matches the proportions,
a resume keeps the mixture exactly, and a stream that does not fit the run is refused by name."""

import json
from collections import Counter
from itertools import islice
from math import sqrt
from pathlib import Path

import pytest

from lm2.model.errors import DataError
from lm2.pipeline.data.config import DataConfig, StreamConfig
from lm2.pipeline.data.prepare import prepare
from tests.distributed import run_distributed
from tests.pipeline.data_fixtures import scene_texts, tiny_model_config, write_zst_jsonl
from tests.pipeline.test_data_prepare import read_rows

PROPORTIONS = (0.7, 0.3)


def _read_mixture(paths: list[str], out: str) -> None:
    """One launch reads: the whole epoch; its first 5 micro-batches; the rest after resuming from their state."""
    import torch.distributed as dist

    from lm2.pipeline.data.streaming import build_train_loader
    from lm2.pipeline.parallel.init import init_distributed

    dims = init_distributed()
    cfg = DataConfig(streams=[StreamConfig(p, proportion=w) for p, w in zip(paths, PROPORTIONS)])

    def read(batches: int | None = None, state: dict | None = None) -> dict:
        loader = build_train_loader(cfg, dims, dist.get_rank(), 4, tiny_model_config())
        if state:
            loader.load_state_dict(state)
        rows = [
            [i, t[:8]]
            for batch in islice(loader, batches)
            for i, t in zip(batch["id"].tolist(), batch["input_ids"].tolist())
        ]
        return {"rows": rows, "state": loader.state_dict()}

    whole = read()
    first = read(batches=5)
    rest = read(state=first["state"])  # a fresh loader, as a restarted job builds it
    record = {"whole": whole, "first": first, "rest": rest}
    Path(out, f"mixture-{dist.get_rank()}.json").write_text(json.dumps(record))


def _run(paths, tmp_path) -> dict[str, list[dict]]:
    """{"whole" | "first" | "rest": [rank 0's record, rank 1's record]}."""
    run_distributed(_read_mixture, 2, ([str(p) for p in paths], str(tmp_path)))
    ranks = [json.loads((tmp_path / f"mixture-{rank}.json").read_text()) for rank in range(2)]
    return {part: [r[part] for r in ranks] for part in ranks[0]}


@pytest.fixture(scope="module")
def two_streams(tokenizer_path, tmp_path_factory):
    """Two small datasets of different documents (a few hundred rows each: 2-rank epochs stay short)."""
    folder = tmp_path_factory.mktemp("mixture")
    texts = scene_texts()
    for name, part in (("first", texts[:60]), ("second", texts[60:110])):
        write_zst_jsonl(folder / f"{name}.jsonl.zst", part)
        prepare(
            [folder / f"{name}.jsonl.zst"],
            folder / name,
            tokenizer_path,
            row_length=16,
            shard_size_limit=1 << 12,
            progress=False,
        )
    return [folder / "first", folder / "second"]


def test_rows_are_drawn_in_proportion_and_a_resume_keeps_the_mixture(two_streams, tmp_path):
    # Which stream a row came from: its id and first tokens name it in exactly one stream.
    owner = {}
    for stream, path in enumerate(two_streams):
        rows, ids = read_rows(path / "train")
        for id_, row in zip(ids.tolist(), rows.tolist()):
            owner.setdefault((id_, tuple(row[:8])), set()).add(stream)
    assert all(len(streams) == 1 for streams in owner.values())

    def streams_of(records) -> list[int]:
        return [next(iter(owner[(i, tuple(t))])) for record in records for i, t in record["rows"]]

    runs = _run(two_streams, tmp_path)
    whole, first, rest = runs["whole"], runs["first"], runs["rest"]
    drawn = Counter(streams_of(whole))
    epoch = sum(len(r) for r in (read_rows(p / "train")[1] for p in two_streams))
    read = sum(drawn.values())
    assert epoch - 8 < read <= epoch  # the whole epoch, but for the last partial global batch of 2 x 4
    for stream, proportion in enumerate(PROPORTIONS):
        # streaming draws floor(epoch * p) rows (+1 for rounding) per epoch; the partial tail batch removes < 8.
        assert abs(drawn[stream] - epoch * proportion) <= 1 + (epoch - read)
    # Any prefix of the shuffled epoch is a draw without replacement: hypergeometric, 4 standard deviations.
    order = [s for pair in zip(*(streams_of([r]) for r in whole)) for s in pair]
    for n in (len(order) // 8, len(order) // 2):
        share = sum(s == 0 for s in order[:n]) / n
        sigma = sqrt(PROPORTIONS[0] * PROPORTIONS[1] / n * (epoch - n) / (epoch - 1))
        assert abs(share - PROPORTIONS[0]) < 4 * sigma, (n, share, sigma)

    assert first[0]["state"] == first[1]["state"] and first[0]["state"]["sample_in_epoch"] == 5 * 2 * 4
    resumed = Counter((i, tuple(t)) for r in first + rest for i, t in r["rows"])
    uninterrupted = Counter((i, tuple(t)) for r in whole for i, t in r["rows"])
    assert resumed == uninterrupted  # the same rows of the same streams, as often
    assert Counter(streams_of(first + rest)) == drawn


def test_a_stream_that_does_not_fit_the_run_is_refused_by_name(two_streams, text_inputs, tokenizer_path, tmp_path):
    from lm2.pipeline.data.sources import find_input_files, read_all
    from lm2.pipeline.data.streaming import build_train_loader
    from lm2.pipeline.data.tokenizer import train_tokenizer
    from lm2.pipeline.parallel.dims import ParallelDims

    other_tokenizer = train_tokenizer(read_all(find_input_files([text_inputs])), tmp_path / "other.model", 400)
    odd = {
        "rows": prepare([text_inputs], tmp_path / "rows32", tokenizer_path, row_length=32, progress=False),
        "tokenizer": prepare(
            [text_inputs], tmp_path / "tokenizer", other_tokenizer.path, row_length=16, progress=False
        ),
    }
    good = str(two_streams[0])
    assert two_streams[0].parent == two_streams[1].parent

    def build(second: Path, model=None, **data) -> None:
        streams = [StreamConfig(good, proportion=0.5), StreamConfig(str(second), proportion=0.5)]
        build_train_loader(DataConfig(streams=streams, **data), ParallelDims(1), 0, 4, model or tiny_model_config())

    assert odd["rows"] and odd["tokenizer"]
    with pytest.raises(DataError, match=f"{tmp_path / 'rows32'} holds rows of 32 tokens but model.row_length is 16"):
        build(tmp_path / "rows32")
    with pytest.raises(DataError, match=f"{tmp_path / 'tokenizer'} was tokenized with other.model"):
        build(tmp_path / "tokenizer")  # no data.tokenizer: the first stream's is the run's
    with pytest.raises(DataError, match=f"{good} was tokenized with tok.model .* not with the run's"):
        build(two_streams[1], tokenizer=str(other_tokenizer.path))
    with pytest.raises(DataError, match=f"the tokenizer of {good} has 512 pieces but model.vocab_size is 400"):
        build(two_streams[1], model=tiny_model_config(vocab_size=400))
