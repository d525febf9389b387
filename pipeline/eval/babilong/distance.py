"""Where a sample's supporting facts lie in its prompt, in tokens, and accuracy by the distance between the last
supporting fact and the question, in power-of-two buckets: [0, 128), [128, 256), [256, 512), ...

The distance is the number of prompt tokens after the last supporting fact's last token and before the question
(the background between them; 0 when the fact ends the context). A model that reads only the tail of a prompt
(a vanilla model beyond its row length) sees the supporting facts only when the earliest of them starts inside
that tail; the buckets count the samples where it did not (`facts_cut_off`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

FIRST_BUCKET = 128
"""The first bucket is [0, FIRST_BUCKET): facts a few sentences before the question."""


@dataclass(frozen=True)
class FactPlace:
    distance: int
    """Tokens between the end of the last supporting fact and the start of the question."""
    first_token: int
    """The index, in the prompt's tokens, where the earliest supporting fact starts."""


def fact_place(
    encode: Callable[[str], list[int]],
    text: str,
    context_length: int,
    spans: tuple[tuple[int, int], ...],
    supporting: tuple[int, ...],
) -> FactPlace | None:
    """text: the prompt, whose first context_length characters are the context; spans: every fact's character
    span in the context (Haystack.fact_spans); supporting: indices of the supporting facts, in order. Token
    positions are the token counts of the prompt's prefixes (trailing spaces dropped: the next word's token holds
    its space). None when the sample names no supporting fact."""
    if not supporting:
        return None

    def tokens_before(offset: int) -> int:
        return len(encode(text[:offset].rstrip(" "))) if offset else 0

    question = tokens_before(context_length)
    last_end = tokens_before(spans[supporting[-1]][1])
    return FactPlace(distance=question - last_end, first_token=tokens_before(spans[supporting[0]][0]))


def bucket(distance: int) -> tuple[int, int]:
    """[low, high) of the power-of-two bucket holding `distance`."""
    if distance < FIRST_BUCKET:
        return 0, FIRST_BUCKET
    low = 1 << (distance.bit_length() - 1)
    return low, 2 * low


def bucket_label(low: int, high: int) -> str:
    """'<128', '128-256', '1k-2k' (k = 1024; the high end excluded)."""

    def short(n: int) -> str:
        return f"{n // 1024}k" if n >= 1024 else str(n)

    return f"<{high}" if low == 0 else f"{short(low)}-{short(high)}"


def _percent(part: int, whole: int) -> float | None:
    return 100.0 * part / whole if whole else None


def distance_rows(tasks: list[str], records: dict[str, list[dict]]) -> list[dict]:
    """Per task (over all its lengths) and bucket: samples, greedy and forced-choice accuracy, and how many samples
    had a supporting fact cut off. records: task -> the records of its cells (with `distance`, `correct`,
    `forced_correct` and `facts_in_view`). Buckets without samples are left out."""
    rows = []
    for task in tasks:
        grouped: dict[tuple[int, int], list[dict]] = {}
        for record in records[task]:
            if record["distance"] is not None:
                grouped.setdefault(bucket(record["distance"]), []).append(record)
        for (low, high), members in sorted(grouped.items()):
            forced = [r["forced_correct"] for r in members if r["forced_correct"] is not None]
            correct = sum(r["correct"] for r in members)
            rows.append(
                {
                    "task": task,
                    "bucket": bucket_label(low, high),
                    "low": low,
                    "high": high,
                    "samples": len(members),
                    "correct": correct,
                    "accuracy": _percent(correct, len(members)),
                    "forced_samples": len(forced),
                    "forced_correct": sum(forced),
                    "forced_accuracy": _percent(sum(forced), len(forced)),
                    "facts_cut_off": sum(not r["facts_in_view"] for r in members),
                }
            )
    return rows
