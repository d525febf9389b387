"""`lm2 data babilong`: BABILong training samples for fine-tuning, as jsonl records {"prompt", "answer"}.

Each record is one question of a bAbI training story (the held-out stories that `lm2 eval babilong` evaluates on,
`pipeline/eval/babilong/babi/`, are left out) with its facts in a haystack of training-book sentences, built by
the evaluation's own builder (facts at sentence boundaries drawn uniformly, in order): `prompt` is the evaluation's
prompt (`samples.prompt`), `answer` its continuation (`samples.ANSWER`, e.g. " kitchen."), on which a loss-masked
`lm2 data prepare` trains. A record's length in tokens, prompt + answer (one text, as prepare tokenizes it) + EOS,
is drawn uniformly from [min_tokens, max_tokens] and never exceeds max_tokens; a story too long for max_tokens even
without background is skipped. The books must not be the evaluation's (its default background, corpus/): a book
whose text equals one of them is refused. Everything is deterministic in the seed.

Options: `text_records` writes {"text": prompt + answer} instead, for a prepare without loss masks; `book_documents`
writes the training books, cut into pieces, as {"text"} documents into a second file, to mix in language-model data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from lm2.model.errors import DataError
from lm2.pipeline.eval.babilong.babi import (
    HELDOUT_FOLDER,
    BabiSample,
    check_task,
    read_text,
    stories,
    story_samples,
    task_file,
)
from lm2.pipeline.eval.babilong.samples import ANSWER, Background, book_files, haystack, prompt, split_sentences

EVALUATION_BOOKS = Path(__file__).resolve().parents[2] / "corpus"
"""The books `lm2 eval babilong` hides its facts in by default: training must not see them."""
BOOK_CHUNK = 100  # sentences per book document: a val split gets pieces of every book, not whole books
REBUILDS = 8  # haystacks rebuilt shorter when the joined text tokenizes longer than its pieces counted


class SentencePieceTokenizer:
    """The slice of a Hugging Face tokenizer that Background uses, over a sentencepiece model (the same ids as
    the exported tokenizer), so the samples can be written before any model exists."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.processor = spm.SentencePieceProcessor(model_file=str(path))

    def __call__(self, texts, add_special_tokens: bool = False):
        return SimpleNamespace(input_ids=self.processor.encode(texts))

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)


@dataclass(frozen=True)
class Budget:
    """Tokens per record, prompt + answer + EOS: drawn uniformly from [min_tokens, max_tokens]."""

    min_tokens: int
    max_tokens: int

    def __post_init__(self) -> None:
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise DataError(
                f"--min-tokens {self.min_tokens} must lie between 0 and --max-tokens {self.max_tokens}: lower it"
            )


def text_checksum(path: Path) -> str:
    """sha256 of a book's text with whitespace runs made single spaces: the same book plain, gzipped or re-wrapped
    has the same checksum."""
    return hashlib.sha256(" ".join(read_text(path).split()).encode()).hexdigest()


def refuse_evaluation_books(books: list[Path], evaluation: Path = EVALUATION_BOOKS) -> None:
    """DataError naming the first of `books` whose text is one of the evaluation's books."""
    if not evaluation.is_dir():
        return
    theirs = {text_checksum(path): path.name for path in book_files([evaluation])}
    for path in books:
        match = theirs.get(text_checksum(path))
        if match is not None:
            raise DataError(
                f"--books {path} is the evaluation's book {evaluation / match} (same text): lm2 eval babilong "
                "hides its facts in those books; train on other books"
            )


def training_stories(babi: Path, task: str) -> list[list[str]]:
    """A task's stories from a bAbI file, less those held out for evaluation."""
    heldout = {tuple(s) for s in stories(read_text(task_file(HELDOUT_FOLDER, task)))}
    pool = [s for s in stories(read_text(task_file(babi, task))) if tuple(s) not in heldout]
    if not pool:
        raise DataError(
            f"{task_file(babi, task)} holds no story besides the held-out evaluation stories: give --babi the "
            "bAbI training files (e.g. ../shared/data/babi)"
        )
    return pool


