"""Checkpoints: the format, atomic publication, verification and resume.

Format. `<run_dir>/checkpoints/step_<8 digits>/` holds DeepSpeed's sharded states (model states per model-parallel
rank or pipeline layer, ZeRO optimizer partitions per data-parallel rank, LR scheduler), lm2's client state inside
them (step, samples, tokens, loader position, wandb run id, resolved config, code version), one RNG file per rank,
and `lm2_manifest.json`: every file with its size and sha256, the topology and the config. `checkpoints/latest`
names the newest complete checkpoint.

Atomicity. A checkpoint is complete when its manifest exists: the manifest is written (temp file + rename) only
after every rank finished writing, and `latest` moves after it. A folder without a manifest, or whose files do
not match it, is never loaded. Old checkpoints beyond `keep` are deleted only after a newer one is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lm2.model.errors import CheckpointError
from lm2.pipeline.config import RunConfig

MANIFEST = "lm2_manifest.json"
LATEST = "latest"
FORMAT = "lm2-checkpoint-v1"
EXIT_REQUEUE = 75
"""Exit code after a signal-triggered save (EX_TEMPFAIL): launch scripts requeue the job on it."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _step_folders(root: Path) -> list[Path]:
    """Checkpoint folders (step_<8 digits>) under root, newest first; converted copies and temp files are not."""
    return sorted((p for p in root.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d{8}", p.name)),
                  key=lambda p: p.name, reverse=True)


def checkpoint_root(run: RunConfig) -> Path:
    return Path(run.logging.run_dir) / "checkpoints"


def code_version() -> str:
    """lm2's version plus the git commit of the source tree, when it is a checkout."""
    from importlib.metadata import version

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version('lm2')}+{commit}" if commit else version("lm2")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _shared_hashes(folder: Path, files: list[str]) -> dict[str, dict[str, Any]]:
    """Sizes and sha256 of `files`, each rank hashing its share; every rank gets the whole table."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
            for i, name in enumerate(files) if i % world == rank}
    tables: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(tables, mine)
    return {name: entry for table in tables for name, entry in sorted(table.items())}


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST}: it is incomplete (the run stopped while saving)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{folder} is not an lm2 checkpoint of format {FORMAT}")
    return manifest


def verify(folder: Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint whose files all match it; raises CheckpointError otherwise.
    A collective: the ranks share the hashing."""
    manifest = read_manifest(folder)
    files = sorted(manifest["files"])
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder} lacks {len(missing)} file(s) of its manifest, e.g. {missing[0]}")
    for name in files:
        size = (folder / name).stat().st_size
        if size != manifest["files"][name]["bytes"]:
            raise CheckpointError(f"{folder / name} has {size} bytes, the manifest says {manifest['files'][name]['bytes']}")
    actual = _shared_hashes(folder, files)
    corrupt = [name for name in files if actual[name]["sha256"] != manifest["files"][name]["sha256"]]
    if corrupt:
        raise CheckpointError(f"{folder / corrupt[0]} does not match its checksum in the manifest: the file is corrupt")
    return manifest


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders with a manifest, newest first (their files are not verified here)."""
    return [p for p in _step_folders(root) if (p / MANIFEST).is_file()]


def find_resume(root: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: checkpoint.resume is none, auto or a folder. Auto skips, with a warning
    naming it, every newer checkpoint that is incomplete or corrupt. A collective."""
    if resume == "none":
        return None
    if resume != "auto":
        folder = Path(resume)
        verify(folder)
        return folder
    for folder in _step_folders(root):
        try:
            verify(folder)
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


