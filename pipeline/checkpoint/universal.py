"""DeepSpeed universal checkpoints: resume a ZeRO-1/2 checkpoint at another data-parallel, TP or PP size.

DeepSpeed refuses to load ZeRO optimizer partitions written at another DP size. Its universal checkpoint format
stores every parameter whole (fp32 master weight, Adam's exp_avg and exp_avg_sq, the step), so any layout can
slice its own partition out of it. The protocol:

1. Save (every rank, in the training job): put ``universal_checkpoint_info(engine, model_cfg)`` into the client
   state, ``engine.deepspeed.save_checkpoint(dir, tag, client_state={"universal_checkpoint_info": info, ...})``.
   A collective over the pipeline group (every rank calls it); it describes how the parameters are sharded,
   derived from megatron-core's ``tensor_model_parallel`` / ``partition_dim`` attributes, not from layer names.
2. Convert (one process, CPU, no process group needed): ``convert_to_universal(dir, tag)`` ->
   ``f"{tag}_universal"``, either before the resuming job starts (``lm2 ckpt universal DIR TAG``) or inside a job
   with ``convert_to_universal_on_rank0`` (global rank 0 converts, the others wait in a broadcast on a group of
   their own, with a timeout for the conversion's length). Written into a temp folder and renamed when complete;
   a killed conversion's temp folders are removed by the next. The universal folder names parameters as LM2Model
   does, whatever layout wrote it, and records which files of step_N it was made from.
3. Load (every rank, after ``build_engine`` / ``deepspeed.initialize`` at the new layout, ZeRO stage 1 or 2):
   ``load_universal(engine, dir, f"{tag}_universal")``. No ds_config change at build time: DeepSpeed reads
   ``checkpoint.load_universal`` only inside ``load_checkpoint``, so it is switched on for that call.

Tested (tests/pipeline/test_universal_checkpoint.py): DP=2 ZeRO-2 -> DP=1 ZeRO-2 -> DP=2 ZeRO-1; PP=2xDP=2 ->
PP=2xDP=1 (ZeRO-1); TP=2 -> PP=2; DP=2 -> TP=2. Not supported (refused): ZeRO stage 0 and 3. The universal
folder holds DeepSpeed's state only: lm2's manifest and per-rank RNG files are not carried over.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.checkpoint.constants import (
    ORIGINAL_VOCAB_SIZE,
    PADDED_VOCAB_SIZE,
    PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
    PIPELINE_REPLICATED_PARAMETER_PATTERNS,
    TP_REPLICATED_PARAMETER_PATTERNS,
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    VOCABULARY_PARAMETER_PATTERNS,
)
from megatron.core import parallel_state

from lm2.model.config import ModelConfig
from lm2.model.errors import CheckpointError
from lm2.model.lm import VOCAB_PARAMETERS
from lm2.pipeline.checkpoint import safe_load
from lm2.pipeline.checkpoint.format import UNIVERSAL_SUFFIX, Layout, supports_reshard
from lm2.pipeline.checkpoint.reader import module_tensors
from lm2.pipeline.files import write_atomic
from lm2.pipeline.parallel.pipe import model_name

LAYOUT_KEY = "lm2_layout"
"""Our own entry in the universal checkpoint info: the layout the checkpoint was written at (Layout's fields,
plus whether it was pipelined and the layer count, which map pipeline names back to LM2Model's)."""


def _pattern(name: str) -> str:
    return re.escape(name) + "$"


def universal_checkpoint_info(engine, model_cfg: ModelConfig) -> dict[str, Any]:
    """What DeepSpeed's ds_to_universal needs to know about our parameters; put it into the client state under
    ``UNIVERSAL_CHECKPOINT_INFO`` ("universal_checkpoint_info") at every save.

    engine: lm2's ``Engine`` (from build_engine). A collective over the pipeline-parallel group: the patterns
    cover the whole model, every stage's parameters, because the converter reads them from one file.

    Per parameter (names as ``engine.deepspeed.module.named_parameters()`` gives them, pipeline names when
    pipelined): not TP-sharded -> TP-replicated; sharded along dim 1 -> row-parallel (the converter concatenates
    TP slices on dim 1, default is dim 0); the embedding / output layer -> vocabulary (padding stripped on
    conversion, re-padded for the target TP degree on load); tied weights of a pipeline -> pipeline-replicated.
    """
    ds, layout = engine.deepspeed, engine.layout
    if not layout.reshardable:
        raise CheckpointError(
            f"universal checkpoints are supported for ZeRO stage 1 and 2 only, this engine runs stage "
            f"{layout.zero_stage}"
        )
    described = []
    for name, param in ds.module.named_parameters():
        sharded = bool(getattr(param, "tensor_model_parallel", False))
        dim = getattr(param, "partition_dim", None) if sharded else None
        if sharded and (dim not in (0, 1) or getattr(param, "partition_stride", 1) != 1):
            raise CheckpointError(
                f"{name}: TP-sharded along dim {dim} with stride {getattr(param, 'partition_stride', 1)}; the "
                "universal format handles contiguous shards along dim 0 or 1 only"
            )
        described.append((name, sharded, dim))
    if engine.pipelined:
        stages = [None] * layout.pp
        dist.all_gather_object(stages, described, group=parallel_state.get_pipeline_model_parallel_group())
        merged = {}
        for stage in stages:
            for name, sharded, dim in stage:
                merged.setdefault(name, (sharded, dim))
        described = [(name, sharded, dim) for name, (sharded, dim) in merged.items()]

    replicated, row_parallel, vocabulary, pipeline_replicated = [], [], [], []
    for name, sharded, dim in described:
        lm2_name = model_name(name, model_cfg.num_layers) if engine.pipelined else name
        if not sharded:
            replicated.append(_pattern(name))
        elif dim == 1:
            row_parallel.append(_pattern(name))
        if lm2_name in VOCAB_PARAMETERS:
            vocabulary.append(_pattern(name))
        if engine.pipelined and name.startswith("tied_modules."):
            pipeline_replicated.append(_pattern(name))

    return {
        UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        TP_REPLICATED_PARAMETER_PATTERNS: replicated,
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: row_parallel,
        VOCABULARY_PARAMETER_PATTERNS: vocabulary,
        PIPELINE_REPLICATED_PARAMETER_PATTERNS: pipeline_replicated,
        ORIGINAL_VOCAB_SIZE: model_cfg.vocab_size,
        PADDED_VOCAB_SIZE: model_cfg.padded_vocab_size(layout.tp),
        LAYOUT_KEY: {
            "tp": layout.tp,
            "pp": layout.pp,
            "dp": layout.dp,
            "pipelined": engine.pipelined,
            "zero_stage": layout.zero_stage,
            "num_layers": model_cfg.num_layers,
        },
    }


def _model_state_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("mp_rank_*_model_states.pt"))


