"""BABILong's answer matching (booydar/babilong, metrics.py compare_answers): in the first sentence of the
generated text, find the task's answer words, ignoring those the question itself mentions; the answer is right
when the target is the only one found (for qa8's lists: exactly the target's words)."""

from __future__ import annotations

import re

from lm2.pipeline.eval.babilong.babi import TASK_LABELS


def first_sentence(output: str) -> str:
    """The part of the output the metric reads: lower case, up to the first period, before any echoed prompt."""
    output = output.lower().split(".")[0]
    # The benchmark also splits at "Question" after lower-casing, which never matches; kept out, as there.
    for marker in ("<context>", "<example>"):
        output = output.split(marker)[0]
    return output


def is_correct(task: str, target: str, output: str, question: str) -> bool:
    labels = {label.lower() for label in TASK_LABELS[task]}
    in_question = {label for label in labels if label in question.lower()}
    found = {label for label in labels if label in first_sentence(output)} - in_question
    target = target.lower()
    if "," in target and len(target) > 3:  # qa8: several objects
        parts = set(target.split(","))
        return found == parts
    return found == {target}


def last_mentioned(task: str, facts: tuple[str, ...]) -> str | None:
    """The task's answer word that the facts mention last (None when they mention none): the answer of the recency
    shortcut, which a model that has not learned the task often gives (qa1: "where is X?" answered with the last
    place named, whoever went there)."""
    words = {label.lower(): label for label in TASK_LABELS[task]}
    for word in reversed(re.findall(r"[A-Za-z]+", " ".join(facts))):
        if word.lower() in words:
            return words[word.lower()]
    return None
