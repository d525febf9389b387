"""What the optimizer really applied, read back from the checkpoints of a real run: the learning rate of every
step (logged, and recomputed from the config on resume, where a changed schedule is refused unless
--override-schedule) and the clipped gradient."""

import json

import pytest
import torch

from lm2.pipeline.config import load_config
from lm2.pipeline.train.engine import lr_factor
from tests.pipeline.test_checkpoint_resume import checkpoint_tensors
from tests.pipeline.test_train_run import CONFIG, train_cli

# Adam with beta1 = beta2 = 0 and no weight decay moves every weight by lr * g / (|g| + eps): the largest move
# of a step is its learning rate (to about eps / max|g|).
SIGN_ADAM = [
    "optim.beta1=0.0",
    "optim.beta2=0.0",
    "optim.weight_decay=0.0",
    "optim.warmup_steps=2",
    "optim.min_lr=0.0001",
]
EVERY_STEP = ["train.log_every=1", "checkpoint.every=1", "checkpoint.keep=20", "logging.wandb=disabled"]


def weights(run_dir, step):
    state = torch.load(
        run_dir / f"checkpoints/step_{step:08d}/mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )["module"]
    return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}  # not _extra_state


def applied_lr(run_dir, step):
    """The largest change of any weight in optimizer step `step` (1-based), i.e. the LR that step applied."""
    before, after = weights(run_dir, step - 1), weights(run_dir, step)
    return max((after[name] - before[name]).abs().max().item() for name in after)


def logged_lrs(run_dir):
    return {e["step"]: e["lr"] for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_resume_refuses_a_changed_schedule_and_follows_the_config_with_override(train_data, tmp_path):
    first = train_cli(tmp_path, train_data + SIGN_ADAM + EVERY_STEP + ["train.steps=4", "optim.lr=0.003"])
    assert first.returncode == 0, first.stderr[-3000:]
    longer = train_data + SIGN_ADAM + EVERY_STEP + ["train.steps=8", "optim.lr=0.001", "--resume", "auto"]

    refused = train_cli(tmp_path, longer)
    assert refused.returncode != 0
    message = refused.stderr.strip().splitlines()[-1]
    assert "train.steps=4 -> 8" in message and "optim.lr=0.003 -> 0.001" in message, refused.stderr[-3000:]
    assert "--override-schedule" in message and "optim.min_lr" not in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [f"step_{s:08d}" for s in range(1, 5)]

    resumed = train_cli(tmp_path, longer + ["--override-schedule"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    old = load_config(CONFIG, SIGN_ADAM + ["train.steps=4", "optim.lr=0.003"])
    new = load_config(CONFIG, SIGN_ADAM + ["train.steps=8", "optim.lr=0.001"])
    logged = logged_lrs(tmp_path)
    for step in range(2, 9):
        run = old if step <= 4 else new
        expected = run.optim.lr * lr_factor(step - 1, run.optim, run.train.steps)
        assert applied_lr(tmp_path, step) == pytest.approx(expected, rel=1e-3), step
        assert logged[step] == pytest.approx(applied_lr(tmp_path, step), rel=1e-3), step


def optimizer_first_moment_norm(run_dir, step):
    """The global norm of Adam's exp_avg after `step`: (1 - beta1) times the gradient that step consumed."""
    tensors = checkpoint_tensors(run_dir / f"checkpoints/step_{step:08d}")
    moments = [t for key, t in tensors.items() if key.endswith("/exp_avg")]
    assert moments
    return torch.sqrt(sum((t.double() ** 2).sum() for t in moments)).item()


@pytest.mark.parametrize("clip", [1e-3, pytest.param(0.0, marks=pytest.mark.slow)])
def test_the_optimizer_consumes_the_clipped_gradient(train_data, tmp_path, clip):
    """One step whose gradient norm is far above optim.grad_clip: Adam's first moment holds exactly the clipped
    gradient, (1 - beta1) * grad_clip in norm; with clipping off it holds the logged (pre-clip) norm."""
    result = train_cli(
        tmp_path,
        train_data
        + [
            "train.steps=1",
            "train.log_every=1",
            f"optim.grad_clip={clip}",
            "optim.beta1=0.9",
            "logging.wandb=disabled",
        ],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    grad_norm = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["grad_norm"]
    assert grad_norm > 100 * 1e-3
    consumed = optimizer_first_moment_norm(tmp_path, 1) / (1 - 0.9)
    assert consumed == pytest.approx(clip if clip else grad_norm, rel=1e-4)
