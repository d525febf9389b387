"""Reads lm2 checkpoints offline (no process group): which folder a path names, whether its files match the
manifest, what a checkpoints folder holds, and the weights of any layout as whole tensors under LM2Model names.
Export, `lm2 ckpt inspect` and resume read checkpoints through this module (verify.py checks them first); every
file is loaded through safe_load, so a received checkpoint runs no code.

Layouts (from the manifest's topology): without pipelining every TP rank's weights are in
`mp_rank_{t}_model_states.pt` (ZeRO 0-2 keep the module whole on every data-parallel rank); with pipelining each
layer of each TP rank has `layer_{i}-model_{t}-model_states.pt` (the tied output layer is saved once, with the
embedding); ZeRO-3 keeps parameters partitioned over data-parallel ranks: the fp32 partitions in the optimizer
files are joined by DeepSpeed's own reader (zero_to_fp32), one TP rank at a time. TP shards are then joined
along the dimension the name table gives, and the vocabulary padding is cut off.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lm2.model.config import ModelConfig
from lm2.model.errors import CheckpointError
from lm2.pipeline.checkpoint.format import LATEST, MANIFEST, Layout, Manifest, read_manifest, step_folders
from lm2.pipeline.checkpoint.safe_load import load, torch_loads_checked
from lm2.pipeline.checkpoint.verify import size_problems
from lm2.pipeline.config import from_dict
from lm2.pipeline.hf.names import parameter_splits

Progress = Callable[[str], None]
"""Called once per unit of work with a short description (drives a command's progress bar)."""


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders with a manifest, newest first (their files are not verified here)."""
    return [p for p in step_folders(root) if (p / MANIFEST).is_file()]


def resolve(path: str | os.PathLike) -> Path:
    """One checkpoint folder from a step folder, a `latest` file, or a run's checkpoints folder (its `latest`,
    else its newest complete checkpoint)."""
    path = Path(path)
    if path.is_file() and path.name == LATEST:
        return path.parent / path.read_text().strip()
    if (path / MANIFEST).is_file() or path.name.startswith("step_"):
        return path
    if (path / LATEST).is_file():
        return path / (path / LATEST).read_text().strip()
    if path.is_dir() and complete_checkpoints(path):
        return complete_checkpoints(path)[0]
    raise CheckpointError(
        f"{path} is neither a checkpoint (no {MANIFEST}) nor a checkpoints folder with one: "
        "give a run's checkpoints folder, its `latest` file or a step_* folder"
    )


def inspect(root: Path) -> list[dict[str, Any]]:
    """One row per checkpoint folder under root (or root itself if it is one): step, completeness, topology."""
    folders = [root] if (root / MANIFEST).exists() or root.name.startswith("step_") else step_folders(root)[::-1]
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    rows = []
    for folder in folders:
        row: dict[str, Any] = {"folder": str(folder), "latest": folder.name == latest}
        try:
            manifest = read_manifest(folder)
            missing = size_problems(folder, manifest)
            row.update(
                step=manifest.step,
                complete=not missing,
                topology=manifest.layout.to_dict(),
                bytes=sum(e["bytes"] for e in manifest.files.values()),
                samples=manifest.samples,
                problem=f"{len(missing)} file(s) missing or truncated" if missing else None,
            )
        except CheckpointError as error:
            row.update(step=None, complete=False, problem=str(error))
        rows.append(row)
    return rows


def model_config(manifest: Manifest) -> ModelConfig:
    return from_dict(ModelConfig, manifest.config["model"], "model")


def module_tensors(state: dict) -> dict[str, torch.Tensor]:
    """A module state without megatron-core's `_extra_state` entries (None), which its layers put into
    state_dict()."""
    return {name: value for name, value in state.items() if torch.is_tensor(value)}


def _plain_shard(folder: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    return module_tensors(load(folder / f"mp_rank_{tp_rank:02d}_model_states.pt")["module"])


def _pipeline_shard(folder: Path, tp_rank: int, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Layers are [embedding, blocks, norm, output]; a tied output layer has no file of its own."""
    from lm2.pipeline.parallel.pipe import model_name  # DeepSpeed: imported only where a pipeline is read

    shard = {}
    for index in range(cfg.num_layers + 3):
        path = folder / f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt"
        if path.is_file():
            shard.update(
                {
                    model_name(f"{index}.{name}", cfg.num_layers): tensor
                    for name, tensor in module_tensors(load(path)).items()
                }
            )
    return shard