def read_info(folder: str | os.PathLike) -> dict[str, Any]:
    """The universal checkpoint info saved in a (universal or not) checkpoint folder."""
    files = _model_state_files(Path(folder))
    if not files:
        raise CheckpointError(f"{folder}: no mp_rank_*_model_states.pt, not a DeepSpeed checkpoint")
    state = safe_load.load(files[0])
    info = state.get(UNIVERSAL_CHECKPOINT_INFO)
    if info is None:
        raise CheckpointError(
            f"{folder} has no {UNIVERSAL_CHECKPOINT_INFO} in its client state: it was saved without "
            "lm2.pipeline.checkpoint.universal.universal_checkpoint_info and cannot be converted"
        )
    return info


SOURCE_FILE = "lm2_source.json"
"""In a universal folder: the files of the checkpoint it was converted from (name, size, modification time)."""


def _source_files(source: Path) -> list[list]:
    return sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in source.iterdir() if p.is_file())


def _is_conversion_of(target: Path, source: Path) -> bool:
    """Whether universal folder `target` was converted from checkpoint `source` as it is now: a step_N written again
    invalidates the step_N_universal of its old files."""
    recorded = target / SOURCE_FILE
    return recorded.is_file() and json.loads(recorded.read_text()) == _source_files(source)


def _remove_leftovers(root: Path, new_tag: str) -> None:
    """The temp folders of conversions of this checkpoint that were killed: only one conversion of a run's
    checkpoint runs at a time (a job's rank 0, or `lm2 ckpt universal`, each holding the run folder's lock), so any
    found now is abandoned."""
    for folder in root.glob(f".{new_tag}.*-*"):
        shutil.rmtree(folder, ignore_errors=True)


