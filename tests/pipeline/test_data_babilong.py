"""`lm2 data babilong`: book pieces plus bAbI samples in haystacks up to the row length, in the evaluation's
prompt format, never from the held-out stories; deterministic; `lm2 data prepare` takes it."""

import json
from pathlib import Path

import sentencepiece as spm

from lm2.pipeline.cli import main
from lm2.pipeline.data.babilong import PROMPT_ROOM
from lm2.pipeline.eval.babilong.babi import HELDOUT_FOLDER, read_text, stories, story_samples

BOOK = Path(__file__).parents[2] / "corpus" / "chesterton-brown.txt.gz"
NEW_STORY = """1 Zed went to the kitchen.
2 Yan moved to the office.
3 Where is Zed? \tkitchen\t1
4 Zed journeyed to the garden.
5 Where is Zed? \tgarden\t4
"""


def write(tmp_path, tokenizer_path, name):
    babi = tmp_path / "babi"
    babi.mkdir(exist_ok=True)
    heldout = read_text(next(HELDOUT_FOLDER.glob("qa1_*")))
    (babi / "qa1_single-supporting-fact_train.txt").write_text(NEW_STORY + heldout)
    out = tmp_path / name
    assert (
        main(
            [
                "data",
                "babilong",
                "--output",
                str(out),
                "--tokenizer",
                str(tokenizer_path),
                "--books",
                str(BOOK),
                "--babi",
                str(babi),
                "--row-length",
                "128",
                "--tasks",
                "qa1",
                "--stories-per-task",
                "30",
            ]
        )
        == 0
    )
    return out


def test_mixture_holds_books_and_babi_haystacks_without_held_out_stories(tmp_path, tokenizer_path, capsys):
    out = write(tmp_path, tokenizer_path, "mixture.jsonl")
    assert "30 bAbI haystacks" in capsys.readouterr().out
    assert out.read_bytes() == write(tmp_path, tokenizer_path, "again.jsonl").read_bytes()
    documents = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    babi = [d for d in documents if "\nQuestion: " in d]
    assert len(babi) == 30 and len(documents) > 40  # the book, cut into pieces, and the samples shuffled
    assert documents[:30] != babi  # shuffled together
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    new_samples = {(s.question, s.answer) for s in story_samples(stories(NEW_STORY)[0])}
    lengths = []
    for document in babi:
        context, _, tail = document.rpartition("\n\nQuestion: ")
        question, answer = tail.split("\nAnswer: ")
        assert (question, answer.removesuffix(".")) in new_samples  # never a held-out story
        assert "Zed went to the kitchen." in context
        lengths.append(len(processor.encode(context)))
    assert max(lengths) <= (128 - PROMPT_ROOM) * 1.03 and min(lengths) < 40 < max(lengths)


def test_mixture_prepares_into_rows(tmp_path, tokenizer_path):
    from lm2.pipeline.data.prepare import prepare

    metadata = prepare(
        [write(tmp_path, tokenizer_path, "m.jsonl")],
        tmp_path / "data",
        tokenizer_path,
        row_length=128,
        val_fraction=0.1,
        progress=False,
    )
    assert metadata["splits"]["val"]["documents"] > 0