def _zero3_shard(folder: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    """DeepSpeed's zero_to_fp32 joins the data-parallel partitions of every file it finds, so it is shown only
    this TP rank's files (links in a temp folder)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / folder.name
        staged.mkdir()
        for path in folder.glob(f"zero_pp_rank_*_mp_rank_{tp_rank:02d}_*_states.pt"):
            os.symlink(path.resolve(), staged / path.name)
        try:
            with (
                contextlib.redirect_stdout(io.StringIO()),  # its progress bars
                contextlib.redirect_stderr(io.StringIO()),
                torch_loads_checked(),
            ):
                return get_fp32_state_dict_from_zero_checkpoint(tmp, tag=folder.name)
        except (ValueError, KeyError, FileNotFoundError) as error:
            raise CheckpointError(
                f"{folder}: the ZeRO-3 partitions of TP rank {tp_rank} cannot be joined ({error}): "
                "the checkpoint is incomplete or of an unknown layout"
            ) from None


def _expected_files(layout: Layout, num_layers: int) -> list[str]:
    tp, pp, dp, stage = layout.tp, layout.pp, layout.dp, layout.zero_stage
    if stage == 3:
        return [
            f"zero_pp_rank_{d}_mp_rank_{t:02d}_{kind}_states.pt"
            for t in range(tp)
            for d in range(dp)
            for kind in ("model", "optim")
        ]
    if pp > 1:
        return [f"layer_{i:02d}-model_{t:02d}-model_states.pt" for t in range(tp) for i in range(num_layers + 2)]
    return [f"mp_rank_{t:02d}_model_states.pt" for t in range(tp)]


def _check_layout(folder: Path, manifest: Manifest, cfg: ModelConfig) -> Layout:
    layout = manifest.layout
    missing = [name for name in _expected_files(layout, cfg.num_layers) if name not in manifest.files]
    if missing or (layout.zero_stage == 3 and layout.pp > 1):
        raise CheckpointError(
            f"{folder}: unknown layout: {layout.describe()} should have written {missing[:1] or 'no pipeline'}"
        )
    return layout


def _join_tp(name: str, shards: list[torch.Tensor], split: int | None) -> torch.Tensor:
    if split is None:
        if any(not torch.equal(shard, shards[0]) for shard in shards[1:]):
            raise CheckpointError(
                f"{name} is replicated over TP ranks but the shards differ: the checkpoint is corrupt"
            )
        return shards[0]
    return torch.cat(shards, dim=split)


def read_full_state(folder: Path, manifest: Manifest, progress: Progress = lambda _: None) -> dict[str, torch.Tensor]:
    """Every parameter, whole, under its LM2Model name, the vocabulary cut to model.vocab_size."""
    from lm2.model.lm import VOCAB_PARAMETERS  # megatron-core: imported only where weights are read

    cfg = model_config(manifest)
    layout = _check_layout(folder, manifest, cfg)
    shards = []
    for tp_rank in range(layout.tp):
        if layout.zero_stage == 3:
            shards.append(_zero3_shard(folder, tp_rank))
        elif layout.pp > 1:
            shards.append(_pipeline_shard(folder, tp_rank, cfg))
        else:
            shards.append(_plain_shard(folder, tp_rank))
        progress(f"read TP rank {tp_rank}")
    splits = parameter_splits(cfg)
    for tp_rank, shard in enumerate(shards):
        if set(shard) != set(splits):
            raise CheckpointError(
                f"{folder}: TP rank {tp_rank} holds {sorted(set(shard) - set(splits))[:3]} and lacks "
                f"{sorted(set(splits) - set(shard))[:3]} for the model in its manifest: unknown layout or model"
            )
    full = {}
    for name, split in splits.items():
        tensor = _join_tp(name, [shard[name] for shard in shards], split)
        full[name] = tensor[: cfg.vocab_size] if name in VOCAB_PARAMETERS else tensor
    return full
