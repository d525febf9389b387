"""The checkpoint format: what a checkpoint folder holds, its manifest, and the layout it was written at.

`<run_dir>/checkpoints/step_<8 digits>/` holds DeepSpeed's sharded states (model states per model-parallel rank or
pipeline layer, ZeRO optimizer partitions per data-parallel rank, LR scheduler), lm2's client state inside them (step,
samples, tokens, loader position, wandb run id, resolved config, code version), one RNG file per rank (and with carried
memory one file of lane states per rank), and `lm2_manifest.json`: every file with its size and sha256, the layout
("topology"), the config and the tokenizer's sha256. `checkpoints/latest` names the newest complete checkpoint;
`step_<N>_universal/` is its conversion to DeepSpeed's universal format, made when a run resumes it at another layout
(universal.py).

A checkpoint is complete when its manifest exists: the manifest is written only after every rank finished
writing, and a folder whose files do not match it is never loaded.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm2.model.errors import CheckpointError
from lm2.pipeline.files import write_atomic

MANIFEST = "lm2_manifest.json"
LATEST = "latest"
FORMAT = "lm2-checkpoint-v1"
UNIVERSAL_SUFFIX = "_universal"
"""`step_<N>` converted to DeepSpeed's universal format lives in `step_<N>_universal`."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_folders(root: Path) -> list[Path]:
    """Checkpoint folders (step_<8 digits>) under root, newest first; converted copies and temp files are not."""
    return sorted(
        (p for p in root.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d{8}", p.name)),
        key=lambda p: p.name,
        reverse=True,
    )


def rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng_rank_{rank:05d}.pt"


def carry_file(folder: Path, rank: int) -> Path:
    """A rank's carried memory (train.carry; pipeline/train/carry.py)."""
    return folder / f"carry_rank_{rank:05d}.pt"


@dataclass(frozen=True)
class Layout:
    """The parallel layout a checkpoint was written at (the manifest's "topology")."""

    tp: int
    pp: int
    dp: int
    zero_stage: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def reshardable(self) -> bool:
        """ZeRO 1 or 2: every parameter's optimizer state can be gathered whole into DeepSpeed's universal
        format and sliced again for any tp, pp and dp. (ZeRO-3 partitions the parameters themselves, which the
        converter does not handle; stage 0 keeps no partitioned state to convert.)"""
        return self.zero_stage in (1, 2)

    def describe(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp} zero_stage={self.zero_stage}"

    def to_dict(self) -> dict[str, int]:
        return {
            "tp": self.tp,
            "pp": self.pp,
            "dp": self.dp,
            "world_size": self.world_size,
            "zero_stage": self.zero_stage,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Layout:
        """From a manifest's topology (or universal info); other keys (world_size, ...) are derived or not ours."""
        return cls(**{f.name: int(values[f.name]) for f in dataclasses.fields(cls)})


def supports_reshard(layout_from: Layout, layout_to: Layout) -> bool:
    """Whether a checkpoint written at layout_from can be re-sliced for layout_to (any other tp, pp or dp)
    through DeepSpeed's universal format: both ends run ZeRO 1 or 2."""
    return layout_from.reshardable and layout_to.reshardable


@dataclass(frozen=True)
class Manifest:
    """What a checkpoint records: its step, layout, config and position in the data. Every rank saves it (less the
    files) in DeepSpeed's client state; rank 0 writes it, with every file's size and checksum, to
    `lm2_manifest.json` once all ranks have written their files."""

    step: int
    layout: Layout
    config: dict[str, Any]
    """The resolved run config (RunConfig.to_dict())."""
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Path relative to the folder -> {"bytes": size, "sha256": hex}; save() fills it in."""
    samples: int | None = None
    tokens: int | None = None
    code_version: str | None = None
    wandb_id: str | None = None
    data: dict[str, Any] | None = None
    """The training loader's position (RowLoader.state_dict()); None before any row was read."""
    stage: int | None = None
    """The curriculum stage (train.stages) whose data `data` is a position in; None without stages."""
    tokenizer_sha256: str | None = None
    """sha256 of the tokenizer the run's rows were made with: export uses that tokenizer or refuses."""

    def client_state(self) -> dict[str, Any]:
        """What every rank saves in DeepSpeed's client state, under "lm2"."""
        return {
            "step": self.step,
            "samples": self.samples,
            "tokens": self.tokens,
            "config": self.config,
            "code_version": self.code_version,
            "wandb_id": self.wandb_id,
            "data": self.data,
            "stage": self.stage,
        }

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "step": self.step,
                "files": self.files,
                "topology": self.layout.to_dict(),
                "config": self.config,
                "samples": self.samples,
                "tokens": self.tokens,
                "code_version": self.code_version,
                "wandb_id": self.wandb_id,
                "data": self.data,
                "stage": self.stage,
                "tokenizer_sha256": self.tokenizer_sha256,
            },
            indent=1,
            default=str,
        )

    @classmethod
    def from_json(cls, text: str, where: Path) -> Manifest:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{where} is not valid JSON ({error}); the checkpoint cannot be used") from None
        if not isinstance(values, dict) or values.get("format") != FORMAT:
            raise CheckpointError(f"{where.parent} is not an lm2 checkpoint of format {FORMAT}")
        try:
            return cls(
                step=values["step"],
                layout=Layout.from_dict(values["topology"]),
                config=values["config"],
                files=values["files"],
                samples=values.get("samples"),
                tokens=values.get("tokens"),
                code_version=values.get("code_version"),
                wandb_id=values.get("wandb_id"),
                data=values.get("data"),
                stage=values.get("stage"),
                tokenizer_sha256=values.get("tokenizer_sha256"),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{where} lacks or mangles {error}; the checkpoint cannot be used") from None


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST}: it is incomplete (the run stopped while saving)")
    return Manifest.from_json(path.read_text(), path)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    write_atomic(folder / MANIFEST, manifest.to_json())
