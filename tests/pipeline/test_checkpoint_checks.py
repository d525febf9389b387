"""What resume refuses or skips: another model shape or TP/PP layout, incomplete or corrupt checkpoints;
and what the trainer refuses before it starts: data that does not fit the model."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from lm2.pipeline import checkpoint
from lm2.pipeline.config import load_config

CONFIG = Path(__file__).parent / "tiny_train.yaml"
TOPOLOGY = {"tp": 1, "pp": 1, "dp": 2, "world_size": 2, "zero_stage": 1}


def manifest_for(run, **topology):
    return {"config": run.to_dict(), "topology": {**TOPOLOGY, **topology}}


def test_resume_refuses_another_model_shape_naming_the_field():
    saved, current = load_config(CONFIG), load_config(CONFIG, ["model.memory.slots=12"])
    with pytest.raises(checkpoint.CheckpointError, match=r"model.memory.slots=6 but the config says 12"):
        checkpoint.check_resumable(manifest_for(saved), current, TOPOLOGY, Path("ckpt"))


@pytest.mark.parametrize("old,route", [
    ({}, "native"),
    ({"dp": 1, "world_size": 1}, "universal"),
    ({"tp": 2, "zero_stage": 2}, "universal"),
])
def test_resume_route_follows_the_layout(old, route):
    run = load_config(CONFIG)
    assert checkpoint.check_resumable(manifest_for(run, **old), run, TOPOLOGY, Path("ckpt")) == route


@pytest.mark.parametrize("old,new", [
    ({"zero_stage": 0, "tp": 2}, {"zero_stage": 0}),
    ({"zero_stage": 3, "dp": 4}, {"zero_stage": 3}),
])
def test_resume_refuses_layout_changes_it_cannot_do(old, new):
    run = load_config(CONFIG)
    with pytest.raises(checkpoint.CheckpointError, match="a layout can change on resume only between ZeRO stages"):
        checkpoint.check_resumable(manifest_for(run, **old), run, {**TOPOLOGY, **new}, Path("ckpt"))


def _save_two(root):
    """Two complete fake checkpoints written through checkpoint.save's manifest code path."""
    import torch

    for step in (1, 2):
        folder = root / checkpoint.tag_for(step)
        folder.mkdir(parents=True)
        torch.save({"w": torch.full((4,), float(step))}, folder / "mp_rank_00_model_states.pt")
        files = {"mp_rank_00_model_states.pt": None}
        table = checkpoint._shared_hashes(folder, sorted(files))
        checkpoint._write_atomic(folder / checkpoint.MANIFEST,
                                 __import__("json").dumps({"format": checkpoint.FORMAT, "step": step, "files": table}))


def test_auto_resume_skips_a_corrupt_or_incomplete_newest_checkpoint(single_process, tmp_path):
    _save_two(tmp_path)
    newest = tmp_path / "step_00000002" / "mp_rank_00_model_states.pt"
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF  # same size, one byte flipped
    newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_00000002.*does not match its checksum"):
        assert checkpoint.find_resume(tmp_path, "auto") == tmp_path / "step_00000001"
    (tmp_path / "step_00000003").mkdir()  # a save that never finished: no manifest
    with pytest.warns(UserWarning, match="step_00000003.*incomplete"):
        assert checkpoint.find_resume(tmp_path, "auto") == tmp_path / "step_00000001"
    with pytest.raises(checkpoint.CheckpointError, match="does not match its checksum"):
        checkpoint.find_resume(tmp_path, str(tmp_path / "step_00000002"))
    assert checkpoint.find_resume(tmp_path / "nothing", "auto") is None


def test_prune_keeps_the_newest_complete_ones(tmp_path):
    for step in (1, 2, 3, 4):
        folder = tmp_path / checkpoint.tag_for(step)
        folder.mkdir()
        if step != 2:
            (folder / checkpoint.MANIFEST).write_text("{}")
    checkpoint.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]


def test_trainer_refuses_data_of_another_row_length(train_data, tmp_path):
    result = subprocess.run([sys.executable, "-m", "lm2.pipeline.cli", "train", "--config", str(CONFIG),
                             *train_data, "model.row_length=64", "model.segment_length=16",
                             f"logging.run_dir={tmp_path}", "logging.wandb=disabled"],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "holds rows of 32 tokens but model.row_length is 64" in result.stderr
    assert "Traceback" not in result.stderr
