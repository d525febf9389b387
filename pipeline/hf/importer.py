"""`lm2 import hf`: a Hugging Face Llama -> a step-0 training checkpoint of an lm2 run, at the layout the command
is launched with (under torchrun for TP/PP/DP), resumable with `lm2 train --resume <output>/step_00000000`.

The run's engine is built as for training (fresh initialisation, so memory tensors start as a new run's would);
the Llama weights then replace the backbone on every rank, DeepSpeed's fp32 master copy is refreshed from them,
and the engine is saved in lm2's checkpoint format at step 0, with no data read yet.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from lm2.model.config import ModelConfig
from lm2.model.errors import ExportError
from lm2.pipeline.config import load_config
from lm2.pipeline.hf.names import OUTPUT_LAYER, from_hf
from lm2.pipeline.parallel.pipe import model_name
from lm2.pipeline.parallel.tp_shards import local_shard
from lm2.pipeline.train.engine import full_model_state

HF_FIELDS = {  # Hugging Face LlamaConfig field -> lm2 model field
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "ffn_hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "tie_word_embeddings": "tie_embeddings",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "norm_eps",
}
UNSUPPORTED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "rope_scaling": None}
"""Llama variants lm2's backbone does not implement: field -> the only value accepted."""


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"{hf_dir} has no config.json: give a folder written by save_pretrained")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(
            f"{path} is not valid JSON ({error}): give a folder written by save_pretrained, or repair the file"
        ) from None
    if not isinstance(config, dict):
        raise ExportError(
            f"{path} holds {type(config).__name__}, not a model config: give a folder written by save_pretrained"
        )
    if config.get("model_type") != "llama":
        raise ExportError(f"{hf_dir} holds a {config.get('model_type')!r} model; only llama models can be imported")
    return config


def check_shapes(hf: dict, cfg: ModelConfig) -> None:
    """Refuses a Hugging Face model that is not the run's backbone, naming the field that disagrees."""
    defaults = {
        "num_key_value_heads": hf.get("num_attention_heads"),
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
    }  # LlamaConfig's defaults for fields it may omit
    for hf_field, field in HF_FIELDS.items():
        theirs, ours = hf.get(hf_field, defaults.get(hf_field)), getattr(cfg, field)
        if theirs != ours:
            raise ExportError(
                f"the Hugging Face model has {hf_field}={theirs!r} but the config has model.{field}="
                f"{ours!r}: set model.{field}={theirs!r}"
            )
    if hf.get("head_dim", cfg.head_dim) != cfg.head_dim:
        raise ExportError(
            f"the Hugging Face model has head_dim={hf['head_dim']} but lm2 uses hidden_size/num_heads="
            f"{cfg.head_dim}: it cannot be imported"
        )
    for field, value in UNSUPPORTED.items():
        if hf.get(field, value) != value:
            raise ExportError(f"the Hugging Face model has {field}={hf[field]!r}; lm2's backbone needs {value!r}")


