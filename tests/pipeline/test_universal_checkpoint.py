"""Universal checkpoints resume ZeRO training at another data-parallel size (and TP / PP degree): train 3 steps,
save, convert with lm2.pipeline.checkpoint.universal, resume at the new layout for 3 more steps; the losses and final
weights match an uninterrupted single-process run, and the weights right after loading are exactly those saved."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lm2.model.errors import CheckpointError
from lm2.pipeline.checkpoint.universal import (
    convert_to_universal,
    convert_to_universal_on_rank0,
    load_universal,
    universal_checkpoint_info,
)
from lm2.pipeline.config import load_config
from lm2.pipeline.parallel.init import init_distributed
from lm2.pipeline.train.engine import build_engine, full_model_state
from lm2.pipeline.train.step import train_step
from tests.distributed import run_distributed
from tests.pipeline.test_train_parity import CONFIG, micro_batches

SAVE_AT = 3


def _snapshot(engine, cfg) -> dict:
    """Collective: the full weights, DeepSpeed's step counter and the learning rates."""
    return {
        "state": full_model_state(engine, cfg.model.vocab_size, cfg.model.num_layers),
        "global_steps": engine.deepspeed.global_steps,
        "lr": engine.deepspeed.get_lr(),
    }


def _save(engine, cfg, checkpoint_dir: str, tag: str) -> None:
    info = universal_checkpoint_info(engine, cfg.model)
    engine.deepspeed.save_checkpoint(checkpoint_dir, tag, client_state={"universal_checkpoint_info": info})


def _train(engine, cfg, first: int, last: int) -> list[float]:
    return [train_step(engine, micro_batches(cfg, step))[0].item() for step in range(first, last)]


def _run(overrides: list[str], checkpoint_dir: str, load_tag: str | None, save_tag: str | None, out: str) -> None:
    """Loads `load_tag` (universal) or starts fresh; trains to step SAVE_AT and saves + converts `save_tag` on
    rank 0 (others wait), or trains on to the end. Rank 0 writes losses and snapshots to `out`."""
    cfg = load_config(CONFIG, overrides)
    engine = build_engine(cfg, init_distributed(cfg.parallel.tp, cfg.parallel.pp))
    result = {}
    if load_tag is not None:
        load_universal(engine, checkpoint_dir, load_tag)
        result["loaded"] = _snapshot(engine, cfg)
    if save_tag is not None:
        result["losses"] = _train(engine, cfg, engine.deepspeed.global_steps, SAVE_AT)
        _save(engine, cfg, checkpoint_dir, save_tag)
        result["converted"] = convert_to_universal_on_rank0(checkpoint_dir, save_tag)
        result["saved"] = _snapshot(engine, cfg)
    else:
        result["losses"] = _train(engine, cfg, SAVE_AT, cfg.train.steps)
        result["final"] = _snapshot(engine, cfg)
    if dist.get_rank() == 0:
        torch.save(result, out)


def _single_process(checkpoint_dir: str, load_tag: str, save_tag: str, out: str) -> None:
    """A world of one runs the uninterrupted reference, then resumes `load_tag` at DP=1 (ZeRO-2), saving and
    converting `save_tag` right after loading (the conversion outside any process group)."""
    dims = init_distributed()
    reference_cfg = load_config(CONFIG, ["parallel.zero_stage=0"])
    reference = build_engine(reference_cfg, dims)
    with pytest.raises(CheckpointError, match="ZeRO stage 1 and 2"):
        universal_checkpoint_info(reference, reference_cfg.model)
    reference_losses = _train(reference, reference_cfg, 0, reference_cfg.train.steps)
    reference.deepspeed.save_checkpoint(checkpoint_dir, "no-info")  # saved without universal_checkpoint_info
    with pytest.raises(CheckpointError, match="no universal_checkpoint_info"):
        convert_to_universal(checkpoint_dir, "no-info")
    result = {"reference": {"losses": reference_losses, **_snapshot(reference, reference_cfg)}}

    cfg = load_config(CONFIG, ["parallel.zero_stage=2"])
    engine = build_engine(cfg, dims)
    load_universal(engine, checkpoint_dir, load_tag)
    result["loaded"] = _snapshot(engine, cfg)
    _save(engine, cfg, checkpoint_dir, save_tag)
    result["converted"] = convert_to_universal(checkpoint_dir, save_tag)
    result["losses"] = _train(engine, cfg, SAVE_AT, cfg.train.steps)
    result["final"] = _snapshot(engine, cfg)
    torch.save(result, out)


