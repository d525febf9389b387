"""BABILong samples (Kuratov et al., 2024; booydar/babilong), built as the benchmark does: the facts of a bAbI
sample are inserted, in order, at random sentence boundaries of background text that fills the context to a
target length in tokens of the model's tokenizer; the question follows the context.

Background: consecutive sentences from a random place of the background books; the last one is cut so facts
plus background hold exactly the target number of tokens (counted piece by piece, as the benchmark does).
Fact positions are drawn with replacement among the len(sentences) + 1 gaps and sorted, so several facts may
share a gap. Length 0 is the bare bAbI story. Everything is deterministic in (seed, task, length, sample).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lm2.model.errors import EvalError
from lm2.pipeline.eval.babilong.babi import BabiSample, read_text

PROMPT = "{context}\n\nQuestion: {question}\nAnswer:"
"""The model sees the context, then the question; a base model continues with the answer."""
ANSWER = " {answer}."
"""How a training document of the experiment's mixture continues PROMPT (pipeline/data/babilong.py)."""
MIN_SENTENCE_WORDS = 3  # headings and stray fragments are not sentences (the benchmark skips short ones too)
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z])")


def parse_length(text: str) -> int:
    """'0k', '4k', '128k' (k = 1024 tokens) or a plain number of tokens."""
    match = re.fullmatch(r"(\d+)(k?)", text.strip().lower())
    if not match:
        raise EvalError(f"length {text!r} is not a number of tokens: write e.g. 0k, 4k, 128k (k = 1024) or 512")
    return int(match.group(1)) * (1024 if match.group(2) else 1)


def split_sentences(text: str) -> list[str]:
    """Sentences of running text: line breaks joined, split after . ! ? before a capital letter."""
    flat = " ".join(text.split())
    return [s for s in _SENTENCE_END.split(flat) if len(s.split()) >= MIN_SENTENCE_WORDS]


def book_files(paths: list[str | Path]) -> list[Path]:
    """.txt/.txt.gz files given directly or found in folders, in sorted order."""
    found = []
    for path in map(Path, paths):
        found += sorted(p for p in path.glob("*") if p.name.endswith((".txt", ".txt.gz"))) if path.is_dir() else [path]
    if not found or not all(p.is_file() for p in found):
        raise EvalError(
            f"no books in {', '.join(map(str, paths))}: give .txt/.txt.gz files or folders of them "
            "(e.g. corpus or ../shared/data/text)"
        )
    return found


class Background:
    """The sentences of some books, with their token counts."""

    def __init__(self, books: list[str | Path], tokenizer):
        self.tokenizer = tokenizer
        self.sentences = [s for path in book_files(books) for s in split_sentences(read_text(path))]
        self.lengths = [len(ids) for ids in tokenizer(self.sentences, add_special_tokens=False).input_ids]
        self.total = sum(self.lengths)

    def take(self, tokens: int, rng: np.random.Generator) -> list[str]:
        """Consecutive sentences from a random start (wrapping around) holding exactly `tokens` tokens."""
        if tokens > self.total:
            raise EvalError(
                f"the background holds {self.total} tokens, fewer than the {tokens} asked for: "
                "give --background a larger folder of books"
            )
        index, taken, count = int(rng.integers(len(self.sentences))), [], 0
        while count < tokens:
            sentence, length = self.sentences[index], self.lengths[index]
            if count + length > tokens:  # cut the last sentence to fit
                ids = self.tokenizer(sentence, add_special_tokens=False).input_ids[: tokens - count]
                sentence, length = self.tokenizer.decode(ids), tokens - count
            taken.append(sentence)
            count += length
            index = (index + 1) % len(self.sentences)
        return taken


@dataclass(frozen=True)
class Haystack:
    context: str
    fact_positions: tuple[int, ...]  # the gap (0..len(sentences)) each fact went into
    fact_spans: tuple[tuple[int, int], ...]  # where each fact is in `context`: (start, end) character offsets


def joined(pieces: list[str], is_fact: list[bool]) -> tuple[str, tuple[tuple[int, int], ...]]:
    """The pieces joined by spaces, and the character span of every piece marked as a fact, in order."""
    spans, start = [], 0
    for piece, fact in zip(pieces, is_fact):
        if fact:
            spans.append((start, start + len(piece)))
        start += len(piece) + 1
    return " ".join(pieces), tuple(spans)


def haystack(sample: BabiSample, length: int, background: Background, rng: np.random.Generator) -> Haystack:
    """The facts of `sample` spread through background text, `length` tokens in all (the bare facts at 0, or
    when the facts alone are longer)."""
    facts = list(sample.facts)
    fact_tokens = sum(map(len, background.tokenizer(facts, add_special_tokens=False).input_ids)) if facts else 0
    if fact_tokens >= length:
        context, spans = joined(facts, [True] * len(facts))
        return Haystack(context, (0,) * len(facts), spans)
    sentences = background.take(length - fact_tokens, rng)
    positions = np.sort(rng.choice(len(sentences) + 1, size=len(facts)))
    gaps: list[list[tuple[str, bool]]] = [[] for _ in range(len(sentences) + 1)]
    for fact, position in zip(facts, positions):
        gaps[position].append((fact, True))
    for gap, sentence in zip(gaps, sentences):
        gap.append((sentence, False))
    pieces = [piece for gap in gaps for piece in gap]
    context, spans = joined([text for text, _ in pieces], [fact for _, fact in pieces])
    return Haystack(context, tuple(int(p) for p in positions), spans)


def sample_rng(seed: int, task: str, length: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, int(task.removeprefix("qa")), length, index])


def prompt(sample: BabiSample, context: str) -> str:
    return PROMPT.format(context=context, question=sample.question)
