"""Resuming: find the newest complete checkpoint (verified against its manifest), decide how to load it at this
run's layout, and load it natively (the same layout) into DeepSpeed's engine. Loading at another layout goes
through universal.py."""

from __future__ import annotations

import dataclasses
import random
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from lm2.model.config import ModelConfig
from lm2.model.errors import CheckpointError
from lm2.pipeline.checkpoint.format import Layout, Manifest, rng_file, shared_hashes, step_folders, supports_reshard
from lm2.pipeline.checkpoint.reader import verified_manifest

ResumeRoute = Literal["native", "universal"]


def named_checkpoint(resume: str) -> Path:
    """The folder checkpoint.resume names (neither none nor auto); raises CheckpointError if it does not exist."""
    folder = Path(resume)
    if not folder.is_dir():
        raise CheckpointError(
            f"checkpoint {folder} (--resume) not found: give a step_* folder of a run's checkpoints, or --resume auto"
        )
    return folder


def find_resume(root: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: checkpoint.resume is none, auto or a folder. Auto skips, with a warning
    naming it, every newer checkpoint that is incomplete or corrupt. A collective."""
    if resume == "none":
        return None
    if resume != "auto":
        folder = named_checkpoint(resume)
        verified_manifest(folder, shared_hashes)
        return folder
    for folder in step_folders(root):
        try:
            verified_manifest(folder, shared_hashes)
            return folder
        except CheckpointError as error:
            if dist.get_rank() == 0:
                warnings.warn(f"skipping checkpoint {folder}: {error}", stacklevel=2)
    return None


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_route(manifest: Manifest, model: ModelConfig, layout: Layout, folder: Path) -> ResumeRoute:
    """How to resume at `layout`: "native" (DeepSpeed loads its own shards) or "universal" (convert, then
    re-slice). Refuses a checkpoint of another model shape, naming the field, or a layout change it cannot do."""
    saved = _flatten({"model": manifest.config["model"]})
    current = _flatten({"model": dataclasses.asdict(model)})
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise CheckpointError(
                f"{folder} was trained with {key}={saved.get(key)!r} but the config says {current.get(key)!r}: "
                f"set {key}={saved.get(key)!r} to resume it, or start a new run_dir"
            )
    old = manifest.layout
    if old == layout:
        return "native"
    if supports_reshard(old, layout):
        return "universal"  # every parameter's optimizer state is re-sliced for the new layout
    if old.zero_stage == layout.zero_stage == 0 and (old.tp, old.pp) == (layout.tp, layout.pp):
        return "native"  # no ZeRO: every data-parallel rank holds the whole optimizer state
    raise CheckpointError(
        f"{folder} was written with {old.describe()}, this run has {layout.describe()}: a layout can change on "
        "resume only between ZeRO stages 1 and 2 (through a universal checkpoint) or, without ZeRO, in the "
        "data-parallel size; resume with the old layout"
    )


SCHEDULE_FIELDS = ("train.steps", "optim.lr", "optim.min_lr", "optim.warmup_steps", "optim.decay")
"""The config fields that define the learning rate of every step."""


def check_schedule(manifest: Manifest, config: dict[str, Any], folder: Path, override: bool) -> None:
    """Refuses to resume with an LR schedule (SCHEDULE_FIELDS of the resolved config `config`) other than the
    checkpoint's, naming the fields, unless `override`: then the schedule is the config's (engine.resume_schedule).
    A step-0 checkpoint (`lm2 import hf`) has applied no LR yet: the run simply follows its config's schedule."""
    if manifest.step == 0:
        return
    saved, current = _flatten(manifest.config), _flatten(config)
    changed = [
        f"{key}={saved.get(key)!r} -> {current.get(key)!r}"
        for key in SCHEDULE_FIELDS
        if saved.get(key) != current.get(key)
    ]
    if changed and not override:
        raise CheckpointError(
            f"{folder} was trained with another LR schedule ({', '.join(changed)}): resume with the checkpoint's "
            "values, or pass --override-schedule to recompute the schedule from the config from this step on"
        )


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load(engine, folder: Path, manifest: Manifest) -> dict[str, Any]:
    """Loads weights, optimizer and LR scheduler into DeepSpeed's engine, written at this layout, and this rank's
    RNG state (when the world size is the same); returns lm2's client state (Manifest.client_state())."""
    _, client_state = engine.load_checkpoint(
        str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client_state is None:
        raise CheckpointError(f"DeepSpeed could not load {folder}")
    rng = rng_file(folder, dist.get_rank())
    if rng.is_file() and manifest.layout.world_size == dist.get_world_size():
        _set_rng_state(torch.load(rng, weights_only=False))
    return client_state["lm2"]
