"""A curriculum (train.stages): stages switch data and row length at their steps, checkpoints record the stage, and
a resume from any step, within a stage or at its end, continues bit-identically."""

import json
import shutil

import pytest
import torch

from tests.pipeline.test_checkpoint_resume import checkpoint_tensors
from tests.pipeline.test_train_run import train_cli

STEPS = 6


@pytest.fixture(scope="module")
def stages(text_inputs, train_data, tmp_path_factory):
    """Overrides of a two-stage curriculum: 3 steps of samples up to 2 segments (rows of 16), then 3 of up to 4
    (rows of 32, the model's row length), each stage on its own data."""
    from lm2.pipeline.data.prepare import prepare

    tokenizer = next(item.split("=", 1)[1] for item in train_data if item.startswith("data.tokenizer="))
    folder = tmp_path_factory.mktemp("stages")
    for rows in (16, 32):
        prepare([text_inputs], folder / f"rows{rows}", tokenizer, row_length=rows, val_fraction=0.25, progress=False)
    curriculum = (
        f"train.stages=[{{steps: 3, segments: 2, streams: [{{path: {folder / 'rows16'}}}]}}, "
        f"{{steps: 3, segments: 4, streams: [{{path: {folder / 'rows32'}}}]}}]"
    )
    return train_data + [curriculum, f"train.steps={STEPS}", "train.log_every=1", "logging.wandb=disabled"]


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_stages_switch_data_and_row_length_at_their_steps(stages, tmp_path):
    result = train_cli(tmp_path, stages + ["checkpoint.every=3"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage 2/2 from step 4: samples of up to 4 segments (32 tokens)" in result.stdout
    tokens = [entry["tokens"] for entry in metrics(tmp_path)]
    assert tokens == [8 * 16 * step for step in (1, 2, 3)] + [8 * 16 * 3 + 8 * 32 * step for step in (1, 2, 3)]
    for step, stage in ((3, 0), (6, 1)):
        manifest = json.loads((tmp_path / "checkpoints" / f"step_{step:08d}" / "lm2_manifest.json").read_text())
        assert manifest["stage"] == stage and manifest["tokens"] == tokens[step - 1]


@pytest.mark.parametrize("resume_at", [2, 3, 4])  # within the first stage, at its end, within the second
def test_a_resume_anywhere_in_the_curriculum_is_bit_identical(stages, tmp_path, resume_at):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert train_cli(reference, stages + ["checkpoint.every=1", f"checkpoint.keep={STEPS}"]).returncode == 0
    shutil.copytree(
        reference / "checkpoints" / f"step_{resume_at:08d}", resumed / "checkpoints" / f"step_{resume_at:08d}"
    )
    result = train_cli(resumed, stages + ["checkpoint.every=1", "checkpoint.resume=auto"])
    assert result.returncode == 0 and f"resumed from step {resume_at}" in result.stdout, result.stderr[-3000:]
    ours, theirs = metrics(resumed), metrics(reference)[resume_at:]
    assert [(m["step"], m["loss"], m["tokens"]) for m in ours] == [(m["step"], m["loss"], m["tokens"]) for m in theirs]
    final = f"checkpoints/step_{STEPS:08d}"
    expected = checkpoint_tensors(reference / final)
    for key, tensor in checkpoint_tensors(resumed / final).items():
        assert torch.equal(tensor, expected[key]), key
