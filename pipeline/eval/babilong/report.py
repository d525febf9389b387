"""BABILong results as results.json, a markdown report (results.md: greedy and forced-choice accuracy per task and
length, and accuracy by the distance between the last supporting fact and the question), a task x length heatmap
of greedy accuracy (heatmap.png, the benchmark's figure style: accuracy in %, red to green) and accuracy against
that distance (distance.png)."""

from __future__ import annotations

import json
from pathlib import Path

from lm2.pipeline.eval.babilong.babi import TASK_LABELS


def accuracy_grid(results: dict, key: str = "accuracy") -> list[list[float | None]]:
    """[task][length] accuracy in % (key: "accuracy" for greedy answers, "forced_accuracy" for the forced choice)."""
    by_key = {(c["task"], c["length"]): c[key] for c in results["cells"]}
    return [[by_key[(t, n)] for n in results["lengths"]] for t in results["tasks"]]


def truncation_notes(results: dict) -> list[str]:
    return [
        f"{c['task']} {c['length']}: {c['truncated']} of {c['samples']} prompts (mean "
        f"{c['mean_prompt_tokens']:.0f} tokens) cut to their last {c['kept_tokens']} tokens"
        for c in results["cells"]
        if c["truncated"]
    ]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _length_table(results: dict, key: str) -> list[str]:
    truncated = {(c["task"], c["length"]) for c in results["cells"] if c["truncated"]}
    lines = ["| task | " + " | ".join(results["lengths"]) + " |", "|---|" + "---|" * len(results["lengths"])]
    for task, row in zip(results["tasks"], accuracy_grid(results, key)):
        marks = ["*" if (task, n) in truncated else "" for n in results["lengths"]]
        lines.append(f"| {task} | " + " | ".join(_percent(a) + m for a, m in zip(row, marks)) + " |")
    return lines


def _recency_table(results: dict) -> list[str]:
    cells = {(c["task"], c["length"]): c for c in results["cells"]}
    lines = ["| task | " + " | ".join(results["lengths"]) + " |", "|---|" + "---|" * len(results["lengths"])]
    for task in results["tasks"]:
        shown = [
            f"{_percent(cells[task, n]['forced_is_last_mentioned'])} / {_percent(cells[task, n]['recency_accuracy'])}"
            for n in results["lengths"]
        ]
        lines.append(f"| {task} | " + " | ".join(shown) + " |")
    return lines


def _buckets(results: dict) -> list[str]:
    """Every bucket label that holds samples, in order of distance."""
    lows = {row["bucket"]: row["low"] for row in results["distance"]}
    return sorted(lows, key=lows.__getitem__)


def _distance_table(results: dict) -> list[str]:
    buckets = _buckets(results)
    cells = {(row["task"], row["bucket"]): row for row in results["distance"]}
    lines = ["| task | " + " | ".join(buckets) + " |", "|---|" + "---|" * len(buckets)]
    for task in results["tasks"]:
        shown = []
        for name in buckets:
            row = cells.get((task, name))
            cut = "†" if row and row["facts_cut_off"] else ""
            shown.append(
                ""
                if row is None
                else f"{_percent(row['accuracy'])} / {_percent(row['forced_accuracy'])} ({row['samples']}){cut}"
            )
        lines.append(f"| {task} | " + " | ".join(shown) + " |")
    return lines


def markdown(results: dict) -> str:
    chance = ", ".join(f"{task} {100 / len(TASK_LABELS[task]):.0f}" for task in results["tasks"])
    lines = [
        f"BABILong accuracy (%) of `{results['model']}` ({results['kind']}), {results['samples']} samples "
        f"per cell, seed {results['seed']}",
        "",
        "Greedy answers, scored by the benchmark's metric:",
        "",
        *_length_table(results, "accuracy"),
        "",
        f"Forced choice among the task's answer words (the likeliest continuation; chance: {chance}; "
        "- where no target is a single word):",
        "",
        *_length_table(results, "forced_accuracy"),
    ]
    if any(c["forced_is_last_mentioned"] is not None for c in results["cells"]):
        lines += [
            "",
            "Recency shortcut: how often the forced choice is the answer word the facts name last, against how "
            "often that word is the target (the shortcut's own accuracy), forced / shortcut:",
            "",
            *_recency_table(results),
        ]
    notes = truncation_notes(results)
    if notes:
        lines += [
            "",
            f"\\* the model holds {results['max_tokens']} tokens; it read the tail of longer prompts "
            "(the question stays): " + "; ".join(notes),
        ]
    if results["distance"]:
        lines += [
            "",
            "By the distance in tokens between the last supporting fact and the question (all lengths; greedy / "
            "forced choice (samples); † some supporting facts lay outside the tokens the model read):",
            "",
            *_distance_table(results),
        ]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _title(results: dict) -> str:
    return f"BABILong, {'/'.join(Path(results['model']).parts[-2:])} ({results['kind']})"


def heatmap(results: dict, path: Path) -> None:
    plt = _pyplot()
    grid = accuracy_grid(results)
    figure, axes = plt.subplots(figsize=(1.1 * len(results["lengths"]) + 2, 0.5 * len(results["tasks"]) + 1.5))
    image = axes.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    axes.set_xticks(range(len(results["lengths"])), results["lengths"])
    axes.set_yticks(range(len(results["tasks"])), results["tasks"])
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            axes.text(j, i, f"{value:.0f}", ha="center", va="center")
    axes.set_xlabel("context length (tokens; k = 1024)")
    axes.set_title(_title(results), fontsize=10)
    figure.colorbar(image, ax=axes, label="accuracy %")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def distance_plot(results: dict, path: Path) -> None:
    """Accuracy against the distance bucket, a line per task: greedy solid, forced choice dashed."""
    plt = _pyplot()
    buckets = _buckets(results)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.9 * len(buckets) + 3), 4))
    for number, task in enumerate(results["tasks"]):
        rows = [row for row in results["distance"] if row["task"] == task]
        x = [buckets.index(row["bucket"]) for row in rows]
        color = f"C{number}"
        axes.plot(x, [row["accuracy"] for row in rows], "o-", color=color, label=f"{task} greedy")
        forced = [(i, row["forced_accuracy"]) for i, row in zip(x, rows) if row["forced_accuracy"] is not None]
        if forced:
            axes.plot(*zip(*forced), "s--", color=color, label=f"{task} forced choice")
    axes.set_xticks(range(len(buckets)), buckets)
    axes.set_ylim(-2, 102)
    axes.set_xlabel("tokens between the last supporting fact and the question (k = 1024)")
    axes.set_ylabel("accuracy %")
    axes.set_title(_title(results), fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_reports(results: dict, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (output / "results.md").write_text(markdown(results))
    heatmap(results, output / "heatmap.png")
    if results["distance"]:
        distance_plot(results, output / "distance.png")
