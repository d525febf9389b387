"""Document lanes (data/lanes.py) and the data they read: `--packing document` rows tile each document, one row
per lane and step in document order, replicas read disjoint documents, every row once per epoch, also across a
resume and a --reset-memory resume at another layout; `--answer-field` puts the loss on the answers only."""

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from lm2.model.errors import CheckpointError
from lm2.model.lm import IGNORE_INDEX
from lm2.pipeline.data.lanes import LaneLoader
from lm2.pipeline.data.packing import DocumentPacker, rows_of_document

WIDTH, PAD = 5, 0


def synthetic(lengths: list[int]) -> tuple[np.ndarray, dict[int, tuple[int, int]]]:
    """Rows per document, and sample index -> (document, position): the rows of documents in order."""
    table = np.array(lengths)
    where = {}
    for document, rows in enumerate(lengths):
        for position in range(rows):
            where[len(where)] = (document, position)
    return table, where


def loader(table, where, dp=1, dp_rank=0, micro_batch=2, grad_accum=2, seed=7) -> LaneLoader:
    def read_row(index: int) -> dict:
        document, position = where[index]
        return {"tokens": np.full(WIDTH, 100 * document + position + 1), "id": index}

    first = np.cumsum(table) - table
    return LaneLoader(read_row, table, first, dp, dp_rank, micro_batch, grad_accum, True, seed, PAD, WIDTH)


def read_steps(lanes: LaneLoader, steps: int | None = None) -> list[list[tuple[int, int, int, bool]]]:
    """Per step: (lane, document, position, fresh) of every real row; None steps: to the epoch's end."""
    out, iterator = [], iter(lanes)
    while steps is None or len(out) < steps:
        rows = []
        try:
            for _ in range(lanes.grad_accum):
                batch = next(iterator)
                for token, (lane, fresh) in zip(batch["input_ids"][:, 0].tolist(), batch["carry"].tolist()):
                    if token != PAD:
                        rows.append((lane, (token - 1) // 100, (token - 1) % 100, bool(fresh)))
        except StopIteration:
            break
        out.append(rows)
    return out


def check_lanes(steps, table) -> dict[int, list[int]]:
    """Every lane reads one document's rows in order, fresh exactly at a document's first row it reads; returns
    document -> the positions read."""
    current: dict[int, tuple[int, int]] = {}
    read = defaultdict(list)
    for rows in steps:
        for lane, document, position, fresh in rows:
            if fresh:
                assert lane not in current or current[lane][1] == table[current[lane][0]] - 1
            else:
                assert current[lane] == (document, position - 1), (lane, document, position)
            current[lane] = (document, position)
            read[document].append(position)
    return read


def test_lanes_read_each_document_in_order_and_every_row_once_per_epoch():
    table, where = synthetic([7, 1, 3, 12, 2, 5, 5, 1, 9, 4, 3])
    replicas = [read_steps(loader(table, where, dp=2, dp_rank=rank)) for rank in range(2)]
    assert len(replicas[0]) == len(replicas[1])  # the replicas agree on the epoch's length
    documents = [set(check_lanes(steps, table)) for steps in replicas]
    assert not documents[0] & documents[1]  # disjoint documents
    read = defaultdict(list)
    for steps in replicas:
        for document, positions in check_lanes(steps, table).items():
            read[document] += positions
    assert {d: sorted(p) for d, p in read.items()} == {d: list(range(n)) for d, n in enumerate(table)}


def test_a_resume_continues_the_epoch_exactly():
    table, where = synthetic([7, 1, 3, 12, 2, 5, 5, 1, 9, 4, 3])
    whole = read_steps(loader(table, where))
    interrupted = loader(table, where)
    head = read_steps(interrupted, 5)
    resumed = loader(table, where)
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))  # through a manifest's JSON
    assert head + read_steps(resumed) == whole


def test_reset_memory_at_another_layout_continues_the_documents_fresh_and_reads_every_row_once():
    table, where = synthetic([7, 1, 3, 12, 2, 5, 5, 1, 9, 4, 3])
    before = loader(table, where, dp=2, dp_rank=0)
    head = read_steps(before, 4) + read_steps(loader(table, where, dp=2, dp_rank=1), 4)
    state = before.state_dict()
    with pytest.raises(CheckpointError, match="--reset-memory"):
        loader(table, where, micro_batch=3).load_state_dict(state)
    after = loader(table, where, micro_batch=3)
    after.load_state_dict(state, reset_memory=True)
    tail = read_steps(after)
    check_lanes(tail, table)
    continued = [rows for rows in tail[:1]][0]
    assert all(fresh for _, _, _, fresh in continued)  # every lane starts from M_0, mid-document or not
    positions = defaultdict(list)
    for rows in head + tail:
        for _, document, position, _ in rows:
            positions[document].append(position)
    assert {d: sorted(p) for d, p in positions.items()} == {d: list(range(n)) for d, n in enumerate(table)}


def test_padding_rows_have_no_loss_and_the_next_epoch_starts_over():
    table, where = synthetic([3, 1])
    lanes = loader(table, where, micro_batch=2, grad_accum=1)
    first = list(lanes)
    assert len(first) == 3  # the longest document: three steps
    padding = [row for row in range(2) if (first[1]["labels"][row] == IGNORE_INDEX).all()]
    assert len(padding) == 1 and first[1]["carry"][padding[0], 1] == 1  # the lane of the one-row document pads
    assert lanes.state_dict()["epoch"] == 1 and len(list(lanes)) == 3


