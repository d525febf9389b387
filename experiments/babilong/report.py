"""The BABILong experiment's report material: from each model's `lm2 eval babilong` results (and `lm2 eval memory`
for LM2) under runs/, writes into the output folder

    tables.md          greedy and forced-choice accuracy per length, every model side by side, and by distance
    accuracy.png       accuracy against prompt length, every model (greedy solid, forced choice dashed)
    <model>-heatmap.png, <model>-distance.png, <model>-memory.png, <model>-results.md   each model's own figures
    models/<model>/    the exported Hugging Face folder (weights, config, tokenizer), so the results can be
                       re-scored without retraining: lm2 eval babilong --model docs/experiment/models/lm2 ...

    python experiments/babilong/report.py --runs runs --output docs/experiment lm2 lm2-seed1 vanilla-span vanilla-full
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

SHIPPED = (
    "config.json",
    "generation_config.json",
    "configuration_lm2.py",
    "modeling_lm2.py",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def load(runs: Path, model: str) -> dict:
    return json.loads((runs / f"babilong-{model}" / "babilong" / "results.json").read_text())


def cell(results: dict, length: str) -> dict:
    return next(c for c in results["cells"] if c["length"] == length)


def accuracy_table(all_results: dict[str, dict], key: str) -> list[str]:
    lengths = next(iter(all_results.values()))["lengths"]
    lines = ["| model | " + " | ".join(lengths) + " |", "|---|" + "---|" * len(lengths)]
    for model, results in all_results.items():
        values = []
        for length in lengths:
            found = cell(results, length)
            mark = "*" if found["truncated"] else ""
            values.append("-" if found[key] is None else f"{found[key]:.0f}{mark}")
        lines.append(f"| {model} | " + " | ".join(values) + " |")
    return lines


def distance_table(all_results: dict[str, dict]) -> list[str]:
    rows = {model: {row["bucket"]: row for row in results["distance"]} for model, results in all_results.items()}
    buckets = sorted(
        {b for r in rows.values() for b in r}, key=lambda b: min(r[b]["low"] for r in rows.values() if b in r)
    )
    lines = ["| model | " + " | ".join(buckets) + " |", "|---|" + "---|" * len(buckets)]
    for model, by_bucket in rows.items():
        shown = []
        for bucket in buckets:
            row = by_bucket.get(bucket)
            cut = "†" if row and row["facts_cut_off"] else ""
            shown.append("" if row is None else f"{row['forced_accuracy']:.0f} ({row['samples']}){cut}")
        lines.append(f"| {model} | " + " | ".join(shown) + " |")
    return lines


def plot(all_results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for model, results in all_results.items():
        lengths = results["lengths"]
        x = range(len(lengths))
        (line,) = axes.plot(x, [cell(results, n)["accuracy"] for n in lengths], marker="o", label=f"{model} greedy")
        axes.plot(
            x,
            [cell(results, n)["forced_accuracy"] for n in lengths],
            marker="s",
            linestyle="--",
            color=line.get_color(),
            alpha=0.7,
            label=f"{model} forced choice",
        )
    axes.axhline(100 / 6, color="grey", linewidth=0.8, linestyle=":", label="chance (1 of 6 rooms)")
    axes.set_xticks(range(len(lengths)), lengths)
    axes.set(
        xlabel="haystack length (tokens; k = 1024)",
        ylabel="qa1 accuracy (%)",
        ylim=(0, 100),
        title="BABILong qa1: accuracy against length",
    )
    axes.legend(fontsize="x-small", ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def copy_model(runs: Path, model: str, output: Path) -> None:
    source, target = runs / f"babilong-{model}" / "hf", output / "models" / model
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for path in [*source.glob("model*.safetensors"), *(source / name for name in SHIPPED)]:
        if path.is_file():
            shutil.copy2(path, target / path.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--output", type=Path, default=Path("docs/experiment"))
    parser.add_argument("models", nargs="+")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    all_results = {model: load(args.runs, model) for model in args.models}
    tables = [
        "Greedy answers, accuracy (%):",
        "",
        *accuracy_table(all_results, "accuracy"),
        "",
        "Forced choice among the six rooms, accuracy (%):",
        "",
        *accuracy_table(all_results, "forced_accuracy"),
        "",
        "Forced-choice accuracy (%) by tokens between the supporting fact and the question (samples):",
        "",
        *distance_table(all_results),
        "",
    ]
    (args.output / "tables.md").write_text("\n".join(tables))
    plot(all_results, args.output / "accuracy.png")
    for model in args.models:
        evaluated = args.runs / f"babilong-{model}"
        for name, target in (
            ("babilong/heatmap.png", "heatmap.png"),
            ("babilong/distance.png", "distance.png"),
            ("babilong/results.md", "results.md"),
            ("memory/memory.png", "memory.png"),
            ("memory/memory.json", "memory.json"),
        ):
            if (evaluated / name).is_file():
                shutil.copy2(evaluated / name, args.output / f"{model}-{target}")
        copy_model(args.runs, model, args.output)
    print(f"wrote {args.output}/tables.md, accuracy.png and the models' figures and folders")


if __name__ == "__main__":
    main()
