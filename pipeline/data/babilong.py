"""The LM2-vs-vanilla experiment's training documents, as one .jsonl for `lm2 data prepare`: every book whole,
plus bAbI samples placed in haystacks of 0 to `row_length` tokens, written in the evaluation's prompt format
followed by the answer, so that both models learn the task at lengths they can hold and are then evaluated
beyond them. Haystacks are built by the evaluation's own builder (babilong.haystack) from the training books;
the held-out stories that `lm2 eval babilong` evaluates on (babi/) are left out. Documents are shuffled
(seeded), so the val split of `lm2 data prepare` holds both kinds."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from lm2.model.errors import EvalError
from lm2.pipeline.eval.babilong.babi import HELDOUT_FOLDER, read_text, stories, story_samples, task_file
from lm2.pipeline.eval.babilong.samples import ANSWER, Background, book_files, haystack, prompt, split_sentences

PROMPT_ROOM = 48  # tokens kept free in a row for the question, the answer and EOS
BOOK_CHUNK = 100  # sentences per book document: the val split gets pieces of every book, not whole books


class SentencePieceTokenizer:
    """The slice of a Hugging Face tokenizer that Background uses, over a sentencepiece model (the same ids as
    the exported tokenizer), so the mixture can be written before any model exists."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.processor = spm.SentencePieceProcessor(model_file=str(path))

    def __call__(self, texts, add_special_tokens: bool = False):
        ids = self.processor.encode(texts)
        return SimpleNamespace(input_ids=ids)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)


def training_stories(babi: Path, task: str) -> list[list[str]]:
    """A task's stories from a bAbI file, less those held out for evaluation."""
    heldout = {tuple(s) for s in stories(read_text(task_file(HELDOUT_FOLDER, task)))}
    return [s for s in stories(read_text(task_file(babi, task))) if tuple(s) not in heldout]


def babi_documents(
    babi: Path, tasks: list[str], per_task: int, background: Background, row_length: int, rng: np.random.Generator
) -> list[str]:
    """per_task documents per task: a random question of a random story, in a haystack of random length."""
    documents = []
    for task in tasks:
        pool = training_stories(babi, task)
        for _ in range(per_task):
            samples = story_samples(pool[int(rng.integers(len(pool)))])
            sample = samples[int(rng.integers(len(samples)))]
            length = int(rng.integers(0, row_length - PROMPT_ROOM + 1))
            context = haystack(sample, length, background, rng).context
            documents.append(prompt(sample, context) + ANSWER.format(answer=sample.answer))
    return documents


def book_documents(books: list[str | Path]) -> list[str]:
    documents = []
    for path in book_files(books):
        sentences = split_sentences(read_text(path))
        documents += [" ".join(sentences[i : i + BOOK_CHUNK]) for i in range(0, len(sentences), BOOK_CHUNK)]
    return documents


def write_mixture(
    output: str | Path,
    tokenizer: str | Path,
    books: list[str | Path],
    babi: str | Path,
    row_length: int,
    per_task: int,
    tasks: list[str],
    seed: int = 0,
) -> str:
    """Writes the mixture; returns a one-line summary."""
    if row_length <= PROMPT_ROOM:
        raise EvalError(f"--row-length {row_length} leaves no room for a haystack: use more than {PROMPT_ROOM}")
    rng = np.random.default_rng(seed)
    background = Background(books, SentencePieceTokenizer(tokenizer))
    documents = book_documents(books)
    book_count = len(documents)
    documents += babi_documents(Path(babi), tasks, per_task, background, row_length, rng)
    order = rng.permutation(len(documents))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8") as handle:
        for index in order:
            handle.write(json.dumps({"text": documents[index]}) + "\n")
    return (
        f"wrote {output}: {book_count} book pieces and {len(documents) - book_count} bAbI haystacks "
        f"({', '.join(tasks)}; 0 to {row_length - PROMPT_ROOM} tokens)"
    )