def test_document_packing_tiles_each_document_with_overlapping_rows():
    packer = DocumentPacker(WIDTH, PAD, np.dtype(np.int64))
    for length in (1, 2, 4, 5, 6, 9, 13):
        tokens = np.arange(1, length + 1)
        rows = packer.add(np.stack([tokens, np.ones_like(tokens)]))
        assert len(rows) == rows_of_document(length, WIDTH)
        inputs = np.concatenate([row[0, :-1] for row in rows])
        labels = np.concatenate([row[0, 1:] for row in rows])
        real = labels != PAD
        assert (inputs[real] == tokens[:-1]).all() and (labels[real] == tokens[1:]).all()
        assert (rows[:, 1][rows[:, 0] == PAD] == 0).all()  # padding never carries loss


def test_prepare_tags_rows_with_their_document_and_position(tmp_path, tokenizer_path):
    from streaming import StreamingDataset

    from lm2.pipeline.data.prepare import prepare

    texts = ["A short one.", "Word " * 60, "Mid length document of some words, " * 4]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    prepare([source], tmp_path / "data", tokenizer_path, row_length=16, packing="document", progress=False)
    table = np.load(tmp_path / "data" / "train" / "documents.npy")
    dataset = StreamingDataset(local=str(tmp_path / "data" / "train"), shuffle=False, batch_size=1)
    samples = [dataset[i] for i in range(dataset.num_samples)]
    assert [int(s["document"]) for s in samples] == [d for d, rows in enumerate(table) for _ in range(rows)]
    assert [int(s["position"]) for s in samples] == [p for rows in table for p in range(rows)]
    for previous, row in zip(samples, samples[1:]):
        if row["document"] == previous["document"]:
            assert row["tokens"][0] == previous["tokens"][-1]  # consecutive rows overlap by one token


def test_answer_field_puts_the_loss_on_the_answers_only(tmp_path, tokenizer_path, train_data):
    from lm2.pipeline.config import load_config
    from lm2.pipeline.data.prepare import prepare
    from lm2.pipeline.data.tokenizer import Tokenizer
    from lm2.pipeline.parallel.dims import ParallelDims
    from lm2.pipeline.train.build import build_loader

    tokenizer = Tokenizer.load(tokenizer_path)
    records = [
        {"prompt": f"Mary went to the garden {i}. Where is Mary?\nAnswer:", "answer": " garden."} for i in range(12)
    ]
    source = tmp_path / "qa.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in records))
    prepare(
        [source],
        tmp_path / "data",
        tokenizer_path,
        row_length=64,
        text_field="prompt",
        answer_field="answer",
        packing="whole",
        progress=False,
    )
    run = load_config(
        Path(__file__).parent / "tiny_train.yaml",
        [
            f"data.streams=[{{path: {tmp_path / 'data'}}}]",
            f"data.tokenizer={tokenizer_path}",
            "model.vocab_size=512",
            "model.row_length=64",
            "data.shuffle=false",
        ],
    )
    batch = next(iter(build_loader(run, ParallelDims(world_size=1), 0)))
    for inputs, labels in zip(batch["input_ids"], batch["labels"]):
        row = inputs[: (inputs != tokenizer.pad_id).sum()].tolist()  # one record per row, then padding
        # The record is one text, as a model reads its answer at inference: the answer is the prompt's own
        # continuation, not a word of its own that sentencepiece would start with an extra "▁".
        record = next(r for r in records if tokenizer.encode(r["prompt"] + r["answer"]) + [tokenizer.eos_id] == row)
        answer = row[len(tokenizer.encode(record["prompt"])) :]  # the seam merges nothing here
        assert answer != tokenizer.encode(record["answer"]) + [tokenizer.eos_id]
        assert labels[labels != IGNORE_INDEX].tolist() == answer  # its answer and EOS
        assert tokenizer.decode(row).startswith("Mary went to")


def test_truncate_keeps_a_long_documents_last_row(tmp_path, tokenizer_path):
    """--truncate: a prompt longer than a row keeps its end, so its answer (and the loss) stays."""
    from streaming import StreamingDataset

    from lm2.pipeline.data.prepare import prepare
    from lm2.pipeline.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_path)
    records = [
        {"prompt": "Long context words. " * 30 + "Where is it?", "answer": " here."},
        {"prompt": "Short?", "answer": " yes."},
    ]
    source = tmp_path / "qa.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in records))
    metadata = prepare(
        [source],
        tmp_path / "data",
        tokenizer_path,
        row_length=16,
        text_field="prompt",
        answer_field="answer",
        packing="whole",
        truncate=True,
        progress=False,
    )
    assert metadata["splits"]["train"]["truncated"] == 1 and metadata["splits"]["train"]["rows"] == 2
    dataset = StreamingDataset(local=str(tmp_path / "data" / "train"), shuffle=False, batch_size=1)
    first = dataset[0]
    whole = tokenizer.encode(records[0]["prompt"] + " here.") + [tokenizer.eos_id]
    answer = len(whole) - len(tokenizer.encode(records[0]["prompt"]))  # its tokens and EOS (no merge at the seam)
    assert first["tokens"].tolist() == whole[-17:]
    assert first["mask"].tolist() == [0] * (17 - answer) + [1] * answer