def _job(tmp_path: Path, name: str, world_size: int, func, *args) -> dict:
    out = str(tmp_path / f"{name}.pt")
    run_distributed(func, world_size=world_size, args=(*args, out))
    return torch.load(out, weights_only=False)


def assert_resumed_exactly(loaded: dict, saved: dict) -> None:
    """Right after loading: the weights are bit-identical to those saved, the step and LR carry over."""
    assert loaded["global_steps"] == saved["global_steps"] == SAVE_AT
    assert loaded["lr"] == saved["lr"]
    assert loaded["state"].keys() == saved["state"].keys()
    for name, tensor in saved["state"].items():
        assert torch.equal(loaded["state"][name], tensor), name


def assert_matches_reference(losses: list[float], final: dict, reference: dict) -> None:
    """Same tolerances as the parity tests: DP ranks sum gradients in another order than one process."""
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference["losses"]), rtol=1e-5, atol=1e-5)
    assert final["global_steps"] == len(reference["losses"])
    for name, tensor in reference["state"].items():
        torch.testing.assert_close(
            final["state"][name], tensor, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_zero2_dp2_checkpoint_resumes_at_dp1_and_back_at_dp2_zero1(tmp_path):
    ckpt = str(tmp_path / "checkpoints")
    # DP=2 ZeRO-2: 3 steps, save, rank 0 converts while rank 1 waits.
    first = _job(tmp_path, "dp2", 2, _run, ["parallel.zero_stage=2"], ckpt, None, "dp2")
    assert first["converted"] == "dp2_universal"
    assert (Path(ckpt) / "latest_universal").read_text() == "dp2_universal"
    assert not [p for p in Path(ckpt).iterdir() if p.name.startswith(".")]  # no temp folders left

    # DP=1 ZeRO-2 resumes it (and saves again, converted outside a distributed job); the reference run.
    single = _job(tmp_path, "dp1", 1, _single_process, ckpt, "dp2_universal", "dp1")
    reference = single["reference"]
    assert_resumed_exactly(single["loaded"], first["saved"])
    assert_matches_reference(first["losses"] + single["losses"], single["final"], reference)

    # DP=2 ZeRO-1 resumes the DP=1 checkpoint.
    last = _job(tmp_path, "dp2-again", 2, _run, ["parallel.zero_stage=1"], ckpt, single["converted"], None)
    assert_resumed_exactly(last["loaded"], first["saved"])
    assert_matches_reference(first["losses"] + last["losses"], last["final"], reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from tests.pipeline.test_train_parity import train

    return train(tmp_path_factory.mktemp("reference"), 1, ["parallel.zero_stage=0"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "save,load",
    [
        ((4, ["parallel.pp=2", "parallel.zero_stage=1"]), (2, ["parallel.pp=2", "parallel.zero_stage=1"])),
        ((2, ["parallel.tp=2", "parallel.zero_stage=1"]), (2, ["parallel.pp=2", "parallel.zero_stage=1"])),
        ((2, ["parallel.zero_stage=2"]), (2, ["parallel.tp=2", "parallel.zero_stage=2"])),
    ],
    ids=["pp2xdp2-to-pp2xdp1", "tp2-to-pp2", "dp2-to-tp2"],
)
def test_universal_checkpoint_changes_pp_and_tp(tmp_path, reference, save, load):
    ckpt = str(tmp_path / "checkpoints")
    first = _job(tmp_path, "save", save[0], _run, save[1], ckpt, None, "saved")
    resumed = _job(tmp_path, "load", load[0], _run, load[1], ckpt, first["converted"], None)
    assert_resumed_exactly(resumed["loaded"], first["saved"])
    assert_matches_reference(first["losses"] + resumed["losses"], resumed["final"], reference)
