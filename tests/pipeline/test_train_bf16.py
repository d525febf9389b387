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
    common = train_data + [
        f"train.steps={STEPS}",
        "train.log_every=1",
        "logging.wandb=disabled",
        f"checkpoint.every={STEPS}",
    ]
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


@pytest.mark.parametrize("memory", [True, False])
def test_a_model_built_in_bf16_computes_in_bf16_without_deepspeed(single_process, memory):
    """The plain-PyTorch reference of bench/train_step.py and the GPU tests build the model in bf16 themselves
    (DeepSpeed's engine casts its module anyway): every weight, the logits and every gradient stay bf16."""
    from lm2.model.lm import LM2Model, mean_loss
    from lm2.pipeline.config import load_config
    from lm2.pipeline.parallel.mpu import tensor_parallel
    from tests.pipeline.test_train_run import CONFIG

    cfg = load_config(CONFIG, [f"model.memory.enabled={str(memory).lower()}"]).model
    model = LM2Model(cfg, tensor_parallel(torch.bfloat16))
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.row_length))
    logits = model(tokens)
    mean_loss(logits, tokens).backward()
    assert logits.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {p.grad.dtype for p in model.parameters()} == {torch.bfloat16}
