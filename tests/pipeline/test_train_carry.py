"""Carried memory through the engine (pipeline/train/carry.py): with gradient accumulation, every ZeRO stage,
activation checkpointing, train.compile and bf16 it trains what the plain engine with carry trains, and carrying
changes the training (the lanes do carry); a resume that cannot map the lanes is refused, and --reset-memory
resumes with every lane fresh. The bit-identical SIGKILL resumes with carry (1 process, TP=2, PP=2, DP=2) are in
test_checkpoint_resume.py."""

import time
from pathlib import Path

import pytest
import torch

from lm2.pipeline.config import load_config
from lm2.pipeline.train.carry import CarriedMemory
from lm2.pipeline.train.engine import build_engine
from lm2.pipeline.train.step import train_step
from tests.pipeline.test_train_run import train_cli

CONFIG = Path(__file__).parent / "tiny_train.yaml"
STEPS = 3


def carried_run(overrides: list[str], dims) -> tuple[torch.Tensor, torch.Tensor]:
    """STEPS steps of 4 micro-batches of 2 rows, memory carried in state mode (a reset now and then): the losses,
    and every lane's carried state at the end."""
    run = load_config(CONFIG, ["train.carry.mode=state", "train.carry.reset=0.3", *overrides])
    engine = build_engine(run, dims)
    carry = CarriedMemory.of_engine(engine, run)
    rows = torch.randint(0, 400, (STEPS, 8, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for step, batch in enumerate(rows):
        batches = [{"input_ids": r[:, :-1], "labels": r[:, 1:]} for r in batch.split(run.train.micro_batch)]
        losses.append(train_step(engine, carry.micro_batches(step, batches))[0].float())
        carry.commit()
    states = [memory.lane_states.current.float().flatten() for memory in carry.memories.values()]
    return torch.stack(losses), torch.cat(states)


OPTIONS = {
    "zero0": ["parallel.zero_stage=0"],
    "zero2": ["parallel.zero_stage=2"],
    "zero3": ["parallel.zero_stage=3"],
    "checkpointing": ["train.activation_checkpointing=true"],
    "compile": ["train.compile=true", "train.activation_checkpointing=true", "parallel.zero_stage=3"],
}


@pytest.mark.parametrize(
    "option",
    [*(name for name in OPTIONS if name != "compile"), "bf16", pytest.param("compile", marks=pytest.mark.slow)],
)
def test_carry_trains_alike_with_every_engine_option(single_process, option):
    reference = carried_run([], single_process)
    result = carried_run(OPTIONS.get(option, ["train.precision=bf16"]), single_process)
    tolerance = 2e-2 if option == "bf16" else 1e-5  # bf16 keeps 8 bits of mantissa
    for ours, theirs in zip(result, reference):  # the losses, then the lanes' states
        torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)
    if option == "zero0":  # once: the lanes' states do depend on what was carried, so the check above can fail
        fresh = carried_run(["train.carry.reset=1.0"], single_process)
        assert (fresh[1] - reference[1]).abs().max() > 0.1


def test_a_resume_that_cannot_map_the_lanes_is_refused_unless_memory_is_reset(train_data, tmp_path):
    base = train_data + ["logging.wandb=disabled", "train.carry.mode=state", "checkpoint.every=2"]
    first = train_cli(tmp_path, base + ["train.steps=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    other_lanes = base + ["train.steps=4", "train.micro_batch=4", "checkpoint.resume=auto", "--override-schedule"]
    refused = train_cli(tmp_path, other_lanes)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("lm2 train:")]
    assert refused.returncode == 2 and len(errors) == 1 and "--reset-memory" in errors[0], refused.stderr[-3000:]
    assert "cannot be mapped" in errors[0]
    reset = train_cli(tmp_path, other_lanes + ["--reset-memory"])
    assert reset.returncode == 0 and "resumed from step 2" in reset.stdout, reset.stderr[-3000:]
    final = torch.load(tmp_path / "checkpoints" / "step_00000004" / "carry_rank_00000.pt", weights_only=True)
    assert final["blocks"][0].shape[0] == 8 and final["started"]  # global batch 8 on one rank: 8 lanes, carried


@pytest.mark.slow
def test_a_resume_at_another_tp_degree_reslices_the_carried_memory_by_heads(train_data, tmp_path):
    """TP=1 (ZeRO-1) killed after its step-3 checkpoint; TP=2 resumes it through a universal checkpoint: at the end
    its two ranks' lane states, joined along the heads, are those of an uninterrupted TP=1 run (and so are the
    losses)."""
    from lm2.pipeline.checkpoint.format import MANIFEST
    from tests.pipeline.test_checkpoint_resume import STEPS, finish, kill_job, launch, logged_losses

    overrides = train_data + ["train.carry.mode=state", "checkpoint.every=3"]
    reference, resharded = tmp_path / "reference", tmp_path / "resharded"
    finish(launch(reference, 1, overrides), reference)
    process = launch(resharded, 1, overrides)
    while not (resharded / "checkpoints" / "step_00000003" / MANIFEST).exists():
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    kill_job(process)
    step3 = str(resharded / "checkpoints" / "step_00000003")
    finish(launch(resharded, 2, overrides + ["parallel.tp=2", "--resume", step3]), resharded)
    assert "resumed from step 3" in (tmp_path / "resharded.log").read_text()
    ours, theirs = logged_losses(resharded), logged_losses(reference)
    assert ours.keys() == theirs.keys()
    assert [ours[s] for s in sorted(ours)] == pytest.approx([theirs[s] for s in sorted(theirs)], rel=1e-5, abs=1e-5)
    final = f"checkpoints/step_{STEPS:08d}"
    expected = torch.load(reference / final / "carry_rank_00000.pt", weights_only=True)["blocks"]
    shards = [torch.load(resharded / final / f"carry_rank_{rank:05d}.pt", weights_only=True) for rank in range(2)]
    shards.sort(key=lambda shard: shard["tp_rank"])
    for layer, state in expected.items():
        joined = torch.cat([shard["blocks"][layer] for shard in shards], dim=1)
        torch.testing.assert_close(joined, state, rtol=1e-4, atol=1e-5)


def test_the_memory_estimate_counts_the_lanes_states(single_process):
    """lm2 info's carried-memory bytes are those the lanes' states allocate (both tables, every memory block)."""
    from lm2.pipeline.train.plan import memory_estimate

    run = load_config(CONFIG, ["train.carry.mode=document"])
    engine = build_engine(run, single_process)
    carry = CarriedMemory.of_engine(engine, run)
    allocated = sum(
        t.numel() * t.element_size()
        for m in carry.memories.values()
        for t in (m.lane_states.current, m.lane_states.next)
    )
    assert memory_estimate(run, 1, 4, "cpu").carried == allocated > 0
    assert memory_estimate(load_config(CONFIG), 1, 4, "cpu").carried == 0