def convert_to_universal(checkpoint_dir: str, tag: str) -> str:
    """Converts ``<checkpoint_dir>/<tag>`` into ``<checkpoint_dir>/<tag>_universal`` and returns the new tag.

    Runs DeepSpeed's ds_to_universal in this process (no worker pools, CPU only, no process group needed): call
    it before the distributed job starts, or on one rank while the others wait (see
    ``convert_to_universal_on_rank0``). Never call it on several ranks at once. Writes into a temp folder
    renamed into place when complete; an existing ``<tag>_universal`` is reused if it was converted from the
    checkpoint's current files (its SOURCE_FILE), else converted again. Also points
    ``<checkpoint_dir>/latest_universal`` at the new tag. Every file is read through safe_load.
    """
    from deepspeed.checkpoint import ds_to_universal

    root = Path(checkpoint_dir)
    source = root / tag
    if not source.is_dir():
        raise CheckpointError(f"no checkpoint {source}")
    new_tag = tag + UNIVERSAL_SUFFIX
    target = root / new_tag
    _remove_leftovers(root, new_tag)
    if target.exists() and not _is_conversion_of(target, source):
        shutil.rmtree(target)
    if not target.exists():
        info = read_info(source)
        if LAYOUT_KEY not in info:
            raise CheckpointError(f"{source}: its universal info has no lm2 layout: not written by lm2")
        layout = Layout.from_dict(info[LAYOUT_KEY])
        if not layout.reshardable:
            raise CheckpointError(f"{source}: ZeRO stage {layout.zero_stage}; only stage 1 and 2 are supported")
        tmp = root / f".{new_tag}.tmp-{os.getpid()}"
        staging = root / f".{new_tag}.src-{os.getpid()}"
        log = io.StringIO()
        latest = root / "latest_universal"
        previous_latest = latest.read_text() if latest.is_file() else None
        try:
            _stage_source(source, staging)
            args = argparse.Namespace(
                input_folder=str(staging),
                output_folder=str(tmp),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=False,
            )
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), safe_load.torch_loads_checked():
                ds_to_universal.main(args)
            _canonical_names(tmp / "zero", info)
            write_atomic(tmp / SOURCE_FILE, json.dumps(_source_files(source)))
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if previous_latest is not None:  # ds_to_universal may have pointed it at the temp folder
                _write_latest(root, previous_latest)
            else:
                latest.unlink(missing_ok=True)
            if isinstance(exc, CheckpointError):  # safe_load's refusal: one line, as it is
                raise
            raise CheckpointError(
                f"ds_to_universal failed on {source}: {exc!r}\n--- its output ---\n{log.getvalue()[-4000:]}"
            ) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        os.replace(tmp, target)
    _write_latest(root, new_tag)
    return new_tag


def _canonical_names(zero: Path, info: dict[str, Any]) -> None:
    """Renames the per-parameter folders of a pipelined checkpoint to LM2Model names, so that the universal
    checkpoint reads the same whatever the layout that wrote it (load_universal maps back)."""
    layout = info[LAYOUT_KEY]
    if not layout["pipelined"]:
        return
    for folder in sorted(zero.iterdir()):
        if folder.is_dir():
            folder.rename(zero / model_name(folder.name, layout["num_layers"]))


def _stage_source(source: Path, staging: Path) -> None:
    """The converter's input: the checkpoint's files hard-linked (copied where links fail), except the model
    state files, rewritten without non-tensor module entries. megatron-core's layers put `_extra_state: None`
    into state_dict(), and ds_to_universal calls .float() on every module entry (AttributeError on None).
    The source checkpoint is never modified."""
    staging.mkdir(parents=True)
    for path in source.iterdir():
        if not path.is_file():
            continue
        if path.name.startswith("mp_rank_") and path.name.endswith("_model_states.pt"):
            state = safe_load.load(path)
            if isinstance(state.get("module"), dict):
                state["module"] = module_tensors(state["module"])
            torch.save(state, staging / path.name)
            continue
        try:
            os.link(path, staging / path.name)
        except OSError:
            shutil.copy2(path, staging / path.name)


def _write_latest(root: Path, tag: str) -> None:
    """ds_to_universal points latest_universal at its own (temp) output folder: point it at the final tag."""
    write_atomic(root / "latest_universal", tag)


CONVERSION_TIMEOUT = timedelta(hours=24)
"""How long the other ranks wait for rank 0's conversion. ds_to_universal runs at disk speed on one process, hours
for a large model, far beyond the process group's timeout (init.py: 10 minutes): the ranks wait in a gloo group of
their own with this timeout instead."""