def check_resumable(manifest: dict[str, Any], run: RunConfig, topology: dict[str, int], folder: Path) -> str:
    """How to resume: "native" (DeepSpeed loads its own shards) or "universal" (convert, then re-slice: the layout
    changed). Refuses a checkpoint of another model shape, naming the field, or a layout change it cannot do."""
    saved = _flatten({"model": manifest["config"]["model"]})
    current = _flatten({"model": dataclasses.asdict(run.model)})
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise CheckpointError(
                f"{folder} was trained with {key}={saved.get(key)!r} but the config says {current.get(key)!r}: "
                f"set {key}={saved.get(key)!r} to resume it, or start a new run_dir")
    old = manifest["topology"]
    same_layout = all(old[axis] == topology[axis] for axis in ("tp", "pp", "dp", "zero_stage"))
    if same_layout:
        return "native"
    if old["zero_stage"] in (1, 2) and topology["zero_stage"] in (1, 2):
        return "universal"  # every parameter's optimizer state is re-sliced for the new layout
    if old["zero_stage"] == topology["zero_stage"] == 0 and old["tp"] == topology["tp"] and old["pp"] == topology["pp"]:
        return "native"  # no ZeRO: every data-parallel rank holds the whole optimizer state
    raise CheckpointError(
        f"{folder} was written with tp={old['tp']} pp={old['pp']} dp={old['dp']} zero_stage={old['zero_stage']}, "
        f"this run has tp={topology['tp']} pp={topology['pp']} dp={topology['dp']} zero_stage="
        f"{topology['zero_stage']}: a layout can change on resume only between ZeRO stages 1 and 2 (through a "
        "universal checkpoint) or, without ZeRO, in the data-parallel size; resume with the old layout")


def prune(root: Path, keep: int) -> None:
    """Deletes all but the newest `keep` complete checkpoints, and incomplete folders older than the newest."""
    complete = complete_checkpoints(root)
    for folder in complete[keep:]:
        shutil.rmtree(folder, ignore_errors=True)
    for folder in complete[keep:]:
        shutil.rmtree(root / f"{folder.name}_universal", ignore_errors=True)  # its converted copy, if any
    if complete:
        for folder in _step_folders(root):
            if folder.name < complete[0].name and not (folder / MANIFEST).is_file():
                shutil.rmtree(folder, ignore_errors=True)


def save(engine, root: Path, step: int, client_state: dict[str, Any], manifest_extra: dict[str, Any],
         keep: int) -> Path:
    """Every rank calls it. Writes step's checkpoint, then (rank 0) its manifest, `latest`, and prunes."""
    rank = dist.get_rank()
    folder = root / tag_for(step)
    if rank == 0 and folder.exists():  # leftovers of a save that was interrupted: start clean
        shutil.rmtree(folder)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=folder.name, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), folder / f"rng_rank_{rank:05d}.pt")
    dist.barrier()  # every rank's files are on disk
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    table = _shared_hashes(folder, files)
    if rank == 0:
        manifest = {"format": FORMAT, "step": step, "files": table, **manifest_extra}
        _write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1, default=str))
        _write_atomic(root / LATEST, folder.name + "\n")
        prune(root, keep)
    dist.barrier()
    return folder


def load(engine, folder: Path) -> dict[str, Any]:
    """Loads weights, optimizer and LR scheduler into the engine and this rank's RNG; returns lm2's client state."""
    _, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None:
        raise CheckpointError(f"DeepSpeed could not load {folder}")
    rng = folder / f"rng_rank_{dist.get_rank():05d}.pt"
    if rng.is_file() and client_state["lm2"]["world_size"] == dist.get_world_size():
        _set_rng_state(torch.load(rng, weights_only=False))
    return client_state["lm2"]


def inspect(root: Path) -> list[dict[str, Any]]:
    """One row per checkpoint folder under root (or root itself if it is one): step, completeness, topology."""
    folders = [root] if (root / MANIFEST).exists() or root.name.startswith("step_") else _step_folders(root)[::-1]
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    rows = []
    for folder in folders:
        row: dict[str, Any] = {"folder": str(folder), "latest": folder.name == latest}
        try:
            manifest = read_manifest(folder)
            missing = [n for n, e in manifest["files"].items()
                       if not (folder / n).is_file() or (folder / n).stat().st_size != e["bytes"]]
            row.update(step=manifest["step"], complete=not missing, topology=manifest["topology"],
                       bytes=sum(e["bytes"] for e in manifest["files"].values()), samples=manifest.get("samples"),
                       problem=f"{len(missing)} file(s) missing or truncated" if missing else None)
        except CheckpointError as error:
            row.update(step=None, complete=False, problem=str(error))
        rows.append(row)
    return rows
