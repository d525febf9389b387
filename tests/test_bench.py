"""bench/train_step.py runs end to end and reports numbers that agree with each other and with the accounting.

Its timings are not asserted (they belong in bench/README.md); what it derives from them and from the model is.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["model.num_layers=2", "train.global_batch=8"]  # two micro-batches of 4 rows per step


def train_step_bench(*overrides: str) -> dict:
    """One round of one step per subject; the script's JSON line."""
    command = [
        sys.executable,
        "bench/train_step.py",
        "--config",
        "configs/tiny.yaml",
        "--rounds",
        "1",
        "--steps",
        "1",
        *overrides,
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))


def check_report(report: dict, overrides: list[str]) -> None:
    from lm2.model.accounting import forward_flops_per_token
    from lm2.pipeline.config import load_config

    config = ROOT / "configs" / "tiny.yaml"
    flops = {
        name: forward_flops_per_token(load_config(config, overrides + extra).model)
        for name, extra in (
            ("lm2", []),
            ("vanilla", ["model.memory.enabled=false"]),
            ("backbone", ["model.memory.layers=[]"]),
        )
    }
    speeds, ratios = report["tokens_per_s"], report["lm2_vs_vanilla"]
    assert set(speeds) == {"lm2/engine", "lm2/plain", "vanilla/engine", "vanilla/plain", "backbone/engine"}
    assert all(value > 0 for value in speeds.values())
    # One round: each median ratio is that round's ratio, i.e. the ratio of the tokens/s.
    assert ratios["tokens_per_s_ratio"] == pytest.approx(speeds["lm2/engine"] / speeds["vanilla/engine"])
    assert report["engine_vs_plain"]["lm2"] == pytest.approx(speeds["lm2/engine"] / speeds["lm2/plain"])
    assert ratios["ideal_flops_ratio"] == pytest.approx(flops["vanilla"] / flops["lm2"])
    assert ratios["efficiency"] == pytest.approx(ratios["tokens_per_s_ratio"] / ratios["ideal_flops_ratio"])
    check_backbone_split(report, speeds, flops)
    peaks = report["peak_bytes"]
    assert peaks["lm2"] > peaks["vanilla"] > 0  # the memory adds weights, their state and activations
    assert ratios["peak_memory_ratio"] == pytest.approx(peaks["lm2"] / peaks["vanilla"])


def check_backbone_split(report: dict, speeds: dict, flops: dict) -> None:
    """LM2/vanilla in two parts, vanilla -> LM2's backbone -> LM2, recomputed from the tokens/s (one round)."""
    backbone, memory = report["backbone_vs_vanilla"], report["lm2_vs_backbone"]
    assert backbone["tokens_per_s_ratio"] == pytest.approx(speeds["backbone/engine"] / speeds["vanilla/engine"])
    assert backbone["ideal_flops_ratio"] == pytest.approx(flops["vanilla"] / flops["backbone"])
    assert memory["tokens_per_s_ratio"] == pytest.approx(speeds["lm2/engine"] / speeds["backbone/engine"])
    assert memory["ideal_flops_ratio"] == pytest.approx(flops["backbone"] / flops["lm2"])
    assert flops["vanilla"] > flops["backbone"]  # attention within segments, no banks
    # The banks' FLOPs per token over the seconds per token they add, against the backbone's.
    seconds_added = 1 / speeds["lm2/engine"] - 1 / speeds["backbone/engine"]
    if seconds_added <= 0:  # LM2 no slower than its backbone in this one round (noise): no finite ratio
        assert memory["memory_per_flop"] == math.inf
        return
    banks = (flops["lm2"] - flops["backbone"]) / seconds_added
    assert memory["memory_per_flop"] == pytest.approx(banks / (flops["backbone"] * speeds["backbone/engine"]))


@pytest.mark.slow
def test_train_step_bench_on_the_cpu():
    report = train_step_bench(*SMALL)
    assert (report["device"], report["dtype"]) == ("cpu", "torch.float32")
    check_report(report, SMALL)


def test_memory_options_bench_reports_every_option_against_the_paper_rule():
    """bench/memory_options.py runs its four models and reports a positive ratio per option for both measurements."""
    tiny = ["model.num_layers=1", "model.row_length=128", "train.micro_batch=1", "train.global_batch=1"]
    command = [sys.executable, "bench/memory_options.py", "--config", "configs/tiny.yaml", "--rounds", "1", *tiny]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    for name in ("model_step", "memory_module"):
        assert set(report[name]) == {"convex", "paper+read_norm", "convex+read_norm", "paper_ms"}
        assert all(value > 0 for value in report[name].values())


@pytest.mark.slow
def test_verify_checkpoint_bench_reports_consistent_numbers():
    command = [sys.executable, "bench/verify_checkpoint.py", "--gb", "0.02", "--rounds", "1", "--threads", "2"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert report["files"] == 9 and 0.02e9 <= report["bytes"] < 0.021e9
    assert report["speedup"] == pytest.approx(report["seconds"]["one_thread"][0] / report["seconds"]["verify"][0])
    # Half the bytes in the model file, 8 equal partitions: by bytes over 4 workers the model file is alone on one
    # (0.5 of the bytes); by file count (sorted names) rank 0 gets it and 4 partitions (0.5 + 4/16 = 0.75).
    critical = report["critical_bytes_at_2_ranks"]
    assert critical["by_bytes_over_threads"] == pytest.approx(0.5 * report["bytes"], rel=1e-3)
    assert critical["by_file_count_one_thread"] == pytest.approx(0.75 * report["bytes"], rel=1e-3)
    assert report["console"].startswith("verified step_00000001: 0.02 GB in 9 files in ")


@pytest.mark.slow
def test_checkpoint_bench_reports_the_time_a_save_costs_consistently():
    """One round: the asynchronous/synchronous ratio is that round's lost seconds, each its round's seconds less the
    steps alone; the checkpoint's bytes are those of the folder lm2 wrote."""
    small = ["model.num_layers=2", "train.global_batch=4", "train.micro_batch=4"]
    command = [sys.executable, "bench/checkpoint.py", "--rounds", "1", "--steps-between", "1", "--train-threads", "1"]
    result = subprocess.run([*command, *small], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    seconds = report["seconds"]
    assert report["train_threads"] == 1 and seconds["steps"] > 0 and seconds["async_blocked"] > 0
    assert seconds["sync_save_cpu"] > 0 and seconds["async_writer_cpu"] > 0  # the writer thread's own CPU time
    assert report["async_lost_ratio"] == pytest.approx(seconds["async_lost"] / seconds["sync_lost"])
    assert report["checkpoint_bytes"] == report["bytes"]["lm2"] > report["bytes"]["analytic"]
