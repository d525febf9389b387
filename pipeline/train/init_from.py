"""`train.init_from`: a new run starts from another model's weights (fine-tuning), with the fresh optimizer, LR
schedule and data position of a new run.

The source is an lm2 checkpoint of any layout (read offline by checkpoint/reader.py, its files verified against
the manifest) or a Hugging Face folder with safetensors weights: lm2's own LM2 export or a Llama. Its model must
have the run's shape (ARCHITECTURE); a source without memory (a Llama, a vanilla run) gives the backbone, and the
memory starts as a new run's. Every rank reads the whole state and copies its own part into the engine at the
run's layout (importer.load_into_engine: any TP, PP and ZeRO stage; DeepSpeed's fp32 master copy refreshed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lm2.model.config import ModelConfig
from lm2.model.errors import ConfigError
from lm2.pipeline.checkpoint.reader import model_config, read_full_state, resolve
from lm2.pipeline.checkpoint.resume import job_team
from lm2.pipeline.checkpoint.verify import verify
from lm2.pipeline.hf.importer import check_shapes, load_into_engine, read_hf_weights
from lm2.pipeline.train.engine import Engine, full_model_state

BACKBONE = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "ffn_hidden_size",
    "tie_embeddings",
)
"""ModelConfig fields that fix the backbone's tensors. The memory's are memory.enabled, slots, dim, heads, layers.
Fields that only change how the weights are used (row_length, segment_length, rope_theta, norm_eps, init_std and
the memory's bptt_segments, write_rule, read_norm and bias inits) may differ: a fine-tuning run may change them."""


@dataclass(frozen=True)
class Source:
    """What init_from names: its weights under LM2Model names (whole tensors) and the architecture they have."""

    path: Path
    weights: dict[str, torch.Tensor]
    architecture: dict[str, Any]


def architecture(cfg: ModelConfig) -> dict[str, Any]:
    """The shape of a model's tensors as dotted config fields, defaults resolved (memory.dim None is hidden_size,
    memory.layers None is every block)."""
    shape: dict[str, Any] = {f"model.{name}": getattr(cfg, name) for name in BACKBONE}
    shape["model.memory.enabled"] = cfg.memory.enabled
    if cfg.memory.enabled:
        shape["model.memory.slots"] = cfg.memory.slots
        shape["model.memory.dim"] = cfg.memory_dim
        shape["model.memory.heads"] = cfg.memory.heads
        shape["model.memory.layers"] = [i for i in range(cfg.num_layers) if cfg.has_memory(i)]
    return shape


def hf_architecture(hf: dict[str, Any]) -> dict[str, Any]:
    """architecture() of the model a Hugging Face config.json describes (LM2 or Llama)."""
    shape = {
        "model.vocab_size": hf["vocab_size"],
        "model.hidden_size": hf["hidden_size"],
        "model.num_layers": hf["num_hidden_layers"],
        "model.num_heads": hf["num_attention_heads"],
        "model.num_kv_heads": hf.get("num_key_value_heads", hf["num_attention_heads"]),
        "model.ffn_hidden_size": hf["intermediate_size"],
        "model.tie_embeddings": hf.get("tie_word_embeddings", False),
        "model.memory.enabled": hf["model_type"] == "lm2",
    }
    if shape["model.memory.enabled"]:
        layers = hf.get("memory_layers")
        shape["model.memory.slots"] = hf["memory_slots"]
        shape["model.memory.dim"] = hf.get("memory_dim") or hf["hidden_size"]
        shape["model.memory.heads"] = hf["memory_heads"]
        shape["model.memory.layers"] = list(range(hf["num_hidden_layers"])) if layers is None else sorted(layers)
    return shape


def check_architecture(source: Path, theirs: dict[str, Any], cfg: ModelConfig) -> None:
    """ConfigError naming the first field where the source's shape is not the run's. A source without memory fits
    any memory settings (its backbone is taken, the memory starts fresh)."""
    ours = architecture(cfg)
    keys = ours if theirs["model.memory.enabled"] else [f"model.{name}" for name in BACKBONE]
    for key in keys:
        if theirs.get(key) != ours.get(key):
            raise ConfigError(
                f"train.init_from {source} has {key}={theirs.get(key)!r} but the config says {ours.get(key)!r}: "
                f"set {key}={theirs.get(key)!r}, or start from a model of the config's shape"
            )


def read_checkpoint(path: Path, cfg: ModelConfig) -> Source:
    """An lm2 checkpoint, its files verified against the manifest (a collective: the ranks share the hashing)."""
    folder = resolve(path)
    manifest = verify(folder, job_team()).manifest
    saved = model_config(manifest)
    check_architecture(folder, architecture(saved), cfg)
    return Source(folder, read_full_state(folder, manifest), architecture(saved))


def read_hf_folder(path: Path, cfg: ModelConfig) -> Source:
    """lm2's LM2 export or a Llama (checked as `lm2 import hf` checks one)."""
    hf = json.loads((path / "config.json").read_text())
    if hf.get("model_type") not in ("lm2", "llama"):
        raise ConfigError(
            f"train.init_from {path} holds a {hf.get('model_type')!r} model: give an lm2 checkpoint, an LM2 folder "
            "written by `lm2 export hf`, or a Llama"
        )
    if hf["model_type"] == "llama":
        check_shapes(hf, cfg)
    check_architecture(path, hf_architecture(hf), cfg)
    return Source(path, read_hf_weights(path, cfg), hf_architecture(hf))


def read_source(path: str, cfg: ModelConfig) -> Source:
    source = Path(path)
    if (source / "config.json").is_file():
        return read_hf_folder(source, cfg)
    if source.exists():
        return read_checkpoint(source, cfg)
    raise ConfigError(
        f"train.init_from {source} does not exist: give an lm2 checkpoint (a step_* folder or a run's checkpoints "
        "folder) or a Hugging Face folder"
    )


def full_state(engine: Engine, cfg: ModelConfig, source: Source) -> dict[str, torch.Tensor]:
    """Every weight of the run's model: the source's, and a new run's memory where the source has none. ConfigError
    on names or shapes that differ from the engine's model (a collective: the engine's weights are gathered)."""
    fresh = full_model_state(engine, cfg.vocab_size, cfg.num_layers)
    state = source.weights
    if not source.architecture["model.memory.enabled"]:
        state = {**{name: t for name, t in fresh.items() if ".memory." in name}, **state}
    unknown, missing = sorted(set(state) - set(fresh)), sorted(set(fresh) - set(state))
    if unknown or missing:
        raise ConfigError(
            f"train.init_from {source.path} holds {unknown[:3]} and lacks {missing[:3]} of the run's model: "
            "give a model of the config's architecture"
        )
    for name, tensor in state.items():
        if tensor.shape != fresh[name].shape:
            raise ConfigError(
                f"train.init_from {source.path}: {name} is {tuple(tensor.shape)}, the run's is "
                f"{tuple(fresh[name].shape)}"
            )
    return state


def initialise(engine: Engine, cfg: ModelConfig, path: str) -> Path:
    """Copies the weights of `path` into every rank's part of the engine; returns the source folder read."""
    source = read_source(path, cfg)
    load_into_engine(engine, cfg, full_state(engine, cfg, source))
    return source.path
