"""Building a run: the process groups, the run folder, the loaders, the engine and where the run starts (a fresh
start or a resumed checkpoint). `Trainer.fit` (loop.py) consumes what `build` returns; `lm2 import hf` builds only
an engine (`build_engine`).
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from lm2.pipeline.checkpoint import universal
from lm2.pipeline.checkpoint.format import read_manifest
from lm2.pipeline.checkpoint.resume import check_config, check_schedule, find_resume, load, resume_route
from lm2.pipeline.config import RunConfig
from lm2.pipeline.data.lanes import LaneLoader
from lm2.pipeline.data.streaming import RowLoader, build_lane_loader, build_train_loader
from lm2.pipeline.launch.environment import launched_world_size
from lm2.pipeline.parallel.dims import ParallelDims
from lm2.pipeline.parallel.init import init_distributed
from lm2.pipeline.train.carry import CarriedMemory
from lm2.pipeline.train.engine import Engine, build_engine, resume_schedule
from lm2.pipeline.train.init_from import initialise
from lm2.pipeline.train.run_folder import RunFolderLock, claim_run_folder


@dataclass
class Start:
    """Where a run starts: step 0, or the step of the checkpoint it resumed from."""

    step: int = 0
    wandb_id: str | None = None
    resumed_from: Path | None = None
    initialised_from: Path | None = None
    """The source of train.init_from, when a fresh run took its weights."""
    verified: str | None = None
    """How the checkpoint resumed from was verified (size, time), for the startup summary."""


@dataclass
class RunParts:
    """What a run is made of, built and placed at its start."""

    run: RunConfig
    dims: ParallelDims
    engine: Engine
    train_loader: RowLoader | LaneLoader
    val_loader: RowLoader | None
    carry: CarriedMemory | None
    """The lanes of carried memory (train.carry), None without."""
    start: Start
    run_folder_lock: RunFolderLock | None
    """Rank 0's lock on the run folder (run_folder.py), held as long as this object lives."""


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs (CPU and CUDA) from one seed: the run is a function of its config."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_val_loader(run: RunConfig, dims: ParallelDims, rank: int) -> RowLoader:
    """The val split of every training stream, unshuffled."""
    streams = [dataclasses.replace(stream, split="val") for stream in run.data.streams]
    data = dataclasses.replace(run.data, streams=streams, shuffle=False)
    return build_train_loader(data, dims, rank, run.train.micro_batch, run.model)


@dataclass(frozen=True)
class ResumeOptions:
    """What a resume may change (lm2 train's flags)."""

    override_schedule: bool = False
    """Resume even if the LR schedule's fields changed, following the config's schedule."""
    accept_config_changes: bool = False
    """Resume even if fields that change the data or the math changed."""
    reset_memory: bool = False
    """Resume with every lane of carried memory from M_0 (the way to resume at another data-parallel size or
    micro-batch with train.carry)."""


def build(run: RunConfig, options: ResumeOptions = ResumeOptions()) -> RunParts:
    """Every rank calls it; `options` say what a resume may change."""
    run.validate(launched_world_size(os.environ))  # before any process group: a bad layout fails at once
    dims = init_distributed(run.parallel.tp, run.parallel.pp)
    rank = torch.distributed.get_rank()
    lock = claim_run_folder(run)
    seed_everything(run.train.seed)  # a resume restores the RNG states saved with the checkpoint
    folder, verification = find_resume(run.checkpoints, run.checkpoint.resume) or (None, None)
    stage = run.train.stage_at(read_manifest(folder).step if folder is not None else 0)
    # Data first: a dataset that does not fit the model fails before the engine is built.
    train_loader = build_loader(run, dims, rank, stage)
    val_loader = build_val_loader(run, dims, rank) if run.train.eval_every else None
    engine = build_engine(run, dims)
    carry = CarriedMemory.of_engine(engine, run) if run.train.carry.enabled else None
    if folder is not None:  # train.init_from is ignored: a resumed run continues
        start = resume(run, engine, train_loader, stage, carry, folder, options)
        start.verified = verification.describe(folder)
    elif run.train.init_from is not None:
        start = Start(initialised_from=initialise(engine, run.model, run.train.init_from))
    else:
        start = Start()
    if rank == 0:
        Path(run.logging.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run.logging.run_dir) / "config.yaml").write_text(yaml.safe_dump(run.to_dict(), sort_keys=False))
    return RunParts(run, dims, engine, train_loader, val_loader, carry, start, lock)


def build_loader(run: RunConfig, dims: ParallelDims, rank: int, stage: int | None = None) -> RowLoader | LaneLoader:
    """The training loader: rows (shuffled), or document lanes for train.carry.mode: document; of curriculum stage
    `stage` (its data, rows of its length), or of data.streams when None."""
    if stage is not None:
        run = stage_view(run, stage)
    if run.train.carry.mode == "document":
        grad_accum = run.train.grad_accum(dims.dp)
        return build_lane_loader(run.data, dims, rank, run.train.micro_batch, grad_accum, run.model)
    return build_train_loader(run.data, dims, rank, run.train.micro_batch, run.model)


def stage_view(run: RunConfig, stage: int) -> RunConfig:
    """The run as its curriculum stage `stage` reads data: the stage's streams, rows of the stage's length."""
    config = run.train.stages[stage]
    rows = config.segments * run.model.segment_length
    data = dataclasses.replace(run.data, streams=config.streams)
    return dataclasses.replace(run, data=data, model=dataclasses.replace(run.model, row_length=rows))


def resume(
    run: RunConfig,
    engine: Engine,
    train_loader: RowLoader | LaneLoader,
    stage: int | None,
    carry: CarriedMemory | None,
    folder: Path,
    options: ResumeOptions,
) -> Start:
    """Loads checkpoint `folder` into the engine (natively, or through a universal checkpoint when it was written at
    another layout), sets the LR schedule, the loader's position and the lanes' carried memory."""
    manifest = read_manifest(folder)
    route = resume_route(manifest, run.model, engine.layout, folder)
    check_schedule(manifest, run.to_dict(), folder, options.override_schedule)
    check_config(manifest, run.to_dict(), train_loader.tokenizer_sha256, folder, options.accept_config_changes)
    if route == "universal":
        tag = universal.convert_to_universal_on_rank0(str(folder.parent), folder.name)
        state = universal.load_universal(engine, str(folder.parent), tag)[1]["lm2"]
    else:
        state = load(engine.deepspeed, folder, manifest)
    resume_schedule(engine.deepspeed, run.optim, run.train.steps, state["step"])
    # A step-0 checkpoint of `lm2 import hf` has read no data yet; a checkpoint at the end of a curriculum stage holds
    # that stage's position, and the next stage starts from the beginning of its data.
    if state["data"] is not None and manifest.stage == stage:
        if isinstance(train_loader, LaneLoader):
            train_loader.load_state_dict(state["data"], options.reset_memory)
        else:
            train_loader.load_state_dict(state["data"])
    if carry is not None:
        carry.load(folder, manifest, options.reset_memory)
    return Start(state["step"], state["wandb_id"], folder)