def convert_to_universal_on_rank0(checkpoint_dir: str, tag: str) -> str:
    """Inside a distributed job: global rank 0 converts, every rank waits and gets the new tag. A collective over the
    world; a failure on rank 0 is raised on every rank. The wait is on a gloo group with CONVERSION_TIMEOUT: the
    default group's timeout (and NCCL's watchdog) never sees it."""
    waiting = dist.new_group(backend="gloo", timeout=CONVERSION_TIMEOUT)
    result: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            result[0] = ("ok", convert_to_universal(checkpoint_dir, tag))
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            result[0] = ("error", str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(result, src=0, group=waiting)
    dist.destroy_process_group(waiting)
    status, value = result[0]
    if status != "ok":
        raise CheckpointError(f"converting {tag} for this layout failed: {value}")
    return value


def universal_names(engine, num_layers: int) -> dict[torch.nn.Parameter, str]:
    """This rank's parameters -> their folder in a universal checkpoint (LM2Model names at any layout)."""
    named = engine.deepspeed.module.named_parameters()
    if engine.pipelined:
        return {param: model_name(name, num_layers) for name, param in named}
    return {param: name for name, param in named}


def check_loadable(engine, folder: Path, info: dict[str, Any]) -> dict[torch.nn.Parameter, str]:
    """Refuses what the universal format cannot load into this engine (raises CheckpointError);
    returns this rank's parameter -> universal name map."""
    saved = info.get(LAYOUT_KEY)
    if saved is None:
        raise CheckpointError("the checkpoint's universal info has no lm2 layout: not written by lm2")
    if not supports_reshard(Layout.from_dict(saved), engine.layout):
        raise CheckpointError(
            f"loading a universal checkpoint needs ZeRO stage 1 or 2 at both ends: it was written at ZeRO stage "
            f"{saved['zero_stage']}, this engine runs stage {engine.layout.zero_stage}"
        )
    names = universal_names(engine, saved["num_layers"])
    zero = folder / "zero"
    missing = sorted(name for name in names.values() if not (zero / name / "fp32.pt").is_file())
    if missing:
        raise CheckpointError(
            f"{folder} holds no state for {len(missing)} parameters of this model (e.g. {missing[:3]}): it was "
            "written for another model (layer count, tied embeddings, memory)"
        )
    return names


@contextlib.contextmanager
def _universal_loading(ds, names: dict[torch.nn.Parameter, str]):
    """DeepSpeed reads checkpoint.load_universal only inside load_checkpoint, and finds each parameter's folder
    under optimizer.param_names: both are switched for the duration of the load."""
    config, optimizer = ds._config, ds.optimizer
    previous_flag, previous_names = config.load_universal_checkpoint, optimizer.param_names
    config.load_universal_checkpoint = True
    optimizer.param_names = {**previous_names, **names}
    try:
        yield
    finally:
        config.load_universal_checkpoint = previous_flag
        optimizer.param_names = previous_names


def load_universal(engine, checkpoint_dir: str, tag: str, load_lr_scheduler_states: bool = True):
    """Loads a universal checkpoint (from convert_to_universal) into an engine of any DP size.

    Every rank, after build_engine. Restores fp32 master weights, Adam moments and step, the LR scheduler and
    DeepSpeed's step counters, then copies the weights into the model. Returns (load_path, client_state) like
    ``DeepSpeedEngine.load_checkpoint``.
    """
    folder = Path(checkpoint_dir) / tag
    if not (folder / "zero" / "optimizer_state.pt").is_file():
        raise CheckpointError(
            f"{folder} is not a universal checkpoint (no zero/optimizer_state.pt): "
            "convert it with convert_to_universal first"
        )
    names = check_loadable(engine, folder, read_info(folder))
    ds = engine.deepspeed
    with _universal_loading(ds, names), safe_load.torch_loads_checked():  # DeepSpeed reads these with torch.load
        load_path, client_state = ds.load_checkpoint(
            str(checkpoint_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=load_lr_scheduler_states
        )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed loaded nothing from {folder}")
    _steps_beside_their_parameters(ds.optimizer)
    return load_path, client_state


def _steps_beside_their_parameters(optimizer) -> None:
    """DeepSpeed's universal loading sets each parameter's Adam `step` to the tensor it read, which the conversion
    left on the CPU; torch's fused AdamW on a GPU refuses a step that is not on its parameter's device
    (pytorch/pytorch#104767). `optimizer` is DeepSpeed's wrapper (ZeRO, bf16) or, without one, torch's AdamW."""
    adamw = getattr(optimizer, "optimizer", optimizer)
    for param, state in adamw.state.items():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].to(param.device)
