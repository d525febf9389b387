"""Reads an lm2 checkpoint of any layout offline (no process group) into whole tensors under LM2Model names.

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

import torch

from lm2.model.config import ModelConfig
from lm2.model.errors import LM2Error
from lm2.pipeline.checkpoint.format import LATEST, MANIFEST, Layout, Manifest, read_manifest
from lm2.pipeline.checkpoint.save import complete_checkpoints
from lm2.pipeline.config import from_dict
from lm2.pipeline.export.names import VOCAB_PARAMETERS, parameter_splits
from lm2.pipeline.files import sha256_file
from lm2.pipeline.parallel.pipe import model_name

Progress = Callable[[str], None]
"""Called once per unit of work with a short description (drives the command's progress bar)."""


class ExportError(LM2Error):
    """A checkpoint or Hugging Face folder cannot be converted; the message names the problem and the fix."""


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
    raise ExportError(
        f"{path} is neither a checkpoint (no {MANIFEST}) nor a checkpoints folder with one: "
        "give a run's checkpoints folder, its `latest` file or a step_* folder"
    )


def manifest_of(folder: Path) -> Manifest:
    """The checkpoint's manifest (files not checked); ExportError if it has none or it is not lm2's."""
    try:
        return read_manifest(folder)
    except LM2Error as error:
        raise ExportError(f"{error}; export another step") from None


def verified_manifest(folder: Path, progress: Progress = lambda _: None) -> Manifest:
    """The manifest of a complete checkpoint whose files all match their sizes and sha256; ExportError otherwise."""
    manifest = manifest_of(folder)
    for name, entry in sorted(manifest.files.items()):
        path = folder / name
        if not path.is_file():
            raise ExportError(f"{folder} is incomplete: {name} of its manifest is missing; export another step")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise ExportError(
                f"{path} does not match its size or checksum in the manifest: the checkpoint is "
                "corrupt; export another step"
            )
        progress(f"checked {name}")
    return manifest


def model_config(manifest: Manifest) -> ModelConfig:
    return from_dict(ModelConfig, manifest.config["model"], "model")


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    """A module state without megatron's `_extra_state` entries (None)."""
    return {name: value for name, value in state.items() if torch.is_tensor(value)}


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _plain_shard(folder: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    return _tensors(_load(folder / f"mp_rank_{tp_rank:02d}_model_states.pt")["module"])


def _pipeline_shard(folder: Path, tp_rank: int, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Layers are [embedding, blocks, norm, output]; a tied output layer has no file of its own."""
    shard = {}
    for index in range(cfg.num_layers + 3):
        path = folder / f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt"
        if path.is_file():
            shard.update(
                {
                    model_name(f"{index}.{name}", cfg.num_layers): tensor
                    for name, tensor in _tensors(_load(path)).items()
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
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its bars
                return get_fp32_state_dict_from_zero_checkpoint(tmp, tag=folder.name)
        except (ValueError, KeyError, FileNotFoundError) as error:
            raise ExportError(
                f"{folder}: the ZeRO-3 partitions of TP rank {tp_rank} cannot be joined ({error}): "
                "the checkpoint is incomplete or of an unknown layout; export another step"
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
        raise ExportError(
            f"{folder}: unknown layout: {layout.describe()} should have written {missing[:1] or 'no pipeline'}"
        )
    return layout


def _join_tp(name: str, shards: list[torch.Tensor], split: int | None) -> torch.Tensor:
    if split is None:
        if any(not torch.equal(shard, shards[0]) for shard in shards[1:]):
            raise ExportError(f"{name} is replicated over TP ranks but the shards differ: the checkpoint is corrupt")
        return shards[0]
    return torch.cat(shards, dim=split)


def read_full_state(folder: Path, manifest: Manifest, progress: Progress = lambda _: None) -> dict[str, torch.Tensor]:
    """Every parameter, whole, under its LM2Model name, the vocabulary cut to model.vocab_size."""
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
            raise ExportError(
                f"{folder}: TP rank {tp_rank} holds {sorted(set(shard) - set(splits))[:3]} and lacks "
                f"{sorted(set(splits) - set(shard))[:3]} for the model in its manifest: unknown layout or model"
            )
    full = {}
    for name, split in splits.items():
        tensor = _join_tp(name, [shard[name] for shard in shards], split)
        full[name] = tensor[: cfg.vocab_size] if name in VOCAB_PARAMETERS else tensor
    return full
