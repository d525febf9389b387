"""GPU readiness on CPU: `train.precision=bf16` (what `auto` picks on a GPU) trains through DeepSpeed's bf16
optimizer: bf16 weights in the model, fp32 master weights in the optimizer state, losses that follow fp32's
within bf16 rounding but are not fp32's."""

import json

import pytest
import torch

from tests.pipeline.test_train_run import train_cli

STEPS = 4


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(state: dict) -> list[torch.Tensor]:
    return [v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]


def test_bf16_trains_with_bf16_weights_and_fp32_master_weights(train_data, tmp_path):
    common = train_data + [f"train.steps={STEPS}", "train.log_every=1", "logging.wandb=disabled",
                           f"checkpoint.every={STEPS}"]
    for precision in ("fp32", "bf16"):
        result = train_cli(tmp_path / precision, common + [f"train.precision={precision}"])
        assert result.returncode == 0, result.stderr[-3000:]
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert len(bf16) == STEPS and bf16 != fp32
    assert bf16 == pytest.approx(fp32, rel=2e-3)  # bf16 keeps 8 bits of mantissa; the loss itself is fp32
    step = tmp_path / "bf16" / "checkpoints" / f"step_{STEPS:08d}"
    module = torch.load(step / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert {v.dtype for v in weights(module)} == {torch.bfloat16}
    optim = torch.load(next(step.glob("bf16_zero_*optim_states.pt")), map_location="cpu", weights_only=False)
    masters = optim["optimizer_state_dict"]["single_partition_of_fp32_groups"]
    assert masters and all(t.dtype == torch.float32 for t in masters)
    assert sum(t.numel() for t in masters) == sum(v.numel() for v in weights(module))
