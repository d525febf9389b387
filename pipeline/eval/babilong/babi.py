"""bAbI task files -> single-question samples, as BABILong builds them: a story's question becomes one sample
whose facts are the story's statements before it (earlier questions dropped), in order."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

from lm2.model.errors import EvalError

HELDOUT_FOLDER = Path(__file__).parent / "babi"
"""The default task data: held-out stories shipped with lm2 (see babi/SOURCES.md)."""

# BABILong's answer words per task (booydar/babilong, metrics.py TASK_LABELS): the only words the metric looks
# for in a model's output. Every answer of the bAbI files is one of them (tests check it).
TASK_LABELS = {
    "qa1": ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office"),
    "qa2": ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office"),
    "qa3": ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office"),
    "qa4": ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office"),
    "qa5": ("Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"),
    "qa6": ("no", "yes"),
    "qa7": ("none", "one", "three", "two"),
    "qa8": ("apple", "football", "milk", "nothing"),
    "qa9": ("no", "yes"),
    "qa10": ("maybe", "no", "yes"),
}


@dataclass(frozen=True)
class BabiSample:
    facts: tuple[str, ...]
    question: str
    answer: str
    supporting: tuple[int, ...] = ()
    """Indices into `facts` of the supporting facts the question line names, in story order."""


def read_text(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return handle.read()


def stories(text: str) -> list[list[str]]:
    """A bAbI file's stories, each a list of its lines without the line numbers (a story restarts at 1)."""
    result: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        number, _, rest = line.partition(" ")
        if number == "1" or not result:
            result.append([])
        result[-1].append(rest)
    return result


def story_samples(story: list[str]) -> list[BabiSample]:
    """One sample per question line ("question\tanswer\tsupporting line numbers"). A story's lines are numbered
    1, 2, ... in order (questions included), so line number n is story[n - 1]."""
    facts: list[str] = []
    fact_of_line: dict[int, int] = {}  # line number -> index in facts
    samples = []
    for number, line in enumerate(story, start=1):
        if "\t" in line:
            question, answer, *rest = line.split("\t")
            lines = [int(n) for n in rest[0].split()] if rest else []
            supporting = tuple(sorted(fact_of_line[n] for n in lines if n in fact_of_line))
            samples.append(BabiSample(tuple(facts), question.strip(), answer.strip(), supporting))
        else:
            fact_of_line[number] = len(facts)
            facts.append(line.strip())
    return samples


def check_task(task: str) -> None:
    if task not in TASK_LABELS:
        raise EvalError(f"unknown task {task!r}: choose among {', '.join(TASK_LABELS)}")


def task_file(folder: Path, task: str) -> Path:
    """The one `qaN_*` file (.txt or .txt.gz) of a task in a folder."""
    check_task(task)
    found = sorted(p for p in Path(folder).glob(f"{task}_*") if p.name.endswith((".txt", ".txt.gz")))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise EvalError(
            f"{what} {task}_*.txt file(s) in {folder}: give --babi a folder with one bAbI file per "
            "task (e.g. ../shared/data/babi)"
        )
    return found[0]


def task_samples(folder: Path, task: str) -> list[BabiSample]:
    return [s for story in stories(read_text(task_file(folder, task))) for s in story_samples(story)]
