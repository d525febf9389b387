"""DeepSpeed's checkpoint engine for lm2: DeepSpeed saves and loads every model and optimizer file through its
engine's `save` and `load`, and lm2 replaces that engine (build_engine) with one that

- loads through safe_load.load (weights_only with lm2's allowlist): a resumed checkpoint runs no code;
- records the files it saved and their sha256, so that each rank reports exactly what it wrote to the manifest
  (save.py), rather than rank 0 listing a folder that a network file system may show it stale;
- while staging (an asynchronous save, save.py), copies each state dict to host memory instead of writing it: the
  copy is written on a background thread while training changes the parameters. The host buffers are kept for the
  next asynchronous save: copying into pages already mapped is several times faster than allocating them anew
  (1.2 GB on a 2-core VM: 0.11-0.15 s against 0.57 s), and the copy is the part of the save training waits for.

Every file a save writes (DeepSpeed's shards, each rank's own files, staged copies) goes through `write_file`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from torch.utils.serialization import config as torch_serialization

from lm2.pipeline.checkpoint import safe_load
from lm2.pipeline.files import write_hashed


class CheckedCheckpointEngine(TorchCheckpointEngine):
    def __init__(self, config_params=None) -> None:
        super().__init__(config_params)
        self.saved: dict[Path, str] = {}
        """Files written since the last take_saved(), with their sha256."""
        self.staged: list[tuple[Path, Any]] | None = None
        """While staging: (path, host copy of the state dict) of each save, written later by write_staged."""
        self.buffers = HostBuffers()

    def start_staging(self) -> None:
        self.staged = []

    def end_staging(self) -> list[tuple[Path, Any]]:
        """This checkpoint's staged copies. Their buffers serve the next asynchronous save, which must therefore
        start only once these copies are written (at most one save is in flight)."""
        staged, self.staged = self.staged or [], None
        self.buffers.keep_used()
        return staged

    def save(self, state_dict, path: str) -> None:
        if self.staged is not None:
            self.staged.append((Path(path), stage(state_dict, self.buffers)))
        else:
            self.saved[Path(path)] = write_file(state_dict, Path(path), self.zipfile_serialization)

    def write_staged(self, state_dict, path: Path) -> str:
        """Writes a staged copy as save() would have written the original (any thread); returns its sha256."""
        return write_file(state_dict, path, self.zipfile_serialization)

    def load(self, path: str, map_location=None):
        return safe_load.load(path, map_location)

    def take_saved(self) -> dict[Path, str]:
        saved, self.saved = self.saved, {}
        return saved


def write_file(state: Any, path: Path, zipfile: bool = True) -> str:
    """torch.save into files.write_hashed (direct writes, fsynced, hashed as written): returns the file's sha256.
    Without the zip format's CRC-32 of every record: the manifest's sha256 of every file (save.py) is the checksum
    a resume verifies; the CRC-32 was a second one over the same bytes and half of torch.save's CPU time (1.2 GB on
    a 2-core VM: 0.7-0.9 s with it, 0.35 s without), which an asynchronous save's writer takes from training.
    torch.load reads such files (it does not check the CRC); `unzip` warns on them. The setting is thread-local."""
    with torch_serialization.patch({"save.compute_crc32": False}):
        return write_hashed(path, lambda handle: torch.save(state, handle, _use_new_zipfile_serialization=zipfile))


class HostBuffers:
    """Host buffers (pinned when CUDA is available) reused from one staged checkpoint to the next: the n-th storage
    a checkpoint stages gets the previous checkpoint's n-th buffer when their sizes match (a run's checkpoints hold
    the same tensors in the same order), a new one otherwise."""

    def __init__(self) -> None:
        self._kept: list[torch.Tensor] = []
        self._used: list[torch.Tensor] = []

    def get(self, nbytes: int) -> torch.Tensor:
        index = len(self._used)
        kept = self._kept[index] if index < len(self._kept) else None
        if kept is None or kept.numel() != nbytes:
            kept = torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        self._used.append(kept)
        return kept

    def keep_used(self) -> None:
        """The buffers used since the last call become those the next checkpoint reuses."""
        self._kept, self._used = self._used, []


def stage(state: Any, buffers: HostBuffers | None = None) -> Any:
    """A copy of `state` whose tensors are copies in host memory (in `buffers`' when given), made now: later
    changes to the originals do not reach it. Tensors that share storage (views, tied weights) share it in the copy,
    so torch.save writes the copy byte for byte as it writes the original (for tensors already on the CPU)."""
    storages: dict[tuple[int, str], torch.UntypedStorage] = {}
    memo: dict[int, Any] = {}
    buffers = buffers or HostBuffers()

    def copy_tensor(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), str(storage.device))
        if key not in storages:
            raw = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
            storages[key] = buffers.get(raw.numel()).copy_(raw).untyped_storage()
        copied = torch.empty(0, dtype=tensor.dtype).set_(
            storages[key], tensor.storage_offset(), tensor.size(), tensor.stride()
        )
        if isinstance(tensor, torch.nn.Parameter):
            return torch.nn.Parameter(copied, requires_grad=tensor.requires_grad)
        return copied.requires_grad_(tensor.requires_grad)  # torch.save records it, views' included

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if id(value) not in memo:
                memo[id(value)] = copy_tensor(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                walk(item)

    walk(state)
    return copy.deepcopy(state, memo)  # the containers and other values, with the tensors replaced by their copies


def install(ds_engine) -> CheckedCheckpointEngine:
    """Replaces a DeepSpeed engine's checkpoint engine (made by deepspeed.initialize) with lm2's."""
    ds_engine.checkpoint_engine = CheckedCheckpointEngine(ds_engine._config)
    return ds_engine.checkpoint_engine
