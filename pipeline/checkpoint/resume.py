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
from lm2.pipeline.checkpoint.format import MANIFEST, Layout, Manifest, rng_file, step_folders, supports_reshard
from lm2.pipeline.checkpoint.safe_load import UnsafeCheckpointError
from lm2.pipeline.checkpoint.safe_load import load as load_file
from lm2.pipeline.checkpoint.verify import Team, Verification, default_threads, verify

ResumeRoute = Literal["native", "universal"]


def named_checkpoint(resume: str) -> Path:
    """The folder checkpoint.resume names (neither none nor auto); raises CheckpointError if it does not exist."""
    folder = Path(resume)
    if not folder.is_dir():
        raise CheckpointError(
            f"checkpoint {folder} (--resume) not found: give a step_* folder of a run's checkpoints, or --resume auto"
        )
    return folder


def job_team() -> Team:
    """Every rank of the job verifies a share of a checkpoint, and all receive every rank's findings. The ranks
    agree on the threads each uses (the fewest any can), so they all split the files alike."""
    world = dist.get_world_size()

    def gather(value: Any) -> list[Any]:
        values: list[Any] = [None] * world
        dist.all_gather_object(values, value)
        return values

    return Team(rank=dist.get_rank(), size=world, threads=min(gather(default_threads())), gather=gather)


def _listing(root: Path) -> list[tuple[str, bool]]:
    """Rank 0's view of the checkpoint folders under root, newest first, and whether each has a manifest, on every
    rank: a network file system may list a folder differently on another node."""
    listing = [[(p.name, (p / MANIFEST).is_file()) for p in step_folders(root)] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(listing, src=0)
    return listing[0]


def find_resume(root: Path, resume: str) -> tuple[Path, Verification] | None:
    """The checkpoint to resume from and its verification: checkpoint.resume is none, auto or a folder. Auto skips,
    with a warning naming it, every newer checkpoint that is incomplete or corrupt, and refuses to start when there
    are complete checkpoints but none verifies (starting from step 0 in their folder would prune them). A file that
    could run code stops it at once. A collective."""
    if resume == "none":
        return None
    team = job_team()
    if resume != "auto":
        folder = named_checkpoint(resume)
        return folder, verify(folder, team)
    failed = []
    for name, complete in _listing(root):
        try:
            return root / name, verify(root / name, team)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as error:
            if dist.get_rank() == 0:
                warnings.warn(f"skipping checkpoint {root / name}: {error}", stacklevel=2)
            if complete:
                failed.append(name)
    if failed:
        raise CheckpointError(
            f"--resume auto: no checkpoint in {root} verifies ({', '.join(failed)}: see the warnings above); nothing "
            "was started or deleted: restore them, or set logging.run_dir to a new folder to start another run"
        )
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


FREE_FIELDS = (
    "logging.",
    "checkpoint.",
    "parallel.",  # resume_route decides which layout changes work
    "model.",  # resume_route refuses any other shape
    "data.tokenizer",  # a path: the tokenizer itself is compared by its sha256
    "data.cache_dir",
    "data.cache_limit",
    "data.num_workers",
    "data.validate_hash",
    "train.micro_batch",  # how the global batch is cut, not what it is
    "train.activation_checkpointing",
    "train.compile",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.peak_tflops",
    "train.init_from",  # a resume starts from its own checkpoint, never from init_from
    *SCHEDULE_FIELDS,  # check_schedule, --override-schedule
)
"""Config fields a resume may change freely (prefixes). Every other field feeds the data or the math (streams,
proportions, shuffling, seeds, batch, optimizer, precision, and any field added later): changing one makes the
resumed run another experiment, so it is refused unless accepted."""


def check_config(manifest: Manifest, config: dict[str, Any], tokenizer_sha256: str | None, folder: Path, accept: bool):
    """Refuses to resume with a resolved config `config` whose data or math differ from the checkpoint's, naming
    each changed field as old -> new, unless `accept` (--accept-config-changes). The tokenizer counts by its sha256
    (Manifest.tokenizer_sha256). A step-0 checkpoint (`lm2 import hf`) has read no data and taken no step."""
    if manifest.step == 0 or accept:
        return
    saved, current = _flatten(manifest.config), _flatten(config)
    changed = [
        f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key) and not key.startswith(FREE_FIELDS)
    ]
    if manifest.tokenizer_sha256 and tokenizer_sha256 and manifest.tokenizer_sha256 != tokenizer_sha256:
        changed.append(f"tokenizer sha256: {manifest.tokenizer_sha256[:12]}... -> {tokenizer_sha256[:12]}...")
    if changed:
        raise CheckpointError(
            f"{folder} was trained with other data or math ({'; '.join(changed)}): resume with the checkpoint's "
            "values, or pass --accept-config-changes to continue it with these deliberately"
        )


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load(engine, folder: Path, manifest: Manifest) -> dict[str, Any]:
    """Loads weights, optimizer and LR scheduler into DeepSpeed's engine, written at this layout, and this rank's
    RNG state (when the world size is the same); returns lm2's client state (Manifest.client_state()). Every file is
    loaded through safe_load (the engine's checkpoint engine is lm2's: build_engine)."""
    _, client_state = engine.load_checkpoint(
        str(folder.parent), tag=folder.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client_state is None:
        raise CheckpointError(f"DeepSpeed could not load {folder}")
    rng = rng_file(folder, dist.get_rank())
    if rng.is_file() and manifest.layout.world_size == dist.get_world_size():
        _set_rng_state(load_file(rng))
    return client_state["lm2"]
