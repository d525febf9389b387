"""`lm2 data babilong`: prompt/answer records of bAbI samples in haystacks of training books, whose lengths (prompt
+ answer + EOS) are drawn uniformly up to --max-tokens and never exceed it, in the evaluation's prompt format,
never from the held-out stories or the evaluation's books; deterministic; `lm2 data prepare` takes the text form."""

import gzip
import json
from pathlib import Path

import numpy as np
import sentencepiece as spm

from lm2.pipeline.cli import main
from lm2.pipeline.eval.babilong.babi import HELDOUT_FOLDER, read_text, stories, story_samples
from lm2.pipeline.eval.babilong.samples import ANSWER, prompt

CORPUS = Path(__file__).parents[2] / "corpus"
NEW_STORY = """1 Zed went to the kitchen.
2 Yan moved to the office.
3 Where is Zed? \tkitchen\t1
4 Zed journeyed to the garden.
5 Where is Zed? \tgarden\t4
"""
WORDS = "the old man woman child river hill house road song bird tree walked sang saw found left kept near over".split()


def training_book(folder: Path) -> Path:
    """A book of 400 seeded sentences (the evaluation's books must not be used for training)."""
    rng = np.random.default_rng(0)
    sentences = [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 12)))).capitalize() + "." for _ in range(400)]
    path = folder / "training-book.txt"
    path.write_text("\n".join(sentences))
    return path


def babi_folder(tmp_path: Path) -> Path:
    """A qa1 training file: one new story, then the held-out stories (which must never be drawn)."""
    babi = tmp_path / "babi"
    babi.mkdir(exist_ok=True)
    heldout = read_text(next(HELDOUT_FOLDER.glob("qa1_*")))
    (babi / "qa1_single-supporting-fact_train.txt").write_text(NEW_STORY + heldout)
    return babi


def run(tmp_path, tokenizer_path, name, *options, books=None):
    out = tmp_path / name
    argv = ["data", "babilong", "--output", str(out), "--tokenizer", str(tokenizer_path), "--books"]
    argv += [str(books or training_book(tmp_path)), "--babi", str(babi_folder(tmp_path)), "--tasks", "qa1", *options]
    return main(argv), out


def records_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def lengths(records, tokenizer_path) -> list[int]:
    """Prompt + answer (one text, as prepare tokenizes it) + EOS in tokens, recounted with sentencepiece itself."""
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    return [len(processor.encode(r["prompt"] + r["answer"])) + 1 for r in records]


def test_records_are_prompt_and_answer_of_training_stories_within_the_budget(tmp_path, tokenizer_path, capsys):
    options = ["--max-tokens", "128", "--samples-per-task", "100"]
    code, out = run(tmp_path, tokenizer_path, "babi.jsonl", *options)
    assert code == 0 and "100 prompt/answer records" in capsys.readouterr().out
    assert out.read_bytes() == run(tmp_path, tokenizer_path, "again.jsonl", *options)[1].read_bytes()
    other = run(tmp_path, tokenizer_path, "seed1.jsonl", *options, "--seed", "1")[1]
    assert other.read_bytes() != out.read_bytes()
    records = records_of(out)
    samples = {(s.question, s.answer): s for s in story_samples(stories(NEW_STORY)[0])}
    for record in records:
        assert set(record) == {"prompt", "answer"}
        context, _, question = record["prompt"].rpartition("\n\nQuestion: ")
        sample = samples[(question.removesuffix("\nAnswer:"), record["answer"].strip(" ."))]  # never held out
        assert record["prompt"] == prompt(sample, context) and record["answer"] == ANSWER.format(answer=sample.answer)
        found = [context.find(fact) for fact in sample.facts]
        assert -1 not in found and found == sorted(found)
    counts = np.array(lengths(records, tokenizer_path))
    bare = lengths(
        [{"prompt": prompt(s, " ".join(s.facts)), "answer": ANSWER.format(answer=s.answer)} for s in samples.values()],
        tokenizer_path,
    )
    # Drawn uniformly from [0, 128]: a draw below a story's bare length gives the bare story; a quarter above 96.
    assert counts.max() <= 128 and counts.min() == min(bare) and counts.max() > 120
    assert 0.1 < np.mean(counts > 96) < 0.4


def test_min_tokens_sets_the_floor(tmp_path, tokenizer_path):
    code, out = run(tmp_path, tokenizer_path, "long.jsonl", "--max-tokens", "160", "--min-tokens", "120")
    counts = lengths(records_of(out), tokenizer_path)
    assert code == 0 and 0.95 * 120 <= min(counts) and max(counts) <= 160


def test_text_records_and_book_documents_prepare_into_rows(tmp_path, tokenizer_path):
    from lm2.pipeline.data.prepare import prepare

    books = tmp_path / "books.jsonl"
    options = ["--max-tokens", "128", "--samples-per-task", "30", "--text", "--book-documents", str(books)]
    code, out = run(tmp_path, tokenizer_path, "text.jsonl", *options)
    texts = [r["text"] for r in records_of(out)]
    assert code == 0 and len(texts) == 30 and all(t.endswith(".") and "\nAnswer: " in t for t in texts)
    documents = records_of(books)
    assert documents and all(set(d) == {"text"} and "\nQuestion: " not in d["text"] for d in documents)
    metadata = prepare(
        [out, books], tmp_path / "data", tokenizer_path, row_length=128, val_fraction=0.1, progress=False
    )
    assert metadata["splits"]["val"]["documents"] > 0


def test_the_evaluations_books_are_refused_in_one_line(tmp_path, tokenizer_path, capsys):
    """The same text as a corpus book, plain or re-wrapped, is refused, naming the book and the fix."""
    text = gzip.decompress((CORPUS / "blake-poems.txt.gz").read_bytes()).decode()
    for name, content in (("blake.txt", text), ("rewrapped.txt", " ".join(text.split()))):
        (tmp_path / name).write_text(content)
        code, out = run(tmp_path, tokenizer_path, "x.jsonl", "--max-tokens", "128", books=tmp_path / name)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and not out.exists()
        assert f"--books {tmp_path / name} is the evaluation's book" in err[0] and "blake-poems" in err[0]


def test_held_out_stories_alone_are_refused(tmp_path, tokenizer_path, capsys):
    babi = tmp_path / "heldout-only"
    babi.mkdir()
    (babi / "qa1_train.txt").write_text(read_text(next(HELDOUT_FOLDER.glob("qa1_*"))))
    argv = ["data", "babilong", "--output", str(tmp_path / "x.jsonl"), "--tokenizer", str(tokenizer_path)]
    argv += ["--books", str(training_book(tmp_path)), "--babi", str(babi), "--tasks", "qa1", "--max-tokens", "128"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no story besides the held-out" in err[0]
