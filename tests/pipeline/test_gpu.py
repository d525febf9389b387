"""The GPU path: nccl, bf16 weights, SDPA's flash kernel, the same training as on CPU. `make test-gpu` runs
these on a machine with a CUDA device; without one they skip (CI runs `-m "not gpu"`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from tests.pipeline.test_train_run import CONFIG  # noqa: E402  (after the skip marks: import is cheap anyway)

STEPS = 4


def train(run_dir, overrides, cuda: bool) -> list[float]:
    env = dict(os.environ, **({} if cuda else {"CUDA_VISIBLE_DEVICES": ""}))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm2.pipeline.cli",
            "train",
            "--config",
            str(CONFIG),
            f"logging.run_dir={run_dir}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_one_gpu_trains_in_bf16_like_the_cpu_in_fp32(train_data, tmp_path):
    common = train_data + [
        f"train.steps={STEPS}",
        "train.log_every=1",
        "logging.wandb=disabled",
        f"checkpoint.every={STEPS}",
    ]
    gpu = train(tmp_path / "gpu", common, cuda=True)  # precision auto: bf16, nccl
    cpu = train(tmp_path / "cpu", common, cuda=False)  # precision auto: fp32, gloo
    assert gpu == pytest.approx(cpu, rel=2e-2)
    module = torch.load(
        tmp_path / "gpu" / "checkpoints" / f"step_{STEPS:08d}" / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=False,
    )["module"]
    assert {v.dtype for v in module.values() if isinstance(v, torch.Tensor) and v.is_floating_point()} == {
        torch.bfloat16
    }


@pytest.mark.parametrize("stage", [1, 2])
def test_a_run_resumed_on_the_gpu_continues_the_same_training(train_data, tmp_path, stage):
    """A ZeRO-1 run saves at step 3; resumed from there at ZeRO-1 (DeepSpeed's own shards) or ZeRO-2 (through a
    universal checkpoint, whose Adam step the conversion leaves on the CPU), it logs the uninterrupted run's losses
    for steps 4-8: the fused AdamW's moments and step come back on the GPU."""
    common = train_data + ["train.steps=8", "train.log_every=1", "logging.wandb=disabled", "checkpoint.every=3"]
    reference = train(tmp_path / "reference", common, cuda=True)
    saved = tmp_path / "reference" / "checkpoints" / "step_00000003"
    resumed = train(tmp_path / "resumed", common + [f"parallel.zero_stage={stage}", "--resume", str(saved)], cuda=True)
    assert resumed == pytest.approx(reference[3:], rel=1e-2)