class SampleWriter:
    """Builds records of one length budget from bAbI samples and training books."""

    def __init__(self, background: Background, budget: Budget):
        self.background, self.budget = background, budget

    def count(self, text: str) -> int:
        return len(self.background.tokenizer(text).input_ids)

    def record(self, sample: BabiSample, rng: np.random.Generator) -> dict[str, str] | None:
        """The sample in a haystack filling a drawn number of tokens, or None if its bare story is too long."""
        answer = ANSWER.format(answer=sample.answer)
        outside = self.count(prompt(sample, "") + answer) + 1  # the question, answer and EOS
        bare = self.count(prompt(sample, " ".join(sample.facts)) + answer) + 1
        if bare > self.budget.max_tokens:
            return None
        total = int(rng.integers(self.budget.min_tokens, self.budget.max_tokens + 1))
        context_tokens = max(total - outside, 0)
        for _ in range(REBUILDS):
            text = prompt(sample, haystack(sample, context_tokens, self.background, rng).context)
            excess = self.count(text + answer) + 1 - self.budget.max_tokens
            if excess <= 0:
                return {"prompt": text, "answer": answer}
            context_tokens -= excess
        return {"prompt": prompt(sample, " ".join(sample.facts)), "answer": answer}


def babi_records(
    babi: Path, tasks: list[str], per_task: int, writer: SampleWriter, rng: np.random.Generator
) -> tuple[list[dict[str, str]], dict[str, int]]:
    """per_task records per task, each a random question of a random training story; and per task how many samples
    were skipped as too long for the budget (they bias a task towards its short stories: the summary says so)."""
    records, skipped = [], {}
    for task in tasks:
        pool, made, too_long = training_stories(babi, task), 0, 0
        while made < per_task:
            samples = story_samples(pool[int(rng.integers(len(pool)))])
            record = writer.record(samples[int(rng.integers(len(samples)))], rng)
            if record is None:
                too_long += 1
                if too_long > 10 * per_task + 100:
                    raise DataError(
                        f"most {task} samples do not fit in --max-tokens {writer.budget.max_tokens} even without "
                        "background: raise --max-tokens or leave the task out"
                    )
            else:
                records.append(record)
                made += 1
        skipped[task] = too_long
    return records, skipped


def book_documents(books: list[Path]) -> list[str]:
    documents = []
    for path in books:
        sentences = split_sentences(read_text(path))
        documents += [" ".join(sentences[i : i + BOOK_CHUNK]) for i in range(0, len(sentences), BOOK_CHUNK)]
    return documents


def write_jsonl(path: Path, records: list[dict], order: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for index in order:
            handle.write(json.dumps(records[index]) + "\n")


def as_text(record: dict[str, str]) -> dict[str, str]:
    return {"text": record["prompt"] + record["answer"]}


def write_babilong(
    output: str | Path,
    tokenizer: str | Path,
    books: list[str | Path],
    babi: str | Path,
    budget: Budget,
    per_task: int,
    tasks: list[str],
    seed: int = 0,
    text_records: bool = False,
    book_documents_path: str | Path | None = None,
) -> str:
    """Writes the records (shuffled, so that tasks and lengths interleave) and, if asked, the book documents;
    returns a one-line summary."""
    for task in tasks:
        check_task(task)
    if per_task < 1:
        raise DataError(f"--samples-per-task must be at least 1, got {per_task}")
    files = book_files(books)
    refuse_evaluation_books(files)
    rng = np.random.default_rng(seed)
    writer = SampleWriter(Background(files, SentencePieceTokenizer(tokenizer)), budget)
    records, skipped = babi_records(Path(babi), tasks, per_task, writer, rng)
    lengths = [writer.count(r["prompt"]) + writer.count(r["answer"]) + 1 for r in records]
    write_jsonl(Path(output), [as_text(r) for r in records] if text_records else records, rng.permutation(len(records)))
    too_long = ", ".join(f"{task} {count}" for task, count in skipped.items() if count) or "none"
    summary = (
        f"wrote {output}: {len(records)} {'text' if text_records else 'prompt/answer'} records ({', '.join(tasks)}; "
        f"{min(lengths)}-{max(lengths)} tokens with answer and EOS, mean {np.mean(lengths):.0f}, at most "
        f"{budget.max_tokens}; samples skipped as too long: {too_long})"
    )
    if book_documents_path is not None:
        documents = [{"text": text} for text in book_documents(files)]
        write_jsonl(Path(book_documents_path), documents, rng.permutation(len(documents)))
        summary += f"; {book_documents_path}: {len(documents)} book pieces"
    return summary
