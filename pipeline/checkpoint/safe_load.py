"""Loading checkpoint files without running code: the one rule for every torch.load that can see a file from
elsewhere (export, import, universal conversion, resume).

A pickle can name any Python callable, and `torch.load(weights_only=False)` calls it: a received checkpoint could
run `os.system(...)` when it is exported or resumed. So lm2 loads with `weights_only=True`, which builds only
tensors, plain containers and an allowlist of types, and its allowlist holds just the few non-tensor types that
DeepSpeed and lm2 write (ALLOWED). DeepSpeed loads through its checkpoint engine (replaced by engine_io.py's) and,
in its universal-checkpoint and ZeRO-3 readers, through torch.load itself: `torch_loads_checked()` routes those
through the same rule for the duration of a call.

`unsafe_globals` finds such names without loading (it reads the pickle's opcodes), so resume's verification refuses
a file on every rank at once, before any rank loads it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lm2.model.errors import CheckpointError

ALLOWED = {
    # DeepSpeed's optimizer states: the loss scaler object, the ZeRO stage enum, the fp32 slice map of each parameter
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum": "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address": "deepspeed.utils.tensor_fragment.fragment_address",
    # numpy's RNG state in lm2's rng_rank_*.pt (an array of the Mersenne twister's words)
    "numpy._core.multiarray._reconstruct": "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct": "numpy._core.multiarray._reconstruct",  # the name numpy 1 wrote
    "numpy.ndarray": "numpy.ndarray",
    "numpy.dtype": "numpy.dtype",
}
"""Name a pickle may use -> the object it stands for (its module is imported only when a file is loaded)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file names a callable or type outside ALLOWED: loading it could run code."""


def refusal(path: str | Path, names: list[str]) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path} holds pickled {', '.join(sorted(names)[:3])}, which lm2 never writes into a checkpoint: loading it "
        "could run code, so lm2 refuses it; use only checkpoints written by lm2 that you received from someone "
        "you trust, and do not open this one with torch.load(weights_only=False)"
    )


@functools.cache
def _allowed_objects() -> list[tuple[Any, str]]:
    objects = []
    for name, target in ALLOWED.items():
        module, _, attribute = target.rpartition(".")
        objects.append((getattr(importlib.import_module(module), attribute), name))
    return objects


_torch_load = torch.load


def load(path: str | Path, map_location: Any = "cpu", mmap: bool | None = None) -> Any:
    """torch.load of a checkpoint file: tensors, plain containers and ALLOWED types only; UnsafeCheckpointError
    naming the file otherwise."""
    try:
        with torch.serialization.safe_globals(_allowed_objects()):
            return _torch_load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise refusal(path, re.findall(r"GLOBAL (\S+)", str(error)) or ["an object of an unknown type"]) from None


def unsafe_globals(path: str | Path) -> list[str]:
    """The names outside torch's and lm2's allowlists that a torch.save zip file's pickle refers to, found without
    loading it. A file of torch's legacy format cannot be read this way: [] (its load is checked all the same)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError, KeyError):  # not a zip written by torch.save: load() checks it
        return []
    return sorted(name for name in names if name not in ALLOWED)


def _checked_torch_load(f, map_location=None, *args, mmap=None, **kwargs) -> Any:
    """Stands in for torch.load inside torch_loads_checked(): whatever weights_only the caller asked for, the file
    is loaded by `load`."""
    return load(f, map_location, mmap=mmap)


@contextlib.contextmanager
def torch_loads_checked() -> Iterator[None]:
    """Routes torch.load through `load` while DeepSpeed's readers that call torch.load directly run (universal
    conversion and loading, zero_to_fp32): they pass weights_only=False, which would run a pickle's code."""
    torch.load = _checked_torch_load
    try:
        yield
    finally:
        torch.load = _torch_load
