"""Training metrics: one console line per log step for people, wandb (offline unless asked) for dashboards.

Only rank 0 prints and talks to wandb; the numbers it reports are already reduced over ranks.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm2.pipeline.config import RunConfig
from lm2.pipeline.train.memory_monitor import COLUMNS, GATES


@dataclass
class Throughput:
    """Tokens/s and model FLOP/s since the last log step, from an analytic FLOPs count (memory included)."""

    flops_per_token: float
    """Training FLOPs per token (3 x forward)."""
    world_size: int
    peak_tflops: float
    clock: Callable[[], float] = time.perf_counter
    """Seconds from an arbitrary origin (tests pass their own)."""
    _tokens: int = 0
    _since: float = field(init=False)

    def __post_init__(self) -> None:
        self._since = self.clock()

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def report(self) -> dict[str, float]:
        now = self.clock()
        tokens_per_s = self._tokens / max(now - self._since, 1e-9)
        tflops = tokens_per_s * self.flops_per_token / 1e12 / self.world_size  # per device
        self._tokens, self._since = 0, now
        metrics = {"tokens_per_s": tokens_per_s, "tflops_per_device": tflops}
        if self.peak_tflops:
            metrics["mfu"] = tflops / self.peak_tflops
        return metrics


def _console_line(step: int, total: int, metrics: dict[str, Any]) -> str:
    parts = [f"step {step}/{total}"]
    for key, fmt in (
        ("loss", "loss {:.4f}"),
        ("val_loss", "val {:.4f}"),
        ("lr", "lr {:.2e}"),
        ("grad_norm", "grad {:.3f}"),
        ("tokens_per_s", "{:,.0f} tok/s"),
        ("tflops_per_device", "{:.3g} TFLOP/s/dev"),
        ("mfu", "MFU {:.1%}"),
        ("samples", "samples {:,}"),
    ):
        if metrics.get(key) is not None:
            parts.append(fmt.format(metrics[key]))
    gates = {g: [v for k, v in metrics.items() if k.startswith("gates/") and k.endswith(g)] for g in GATES}
    if any(gates.values()):  # a gate no layer used (no write in a one-segment row) shows as "-"
        means = [f"{sum(values) / len(values):.2f}" if values else "-" for values in gates.values()]
        parts.append(f"gates in/forget/out {'/'.join(means)}")
    means = [v for k, v in metrics.items() if k.endswith("/slot_norm_mean")]
    if means:
        largest = max(v for k, v in metrics.items() if k.endswith("/slot_norm_max"))
        parts.append(f"slot norm mean/max {sum(means) / len(means):.2f}/{largest:.2f}")
    return " | ".join(parts)


def memory_metrics(rows: list[list[float]]) -> dict[str, float]:
    """num_layers rows of (g_in, g_forget, g_out, slot_norm_mean, slot_norm_max) (MemoryMonitor.summary) ->
    {"gates/layer_03/g_in": ..., "memory/layer_03/slot_norm_max": ...}; NaN (no memory) is left out."""
    out = {}
    for layer, row in enumerate(rows):
        for name, value in zip(COLUMNS, row):
            if not math.isnan(value):
                out[f"{'gates' if name in GATES else 'memory'}/layer_{layer:02d}/{name}"] = value
    return out


class MetricsLogger:
    def __init__(self, run: RunConfig, rank: int, wandb_id: str | None = None):
        self.enabled = rank == 0
        self.total_steps = run.train.steps
        self.wandb = None
        self.jsonl = Path(run.logging.run_dir) / "metrics.jsonl"
        if self.enabled:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        if self.enabled and run.logging.wandb != "disabled":
            import wandb  # only rank 0 pays for the import

            self.wandb = wandb.init(
                project=run.logging.project,
                name=run.logging.run_name,
                dir=str(self.jsonl.parent),
                mode=run.logging.wandb,
                config=run.to_dict(),
                id=wandb_id,
                resume="allow",
            )

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        print(_console_line(step, self.total_steps, metrics), flush=True)
        with open(self.jsonl, "a") as handle:  # machine-readable history, appended across resumes
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def finish(self) -> None:
        """Closes the wandb run; a second call does nothing."""
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
