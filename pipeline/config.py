"""The run configuration: a dataclass tree loaded from YAML plus dotted overrides, validated as it is built.

`load_config("configs/tiny.yaml", ["model.memory.slots=32"])` works like OLMo-core's merge: unknown keys fail
with the list of known ones, values are coerced to the field's type, and every dataclass checks itself.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lm2.model.config import ModelConfig, require, require_choice
from lm2.model.errors import ConfigError
from lm2.pipeline.data.config import DataConfig
from lm2.pipeline.parallel.dims import ParallelDims
from lm2.pipeline.train.config import OptimConfig, TrainConfig

ZeroStage = Literal[0, 1, 2, 3]
WandbMode = Literal["offline", "online", "disabled"]


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel degree: heads, memory heads, MLP and vocabulary are split over tp ranks."""
    pp: int = 1
    """Pipeline stages (DeepSpeed 1F1B). The world size must be a multiple of tp * pp; the rest is data-parallel."""
    zero_stage: ZeroStage = 1
    """DeepSpeed ZeRO stage for optimizer state (0-3 with pp=1; 0-1 with pp>1)."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"parallel.{name} must be a positive integer, got {value!r}")
        require_choice("parallel.zero_stage", self.zero_stage, ZeroStage)
        require(
            self.pp == 1 or self.zero_stage <= 1,
            f"parallel.zero_stage={self.zero_stage} with parallel.pp={self.pp}: DeepSpeed's pipeline engine "
            "supports ZeRO 0-1 only (ZeRO-2/3 partition gradients, which the 1F1B schedule accumulates across "
            "micro-batches); use zero_stage: 1 with pipelining or pp: 1 with ZeRO-2/3",
        )


@dataclass(frozen=True)
class LoggingConfig:
    run_dir: str = "runs/tiny"
    """Where the run writes: checkpoints/, wandb/, the resolved config."""
    wandb: WandbMode = "offline"
    """offline (default, no network), online, or disabled."""
    project: str = "lm2"
    run_name: str | None = None

    def __post_init__(self) -> None:
        require(bool(self.run_dir), "logging.run_dir is empty: give the folder the run writes to")
        require_choice("logging.wandb", self.wandb, WandbMode)


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100
    """Save every this many steps (0: only at the end and on a signal)."""
    keep: int = 3
    """Complete checkpoints to keep; older ones are deleted once a newer one is complete."""
    resume: str = "none"
    """none, auto (the newest complete checkpoint under logging.run_dir/checkpoints, if any), or the path of
    one checkpoint folder (.../checkpoints/step_00000100)."""
    async_save: bool = False
    """Periodic saves copy the state to host memory and write it on a background thread while training goes on; the
    checkpoint is published (manifest, `latest`, pruning) once every rank has written its files. The final save
    and a signal's save wait for a pending one and write synchronously."""

    def __post_init__(self) -> None:
        require(self.every >= 0, f"checkpoint.every must be >= 0, got {self.every}")
        require(self.keep >= 1, f"checkpoint.keep must be >= 1, got {self.keep}")
        require(bool(self.resume), "checkpoint.resume must be none, auto or a checkpoint folder")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    """The architecture (model/config.py)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Which prepared datasets to stream and in what order (pipeline/data/config.py)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def checkpoints(self) -> Path:
        """Where the run's checkpoints live: `<logging.run_dir>/checkpoints`."""
        return Path(self.logging.run_dir) / "checkpoints"

    def validate(self, world_size: int) -> ParallelDims:
        """What depends on the number of ranks: the degrees divide the world, every tensor-parallel split is even,
        every pipeline stage gets a block, and the global batch splits into whole micro-batches. The trainer and
        `lm2 info` both call it, so a layout that `lm2 info` accepts is one the trainer accepts."""
        dims = ParallelDims(world_size=world_size, tp=self.parallel.tp, pp=self.parallel.pp)
        self.model.validate_for_tp(dims.tp)
        if dims.pp > self.model.num_layers:
            raise ConfigError(
                f"parallel.pp={dims.pp} exceeds num_layers={self.model.num_layers}: every pipeline "
                "stage needs at least one block; lower parallel.pp"
            )
        self.train.grad_accum(dims.dp)
        for stage in self.train.stages:
            rows = stage.segments * self.model.segment_length
            if rows > self.model.row_length:
                raise ConfigError(
                    f"train.stages has a stage of {stage.segments} segments ({rows} tokens), longer than "
                    f"model.row_length={self.model.row_length}: raise model.row_length to the longest stage's rows"
                )
        if self.train.carry.enabled and not self.model.memory.enabled:
            raise ConfigError(
                f"train.carry.mode={self.train.carry.mode} carries the memory across rows, but model.memory.enabled "
                "is false: set train.carry.mode=none for a vanilla model"
            )
        return dims


_SCALARS = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}
"""Field type -> (what the error calls it, whether a YAML value is acceptable)."""


def _coerce(kind: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if kind in _SCALARS:
        label, accepts = _SCALARS[kind]
        if not accepts(value):
            raise ConfigError(f"{where} must be {label}, got {value!r}")
        if kind is float and not math.isfinite(value):  # YAML's .inf and .nan are floats
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value) if kind is float else value
    return value


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Builds dataclass `cls` from a mapping; `where` is the dotted path used in error messages."""
    label = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{label} must be a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {label}; known keys: {', '.join(fields)}")
    missing = [
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{label} is missing required key(s): {', '.join(missing)}")
    prefix = f"{where}." if where else ""
    return cls(**{name: _coerce(hints[name], value, prefix + name) for name, value in data.items()})


_HASH = "\ue000"
"""Stands in for `#` while an override's value is parsed (a private-use character no one types)."""


def _restore_hashes(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace(_HASH, "#")
    if isinstance(value, list):
        return [_restore_hashes(item) for item in value]
    if isinstance(value, dict):
        return {_restore_hashes(key): _restore_hashes(item) for key, item in value.items()}
    return value


def parse_value(raw: str) -> Any:
    """An override's value as YAML (numbers, booleans, lists, null), where `#` is always part of the value: on a
    command line it starts no comment (YAML would read `runs/exp #3` as `runs/exp`, and the run would write to
    another folder)."""
    return _restore_hashes(yaml.safe_load(raw.replace("#", _HASH)))


def apply_override(tree: dict[str, Any], override: str) -> None:
    """`a.b.c=value` sets tree[a][b][c]; the value is parsed by parse_value."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    path, raw = override.split("=", 1)
    keys = path.strip().split(".")
    try:
        value = parse_value(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({_yaml_problem(error)})") from None
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {key} is not a section")
    node[keys[-1]] = value


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's description without its multi-line excerpt of the file."""
    parts = [getattr(error, "context", None), getattr(error, "problem", None)]
    return ", ".join(part for part in parts if part) or str(error).splitlines()[0]


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (the shipped ones are in configs/)")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {_yaml_problem(error)}") from None
    for override in overrides:
        apply_override(tree, override)
    return from_dict(RunConfig, tree)