def read_hf_weights(hf_dir: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The backbone weights under LM2Model names (fp32), whole."""
    from safetensors.torch import load_file

    index = hf_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    if not all((hf_dir / name).is_file() for name in files):
        raise ExportError(f"{hf_dir} lacks {files[0]}: only safetensors weights can be imported")
    weights = {}
    for name in files:
        weights.update(from_hf(load_file(hf_dir / name)))
    if cfg.tie_embeddings:
        weights.pop(OUTPUT_LAYER, None)
    return {name: tensor.float() for name, tensor in weights.items()}


def merged_state(engine, cfg: ModelConfig, backbone: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fresh model's whole state with the backbone replaced; refuses weights it does not know or shapes that
    disagree. A collective over the world."""
    state = full_model_state(engine, cfg.vocab_size, cfg.num_layers)
    unknown = sorted(set(backbone) - set(state))
    if unknown:
        raise ExportError(f"the Hugging Face weights hold {unknown[:3]}, which the lm2 model has not")
    for name, tensor in backbone.items():
        if tensor.shape != state[name].shape:
            raise ExportError(
                f"{name}: the Hugging Face weight is {tuple(tensor.shape)}, the lm2 model's {tuple(state[name].shape)}"
            )
    missing = sorted(name for name in state if name not in backbone and ".memory." not in name)
    if missing:
        raise ExportError(f"the Hugging Face weights lack {missing[:3]}")
    return {**state, **backbone}


def load_into_engine(engine, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> None:
    """Copies every rank's part of `state` into its parameters (ZeRO-3: gathered, modified, re-partitioned),
    then refreshes the optimizer's fp32 master copy, which DeepSpeed made from the old weights."""
    from megatron.core import parallel_state

    ds = engine.deepspeed
    tp = parallel_state.get_tensor_model_parallel_world_size()
    padded_vocab = cfg.padded_vocab_size(tp)
    named = list(ds.module.named_parameters())
    zero3 = ds.zero_optimization_stage() == 3
    if zero3 and tp > 1:
        raise ExportError(
            "importing at ZeRO-3 with tensor parallelism is not supported: use parallel.tp=1 or "
            "another ZeRO stage (a ZeRO-1/2 checkpoint resumes at other stages)"
        )
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0, enabled=zero3), torch.no_grad():
        for name, param in named:
            lm2 = model_name(name, cfg.num_layers) if engine.pipelined else name
            param.copy_(local_shard(param, lm2, state[lm2], padded_vocab).to(param.dtype))
    if hasattr(ds.optimizer, "refresh_fp32_params"):
        ds.optimizer.refresh_fp32_params()


def check_output(output: Path, force: bool) -> None:
    """Refuses an --output that already holds checkpoints (step 0 would join another run's), unless `force`."""
    held = sorted(p.name for p in output.glob("step_*")) if output.is_dir() else []
    if (output / "step_00000000").exists():
        raise ExportError(f"{output / 'step_00000000'} exists: choose another --output")
    if held and not force:
        raise ExportError(
            f"{output} already holds checkpoints ({held[-1]}): choose another --output, or pass --force to add "
            "step_00000000 beside them"
        )


def import_hf(
    hf_dir: str | os.PathLike,
    config: str,
    output: str | os.PathLike,
    overrides: list[str] | tuple[str, ...] = (),
    force: bool = False,
) -> str | None:
    """Writes `<output>/step_00000000`; returns the summary line on rank 0 (None on the others). `force`: even into
    a folder that holds checkpoints already."""
    from lm2.pipeline.checkpoint.format import Manifest
    from lm2.pipeline.checkpoint.save import Retention, code_version, save
    from lm2.pipeline.files import sha256_file
    from lm2.pipeline.launch.environment import launched_world_size
    from lm2.pipeline.parallel.init import init_distributed
    from lm2.pipeline.train.build import seed_everything
    from lm2.pipeline.train.engine import build_engine

    hf_dir, output = Path(hf_dir), Path(output)
    run = load_config(config, overrides)
    hf = read_hf_config(hf_dir)
    check_shapes(hf, run.model)
    check_output(output, force)
    backbone = read_hf_weights(hf_dir, run.model)
    run.validate(launched_world_size(os.environ))
    dims = init_distributed(run.parallel.tp, run.parallel.pp)
    seed_everything(run.train.seed)  # the memory tensors start as a new run's would
    engine = build_engine(run, dims)
    load_into_engine(engine, run.model, merged_state(engine, run.model, backbone))
    manifest = Manifest(
        step=0,
        layout=engine.layout,
        config=run.to_dict(),
        samples=0,
        tokens=0,
        code_version=code_version(),
        tokenizer_sha256=sha256_file(run.data.tokenizer) if run.data.tokenizer else None,
    )
    folder = save(engine, output, manifest, Retention(run.checkpoint.keep))
    if dist.get_rank() != 0:
        return None
    return (
        f"wrote {folder} ({engine.layout.describe()}): {len(backbone)} tensors from {hf_dir}, memory freshly "
        f"initialised; continue with `lm2 train --config {config} --resume {folder}` at this layout"
    )
