"""Writing checkpoints: every rank saves its DeepSpeed shards and RNG state, then rank 0 publishes the manifest
and `latest`, and prunes old checkpoints, only after a newer one is complete."""

from __future__ import annotations

import dataclasses
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

from lm2.model.errors import CheckpointError
from lm2.pipeline.checkpoint.format import (
    LATEST,
    MANIFEST,
    UNIVERSAL_SUFFIX,
    Manifest,
    carry_file,
    rng_file,
    shared_hashes,
    step_folders,
    tag_for,
    write_manifest,
)
from lm2.pipeline.checkpoint.reader import complete_checkpoints
from lm2.pipeline.checkpoint.universal import universal_checkpoint_info
from lm2.pipeline.files import write_atomic


def code_version() -> str:
    """lm2's version plus the git commit of the source tree, when it is a checkout."""
    from importlib.metadata import version

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version('lm2')}+{commit}" if commit else version("lm2")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def prune(root: Path, keep: int) -> None:
    """Deletes all but the newest `keep` complete checkpoints (and their universal conversions), and incomplete
    folders older than the newest complete one."""
    complete = complete_checkpoints(root)
    for folder in complete[keep:]:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(root / f"{folder.name}{UNIVERSAL_SUFFIX}", ignore_errors=True)
    if complete:
        for folder in step_folders(root):
            if folder.name < complete[0].name and not (folder / MANIFEST).is_file():
                shutil.rmtree(folder, ignore_errors=True)


def save(engine, root: Path, manifest: Manifest, keep: int, carry: dict[str, Any] | None = None) -> Path:
    """Every rank calls it with lm2's Engine (train/engine.py). Writes checkpoint `manifest.step` (DeepSpeed's shards
    with the manifest's client state, and for a ZeRO-1/2 layout what a resume at another layout needs; this rank's
    carried memory when given), then (rank 0) its manifest with the files' sizes and checksums, `latest`, and
    prunes to `keep`."""
    client_state = {"lm2": manifest.client_state()}
    if engine.layout.reshardable:
        client_state[UNIVERSAL_CHECKPOINT_INFO] = universal_checkpoint_info(engine, engine.model)
    rank = dist.get_rank()
    folder = root / tag_for(manifest.step)
    if rank == 0 and folder.exists():  # leftovers of a save that was interrupted: start clean
        shutil.rmtree(folder)
    dist.barrier()
    try:
        engine.deepspeed.save_checkpoint(str(root), tag=folder.name, client_state=client_state, save_latest=False)
        torch.save(rng_state(), rng_file(folder, rank))
        if carry is not None:
            torch.save(carry, carry_file(folder, rank))
    except (OSError, RuntimeError) as error:  # torch reports a full disk as a RuntimeError without errno
        raise _not_written(folder, error) from None
    dist.barrier()  # every rank's files are on disk
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    table = shared_hashes(folder, files)
    if rank == 0:
        try:
            write_manifest(folder, dataclasses.replace(manifest, files=table))
            write_atomic(root / LATEST, folder.name + "\n")
        except OSError as error:
            raise _not_written(folder, error) from None
        prune(root, keep)
    dist.barrier()
    return folder


def _not_written(folder: Path, error: Exception) -> CheckpointError:
    """The error of a save that failed on this rank (a full disk, a lost mount), after removing what it wrote: the
    previous checkpoint and `latest` are untouched. The launcher stops the other ranks when this one exits."""
    shutil.rmtree(folder, ignore_errors=True)
    root = folder.parent
    latest = root / LATEST
    then = (
        f"continue with --resume auto from {root / latest.read_text().strip()}, which is intact"
        if latest.is_file()
        else "start again"
    )
    free = shutil.disk_usage(root).free / 2**20
    return CheckpointError(
        f"could not write checkpoint {folder} ({error}); {free:.0f} MiB are free on its disk: make "
        f"room (or lower checkpoint.keep) and {then}"
    )
