"""The memory estimate of `lm2 info` against what a real run holds on CPU (fp32).

Activations are compared with the bytes autograd saves for backward (counted with saved_tensors_hooks), on shapes
other than the tiny config they were counted on, within 10 %. The whole estimate (weights, gradients, ZeRO-1
optimizer state, activations) is compared with the peak resident memory a DeepSpeed training step adds to its
process, within 25 %: RSS also holds the allocator's slack and libraries' buffers, so this is the honest bound.
"""

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from bench.measure import saved_activation_bytes
from lm2.model.accounting import forward_flops_per_token
from lm2.pipeline.config import load_config
from lm2.pipeline.train.plan import (
    checkpoint_bytes,
    memory_estimate,
    reduce_bucket_elements,
    tokens_per_s_per_device,
)
from tests.distributed import run_distributed

TINY = Path(__file__).parents[2] / "configs" / "tiny.yaml"
TEST_CONFIG = Path(__file__).parent / "tiny_train.yaml"


@pytest.mark.parametrize(
    "config, overrides",
    [
        (TEST_CONFIG, []),
        (TEST_CONFIG, ["model.memory.enabled=false"]),
        (TINY, ["model.hidden_size=256", "model.ffn_hidden_size=512", "model.memory.slots=32", "train.micro_batch=2"]),
        (TINY, ["model.num_layers=6", "model.memory.layers=[1,3]", "model.segment_length=32"]),
    ],
)
def test_activation_estimate_matches_what_autograd_saves(single_process, config, overrides):
    estimate, measured = activations_estimated_and_saved(config, overrides, "cpu")
    assert estimate == pytest.approx(measured, rel=0.10)


def activations_estimated_and_saved(config, overrides: list[str], device: str) -> tuple[int, int]:
    """lm2 info's activation bytes and those autograd saves in one micro-batch, fp32 on CPU, bf16 on CUDA
    (tests/pipeline/test_gpu.py)."""
    from lm2.model.lm import LM2Model, mean_loss
    from lm2.pipeline.parallel.mpu import tensor_parallel

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    run = load_config(config, overrides + ["train.global_batch=16"])
    model = LM2Model(run.model, tensor_parallel(dtype)).to(device)
    tokens = torch.randint(0, run.model.vocab_size, (run.train.micro_batch, run.model.row_length), device=device)
    measured = saved_activation_bytes(model, lambda: mean_loss(model(tokens), tokens))
    estimate = memory_estimate(run, dp=1, params_bytes=dtype.itemsize, device=device).activations
    return estimate, measured


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _measure_training_peak(overrides: list[str], out: str) -> None:
    import gc

    from lm2.pipeline.parallel.init import init_distributed
    from lm2.pipeline.train.engine import build_engine
    from lm2.pipeline.train.step import train_step

    run = load_config(TINY, overrides)
    dims = init_distributed()
    rows = torch.randint(0, run.model.vocab_size, (run.train.global_batch, run.model.row_length + 1))
    micro_batches = [(r[:, :-1], r[:, 1:]) for r in rows.split(run.train.micro_batch)]
    gc.collect()
    before = _rss_bytes()
    # The process's high-water mark (ru_maxrss) may come from start-up, before the engine exists: sample the RSS
    # of the engine's build and steps instead.
    samples, done = [before], threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            samples.append(_rss_bytes())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        engine = build_engine(run, dims)
        for _ in range(2):
            train_step(engine, micro_batches)
        # DeepSpeed's own 5e8-element bucket: pages untouched on CPU, but 1 GB of a GPU in bf16 (test_gpu.py)
        assert engine.deepspeed.optimizer.reduce_bucket_size == reduce_bucket_elements(run) < 5e8
    finally:
        done.set()
        sampler.join()
    Path(out).write_text(json.dumps({"peak": max(samples) - before, "before": before, "samples": len(samples)}))


def test_memory_estimate_matches_the_peak_memory_of_a_training_step(tmp_path, monkeypatch):
    # glibc returns big freed blocks to the kernel at once, so RSS follows the tensors' bytes.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    overrides = [
        "model.hidden_size=256",
        "model.vocab_size=16384",
        "train.global_batch=8",
        "train.micro_batch=4",
        "parallel.zero_stage=1",
        "train.precision=fp32",
    ]
    out = tmp_path / "peak.json"
    run_distributed(_measure_training_peak, world_size=1, args=(overrides, str(out)), fresh=True)
    measured = json.loads(out.read_text())
    assert measured["samples"] > 100  # the sampler saw the build and the steps
    estimate = memory_estimate(load_config(TINY, overrides), dp=1, params_bytes=4, device="cpu")
    assert estimate.total == pytest.approx(measured["peak"], rel=0.25), (estimate, measured)


