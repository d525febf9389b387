"""Writes a Hugging Face folder from whole lm2 weights: config.json, model.safetensors (sharded with an index
above the size limit), generation_config.json and the tokenizer.

Vanilla models become a plain LlamaForCausalLM. LM2 models become LM2ForCausalLM from modeling_lm2.py, which
save_pretrained copies into the folder with configuration_lm2.py and names in config.json's auto_map.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaTokenizer, LlamaTokenizerFast

from lm2.model.config import ModelConfig
from lm2.model.errors import ExportError
from lm2.pipeline.hf.configuration_lm2 import LM2Config
from lm2.pipeline.hf.modeling_lm2 import LM2ForCausalLM
from lm2.pipeline.hf.names import OUTPUT_LAYER, hf_name, to_hf

LM2Config.register_for_auto_class()
LM2ForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def hf_config(cfg: ModelConfig, special_ids: dict[str, int], dtype: torch.dtype):
    """The Hugging Face config of an lm2 model; special_ids: bos_token_id, eos_token_id, pad_token_id."""
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        torch_dtype=dtype,
        **special_ids,
    )
    if not cfg.memory.enabled:
        return LlamaConfig(
            **common,
            max_position_embeddings=cfg.row_length,
            head_dim=cfg.head_dim,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
        )
    return LM2Config(
        **common,
        segment_length=cfg.segment_length,
        memory_slots=cfg.memory.slots,
        memory_dim=cfg.memory_dim,
        memory_heads=cfg.memory.heads,
        memory_layers=cfg.memory.layers,
        memory_write_rule=cfg.memory.write_rule,
        memory_read_norm=cfg.memory.read_norm,
    )


def hf_model(cfg: ModelConfig, state: dict[str, torch.Tensor], special_ids: dict[str, int]):
    """The Hugging Face model holding `state` (whole tensors, LM2Model names); built on the meta device, so the
    weights are never allocated twice."""
    dtype = state["embed_tokens.weight"].dtype
    config = hf_config(cfg, special_ids, dtype)
    weights = to_hf(state)
    if cfg.tie_embeddings:  # the module has the attribute; save_pretrained stores the tied tensor once
        weights[OUTPUT_LAYER] = weights[hf_name("embed_tokens.weight")]
    with torch.device("meta"):
        model = (LlamaForCausalLM if isinstance(config, LlamaConfig) else LM2ForCausalLM)(config)
    result = model.load_state_dict(weights, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(
            f"the weights do not fit {type(model).__name__}: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    model.tie_weights()
    model.generation_config = GenerationConfig(**special_ids)
    return model


def write_tokenizer(sentencepiece_model: Path, out: Path) -> LlamaTokenizerFast:
    """A Llama tokenizer (slow and fast files) giving sentencepiece's ids: no BOS/EOS added (training rows are
    documents followed by EOS, no BOS), the dummy prefix kept (legacy), and special-token strings in text split
    as plain text, as sentencepiece does."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(sentencepiece_model))
    specials = {
        name: processor.id_to_piece(index)
        for name, index in (
            ("unk_token", processor.unk_id()),
            ("bos_token", processor.bos_id()),
            ("eos_token", processor.eos_id()),
            ("pad_token", processor.pad_id()),
        )
        if index >= 0
    }
    slow = LlamaTokenizer(
        str(sentencepiece_model),
        legacy=True,
        add_bos_token=False,
        add_eos_token=False,
        split_special_tokens=True,
        **specials,
    )
    slow.save_pretrained(out)  # tokenizer.model; the fast tokenizer is converted from the slow one's files
    fast = LlamaTokenizerFast.from_pretrained(out, from_slow=True, legacy=True)
    fast.save_pretrained(out)
    return fast


def special_token_ids(sentencepiece_model: Path) -> dict[str, int | None]:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(sentencepiece_model))
    ids = {"bos_token_id": processor.bos_id(), "eos_token_id": processor.eos_id(), "pad_token_id": processor.pad_id()}
    return {name: (index if index >= 0 else None) for name, index in ids.items()}


def write_folder(model, out: Path, max_shard_size: str) -> list[str]:
    """save_pretrained into `out`; returns the weight files written.

    safetensors (since 0.8) writes through a temporary file created 0600 and renames it, so the weights would be
    readable by their owner only, unlike the rest of the folder: on a shared cluster nobody else could load the model.
    They get config.json's mode, which an ordinary open() gave under the process's umask."""
    model.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
    mode = (out / "config.json").stat().st_mode & 0o777
    weights = sorted(out.glob("model*.safetensors"))
    for path in weights:
        path.chmod(mode)
    return [path.name for path in weights]
