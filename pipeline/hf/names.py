"""The parameter-name table between lm2 (LM2Model names, whole tensors) and Hugging Face, and how tensor
parallelism splits each parameter. Export and import both use it; nothing else lists parameter names.

LM2Model names its weights as Hugging Face Llama does (`embed_tokens.weight`, `layers.{i}.self_attn.q_proj.weight`,
...), so the Hugging Face name is the lm2 name under `model.`, except the output layer. The memory tensors keep
their lm2 names and shapes in `modeling_lm2.py`.

Splits (dimension of the contiguous TP chunks, None when every TP rank holds the whole tensor): column-parallel
linears and head-local memory tensors split dim 0, row-parallel linears and the memory bank dim 1; the embedding
and output layer split dim 0 over the padded vocabulary.
"""

from __future__ import annotations

from lm2.model.config import ModelConfig

COLUMN, ROW, REPLICATED = 0, 1, None

GLOBAL_PARAMETERS = {"embed_tokens.weight": COLUMN, "norm.weight": REPLICATED}
OUTPUT_LAYER = "lm_head.weight"

BLOCK_PARAMETERS = {
    "input_layernorm.weight": REPLICATED,
    "self_attn.q_proj.weight": COLUMN,
    "self_attn.k_proj.weight": COLUMN,
    "self_attn.v_proj.weight": COLUMN,
    "self_attn.o_proj.weight": ROW,
    "post_attention_layernorm.weight": REPLICATED,
    "mlp.gate_proj.weight": COLUMN,
    "mlp.up_proj.weight": COLUMN,
    "mlp.down_proj.weight": ROW,
}

MEMORY_PARAMETERS = {
    "memory.init_bank": ROW,  # [slots, d_m]: columns belong to memory heads
    "memory.read_q.weight": COLUMN,
    "memory.read_k": COLUMN,  # head-local tensors: [heads, ...]
    "memory.read_v": COLUMN,
    "memory.out_gate": COLUMN,
    "memory.out_gate_bias": COLUMN,
    "memory.out_proj.weight": ROW,
    "memory.write_q": COLUMN,
    "memory.write_k.weight": COLUMN,
    "memory.write_v.weight": COLUMN,
    "memory.in_gate": COLUMN,
    "memory.in_gate_bias": COLUMN,
    "memory.forget_gate": COLUMN,
    "memory.forget_gate_bias": COLUMN,
}


def parameter_splits(cfg: ModelConfig) -> dict[str, int | None]:
    """Every parameter of a model of `cfg` (LM2Model names) -> the dimension TP splits it along."""
    splits = dict(GLOBAL_PARAMETERS)
    for index in range(cfg.num_layers):
        per_block = {**BLOCK_PARAMETERS, **(MEMORY_PARAMETERS if cfg.has_memory(index) else {})}
        splits.update({f"layers.{index}.{name}": split for name, split in per_block.items()})
    if not cfg.tie_embeddings:
        splits[OUTPUT_LAYER] = COLUMN
    return splits


def hf_name(lm2_name: str) -> str:
    return lm2_name if lm2_name == OUTPUT_LAYER else f"model.{lm2_name}"


def lm2_name(hf: str) -> str:
    return hf if hf == OUTPUT_LAYER else hf.removeprefix("model.")


def to_hf(state: dict) -> dict:
    return {hf_name(name): tensor for name, tensor in state.items()}


def from_hf(state: dict) -> dict:
    return {lm2_name(name): tensor for name, tensor in state.items()}