def test_model_runs_on_the_flash_kernel_and_agrees_with_the_math_kernel(single_process):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lm2.model.lm import LM2Model
    from lm2.pipeline.config import load_config
    from lm2.pipeline.parallel.mpu import tensor_parallel

    assert torch.distributed.get_backend() == "nccl"
    cfg = load_config(CONFIG).model
    model = LM2Model(cfg, tensor_parallel(torch.bfloat16)).cuda()
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.row_length), device="cuda")
    with torch.no_grad():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if flash cannot take these inputs
            flash = model(tokens).float()
        with sdpa_kernel([SDPBackend.MATH]):
            math = model(tokens).float()
    assert flash.isfinite().all()
    torch.testing.assert_close(flash, math, rtol=3e-2, atol=3e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensor_parallel_over_nccl_matches_one_gpu(train_data, tmp_path):
    from tests.pipeline.test_checkpoint_resume import finish, launch

    common = train_data + [f"train.steps={STEPS}", "train.log_every=1", "checkpoint.every=0"]
    finish(launch(tmp_path / "tp1", 1, common), tmp_path / "tp1")
    finish(launch(tmp_path / "tp2", 2, common + ["parallel.tp=2"]), tmp_path / "tp2")
    losses = {
        name: [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("tp1", "tp2")
    }
    assert losses["tp2"] == pytest.approx(losses["tp1"], rel=2e-2)


def test_train_step_bench_runs_on_the_gpu():
    from tests.test_bench import SMALL, check_report, train_step_bench

    report = train_step_bench(*SMALL)
    assert report["device"].startswith("cuda") and report["dtype"] == "torch.bfloat16"
    check_report(report, SMALL)


# tiny.yaml, whose CPU counts the estimate was fitted to, and two other shapes: on the GPU the attentions are SDPA
# kernels, which save other tensors than the CPU's explicit softmax.
GPU_SHAPES = [
    [],
    [
        "model.hidden_size=512",
        "model.ffn_hidden_size=1376",
        "model.num_heads=8",
        "model.num_kv_heads=4",
        "model.row_length=1024",
        "model.memory.slots=64",
        "train.micro_batch=2",
    ],
    ["model.num_layers=6", "model.memory.layers=[1,3]", "model.segment_length=32"],
]


@pytest.mark.parametrize("overrides", GPU_SHAPES)
def test_activation_estimate_matches_what_autograd_saves_on_the_gpu(single_process, overrides):
    from tests.pipeline.test_train_plan import TINY, activations_estimated_and_saved

    estimate, measured = activations_estimated_and_saved(TINY, overrides, "cuda")
    print(f"activations {overrides}: estimate {estimate:,} measured {measured:,} ({estimate / measured:.3f})")
    assert estimate == pytest.approx(measured, rel=0.10)


def test_memory_estimate_matches_the_peak_allocated_by_a_training_step_on_the_gpu(single_process):
    """The whole estimate of `lm2 info` (bf16 weights and gradients, ZeRO-1's fp32 master copy, AdamW moments and
    gradient bucket, one micro-batch's activations) against the peak bytes the CUDA allocator handed out for
    building the engine and two steps: unlike RSS on CPU this is exact, but it includes transient buffers (the
    logits' softmax, DeepSpeed's gradient copies), hence the tolerance."""
    from lm2.pipeline.config import load_config
    from lm2.pipeline.train.engine import build_engine
    from lm2.pipeline.train.plan import memory_estimate
    from lm2.pipeline.train.step import train_step
    from tests.pipeline.test_train_plan import TINY

    overrides = [
        "model.hidden_size=512",
        "model.vocab_size=16384",
        "train.global_batch=8",
        "train.micro_batch=4",
        "parallel.zero_stage=1",
    ]  # precision auto: bf16 on the GPU
    run = load_config(TINY, overrides)
    rows = torch.randint(0, run.model.vocab_size, (run.train.global_batch, run.model.row_length + 1), device="cuda")
    micro_batches = [(r[:, :-1], r[:, 1:]) for r in rows.split(run.train.micro_batch)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    engine = build_engine(run, single_process)
    for _ in range(2):
        train_step(engine, micro_batches)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    estimate = memory_estimate(run, dp=1, params_bytes=2, device="cuda")
    print(f"training peak: estimate {estimate.total:,} measured {peak:,} ({estimate.total / peak:.3f}); {estimate}")
    assert estimate.total == pytest.approx(peak, rel=0.25)


def test_evaluation_on_the_gpu_gives_the_cpus_perplexity(hf_lm2, prepared, tmp_path):
    """`lm2 eval` picks the GPU by itself; in fp32 there it scores what the CPU scores. BABILong runs there too
    (its greedy answers are not compared: an untrained model's logits are near ties)."""
    from lm2.pipeline.eval.babilong.babi import HELDOUT_FOLDER
    from lm2.pipeline.eval.babilong.evaluate import run
    from lm2.pipeline.eval.hf_model import eval_device
    from lm2.pipeline.eval.perplexity import perplexity

    assert eval_device(None).type == "cuda"
    on_gpu, _ = perplexity(str(hf_lm2), [str(prepared)], progress=False)
    on_cpu, _ = perplexity(str(hf_lm2), [str(prepared)], progress=False, device="cpu")
    assert on_gpu.tokens == on_cpu.tokens and on_gpu.loss == pytest.approx(on_cpu.loss, rel=1e-4)
    corpus = Path(__file__).parents[2] / "corpus"
    results = run(str(hf_lm2), ["qa1"], ["0k", "300"], 3, HELDOUT_FOLDER, corpus, tmp_path, progress=False)
    assert [cell["samples"] for cell in results["cells"]] == [3, 3]
