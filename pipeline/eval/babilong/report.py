"""BABILong results as results.json, a markdown table (results.md) and a task x length heatmap (heatmap.png,
the benchmark's figure style: accuracy in %, red to green)."""

from __future__ import annotations

import json
from pathlib import Path


def accuracy_grid(results: dict) -> list[list[float]]:
    """[task][length] accuracy in %."""
    by_key = {(c["task"], c["length"]): c["accuracy"] for c in results["cells"]}
    return [[by_key[(t, n)] for n in results["lengths"]] for t in results["tasks"]]


def truncation_notes(results: dict) -> list[str]:
    return [
        f"{c['task']} {c['length']}: {c['truncated']} of {c['samples']} prompts (mean "
        f"{c['mean_prompt_tokens']:.0f} tokens) cut to their last {c['kept_tokens']} tokens"
        for c in results["cells"]
        if c["truncated"]
    ]


def markdown(results: dict) -> str:
    truncated = {(c["task"], c["length"]) for c in results["cells"] if c["truncated"]}
    lines = [
        f"BABILong accuracy (%) of `{results['model']}` ({results['kind']}), {results['samples']} samples "
        f"per cell, seed {results['seed']}",
        "",
        "| task | " + " | ".join(results["lengths"]) + " |",
        "|---|" + "---|" * len(results["lengths"]),
    ]
    for task, row in zip(results["tasks"], accuracy_grid(results)):
        marks = ["*" if (task, n) in truncated else "" for n in results["lengths"]]
        lines.append(f"| {task} | " + " | ".join(f"{a:.0f}{m}" for a, m in zip(row, marks)) + " |")
    notes = truncation_notes(results)
    if notes:
        lines += [
            "",
            f"\\* the model holds {results['max_tokens']} tokens; it read the tail of longer prompts "
            "(the question stays): " + "; ".join(notes),
        ]
    return "\n".join(lines) + "\n"


def heatmap(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    grid = accuracy_grid(results)
    figure, axes = plt.subplots(figsize=(1.1 * len(results["lengths"]) + 2, 0.5 * len(results["tasks"]) + 1.5))
    image = axes.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    axes.set_xticks(range(len(results["lengths"])), results["lengths"])
    axes.set_yticks(range(len(results["tasks"])), results["tasks"])
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            axes.text(j, i, f"{value:.0f}", ha="center", va="center")
    axes.set_xlabel("context length (tokens; k = 1024)")
    axes.set_title(f"BABILong, {'/'.join(Path(results['model']).parts[-2:])} ({results['kind']})", fontsize=10)
    figure.colorbar(image, ax=axes, label="accuracy %")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_reports(results: dict, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (output / "results.md").write_text(markdown(results))
    heatmap(results, output / "heatmap.png")
