"""What resume refuses or skips: another model shape or TP/PP layout, incomplete or corrupt checkpoints;
and what the trainer refuses before it starts: data that does not fit the model."""

import dataclasses
from pathlib import Path

import pytest

from lm2.model.errors import CheckpointError
from lm2.pipeline.checkpoint.format import MANIFEST, Layout, Manifest, shared_hashes, tag_for, write_manifest
from lm2.pipeline.checkpoint.resume import find_resume, resume_route
from lm2.pipeline.checkpoint.save import prune
from lm2.pipeline.config import load_config
from tests.distributed import lm2_cli

CONFIG = Path(__file__).parent / "tiny_train.yaml"
LAYOUT = Layout(tp=1, pp=1, dp=2, zero_stage=1)


def manifest_for(run, **layout):
    return Manifest(step=1, layout=dataclasses.replace(LAYOUT, **layout), config=run.to_dict())


def test_resume_refuses_another_model_shape_naming_the_field():
    saved, current = load_config(CONFIG), load_config(CONFIG, ["model.memory.slots=12"])
    with pytest.raises(CheckpointError, match=r"model.memory.slots=6 but the config says 12"):
        resume_route(manifest_for(saved), current.model, LAYOUT, Path("ckpt"))


@pytest.mark.parametrize(
    "old,route",
    [
        ({}, "native"),
        ({"dp": 1}, "universal"),
        ({"tp": 2, "zero_stage": 2}, "universal"),
    ],
)
def test_resume_route_follows_the_layout(old, route):
    run = load_config(CONFIG)
    assert resume_route(manifest_for(run, **old), run.model, LAYOUT, Path("ckpt")) == route


@pytest.mark.parametrize(
    "old,new",
    [
        ({"zero_stage": 0, "tp": 2}, {"zero_stage": 0}),
        ({"zero_stage": 3, "dp": 4}, {"zero_stage": 3}),
    ],
)
def test_resume_refuses_layout_changes_it_cannot_do(old, new):
    run = load_config(CONFIG)
    with pytest.raises(CheckpointError, match="a layout can change on resume only between ZeRO stages"):
        resume_route(manifest_for(run, **old), run.model, dataclasses.replace(LAYOUT, **new), Path("ckpt"))


def _save_two(root):
    """Two complete fake checkpoints written through save()'s manifest code path."""
    import torch

    run = load_config(CONFIG)
    for step in (1, 2):
        folder = root / tag_for(step)
        folder.mkdir(parents=True)
        torch.save({"w": torch.full((4,), float(step))}, folder / "mp_rank_00_model_states.pt")
        table = shared_hashes(folder, ["mp_rank_00_model_states.pt"])
        write_manifest(folder, dataclasses.replace(manifest_for(run), step=step, files=table))


def test_auto_resume_skips_a_corrupt_or_incomplete_newest_checkpoint(single_process, tmp_path):
    _save_two(tmp_path)
    newest = tmp_path / "step_00000002" / "mp_rank_00_model_states.pt"
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF  # same size, one byte flipped
    newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_00000002.*does not match its checksum"):
        assert find_resume(tmp_path, "auto") == tmp_path / "step_00000001"
    (tmp_path / "step_00000003").mkdir()  # a save that never finished: no manifest
    with pytest.warns(UserWarning, match="step_00000003.*incomplete"):
        assert find_resume(tmp_path, "auto") == tmp_path / "step_00000001"
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        find_resume(tmp_path, str(tmp_path / "step_00000002"))
    assert find_resume(tmp_path / "nothing", "auto") is None


def test_resume_from_a_folder_that_does_not_exist_says_not_found(single_process, tmp_path):
    with pytest.raises(CheckpointError, match="step_00000007 .--resume. not found"):
        find_resume(tmp_path, str(tmp_path / "step_00000007"))


def test_prune_keeps_the_newest_complete_ones(tmp_path):
    for step in (1, 2, 3, 4):
        folder = tmp_path / tag_for(step)
        folder.mkdir()
        if step != 2:
            (folder / MANIFEST).write_text("{}")
    prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]


def test_trainer_refuses_data_of_another_row_length(train_data, tmp_path):
    result = lm2_cli(
        [
            "train",
            "--config",
            str(CONFIG),
            *train_data,
            "model.row_length=64",
            "model.segment_length=16",
            f"logging.run_dir={tmp_path}",
            "logging.wandb=disabled",
        ]
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "holds rows of 32 tokens but model.row_length is 64" in result.stderr
    assert "Traceback" not in result.stderr