def test_zero_stages_partition_what_they_should():
    run = load_config(TINY, ["parallel.zero_stage=0", "train.global_batch=64"])
    stages = {
        zero: memory_estimate(
            load_config(TINY, [f"parallel.zero_stage={zero}", "train.global_batch=64"]), dp=4, params_bytes=2
        )
        for zero in (0, 1, 2, 3)
    }
    assert stages[1].optimizer * 4 == pytest.approx(stages[0].optimizer, rel=1e-6)  # 16 bytes/param, split in 4
    assert stages[2].gradients * 4 == pytest.approx(stages[1].gradients, rel=1e-6)
    assert stages[3].weights * 4 == pytest.approx(stages[2].weights, rel=1e-6)
    assert stages[0].activations == stages[3].activations
    bucket = reduce_bucket_elements(run) * 2  # ZeRO-1/2's gradient bucket: the device's parameters, in bf16
    assert [stages[zero].gradient_bucket for zero in (0, 1, 2, 3)] == [0, bucket, bucket, 0]
    assert stages[1].total - stages[0].total == bucket + stages[1].optimizer - stages[0].optimizer
    assert tokens_per_s_per_device(run, mfu=0.5, peak_tflops=2.0) == pytest.approx(
        0.5 * 2e12 / (3 * forward_flops_per_token(run.model))
    )


@pytest.mark.parametrize(
    "zero,precision", [(0, "fp32"), (0, "bf16"), (1, "fp32"), (2, "bf16"), (3, "fp32")], ids=lambda v: str(v)
)
def test_the_staging_estimate_is_what_a_save_writes(single_process, tmp_path, zero, precision):
    """checkpoint.async_save stages what the rank writes: the estimate against the bytes of a real checkpoint's
    model and optimizer files after a step (their pickles add a few % on a model this small)."""
    from lm2.pipeline.checkpoint.format import Manifest
    from lm2.pipeline.checkpoint.save import Retention, save
    from lm2.pipeline.train.engine import build_engine
    from lm2.pipeline.train.step import train_step

    overrides = [f"parallel.zero_stage={zero}", f"train.precision={precision}", "checkpoint.async_save=true"]
    run = load_config(TEST_CONFIG, overrides)
    engine = build_engine(run, single_process)
    rows = torch.randint(0, run.model.vocab_size, (engine.grad_accum, run.train.micro_batch, run.model.row_length + 1))
    train_step(engine, [(r[:, :-1], r[:, 1:]) for r in rows])  # AdamW's moments exist from the first step
    folder = save(engine, tmp_path, Manifest(step=1, layout=engine.layout, config=run.to_dict()), Retention(1))
    written = sum(p.stat().st_size for p in folder.glob("*.pt") if not p.name.startswith("rng_"))
    estimate = memory_estimate(run, dp=1, params_bytes=4 if precision == "fp32" else 2).staging
    assert estimate == checkpoint_bytes(run, 1, 4 if precision == "fp32" else 2)
    assert estimate <= written <= 1.08 * estimate


def test_the_staging_estimate_counts_carried_lanes_and_only_async_saves():
    run = load_config(TEST_CONFIG, ["checkpoint.async_save=true"])
    carrying = load_config(TEST_CONFIG, ["checkpoint.async_save=true", "train.carry.mode=state"])
    lanes = memory_estimate(carrying, dp=1, params_bytes=4).carried // 2  # the saved table of the two
    assert checkpoint_bytes(carrying, 1, 4) - checkpoint_bytes(run, 1, 4) == lanes > 0
    assert memory_estimate(load_config(TEST_CONFIG), dp=1, params_bytes=4).staging == 0


def test_info_prints_the_estimate_and_refuses_a_batch_that_does_not_split():
    overrides = ["parallel.zero_stage=2", "train.micro_batch=2", "train.peak_tflops=100", "checkpoint.async_save=true"]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm2.pipeline.cli",
            "info",
            "--config",
            str(TINY),
            *overrides,
            "--world-size",
            "2",
            "--mfu",
            "0.5",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    run = load_config(TINY, overrides)
    total = memory_estimate(run, dp=2, params_bytes=2).total
    assert f"total           {total / 2**20:.1f} MiB" in out and "ZeRO-2" in out and "bf16" in out
    staging = memory_estimate(run, dp=2, params_bytes=2).staging
    assert f"host memory       {staging / 2**20:.1f} MiB per rank for asynchronous saves" in out
    assert f"{tokens_per_s_per_device(run, 0.5, 100):,.0f} at MFU 50%" in out
    bad = subprocess.run(
        [sys.executable, "-m", "lm2.pipeline.cli", "info", "--config", str(TINY), "--world-size", "3"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "global_batch=16 must be a multiple" in bad.stderr and "Traceback" not in bad.stderr
