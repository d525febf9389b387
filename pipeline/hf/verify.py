"""`--verify`: the exported folder, loaded by transformers, gives the training model's logits.

The training side is lm2's LM2Model holding the merged weights; the exported side is whatever
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads: transformers' own LlamaForCausalLM
for vanilla models (an independent implementation of RoPE, GQA and RMSNorm) or modeling_lm2.py for LM2. Inputs
span several segments, so memory writes and reads are exercised; all in fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lm2.model.config import ModelConfig
from lm2.model.errors import ExportError
from lm2.model.lm import LM2Model
from lm2.pipeline.parallel.init import world_of_one
from lm2.pipeline.parallel.mpu import tensor_parallel
from lm2.pipeline.parallel.tp_shards import load_full_state

TOLERANCE = 1e-4


def verification_tokens(cfg: ModelConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Random rows of row_length tokens, or of three segments if a row is shorter."""
    length = max(cfg.row_length, 3 * cfg.segment_length) if cfg.memory.enabled else cfg.row_length
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def lm2_logits(cfg: ModelConfig, state: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """The training model's logits (one process, fp32) over the true vocabulary."""
    with world_of_one(), torch.no_grad():
        model = LM2Model(cfg, tensor_parallel()).eval()
        load_full_state(model, {name: tensor.float() for name, tensor in state.items()})
        return model(tokens)[..., : cfg.vocab_size]


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


def verify_export(folder: Path, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> float:
    """The largest absolute logit difference; ExportError above TOLERANCE."""
    tokens = verification_tokens(cfg)
    difference = (hf_logits(folder, tokens) - lm2_logits(cfg, state, tokens)).abs().max().item()
    if not difference <= TOLERANCE:
        raise ExportError(
            f"verification failed: the exported model's logits differ from the training model's by "
            f"up to {difference:.3g} (tolerance {TOLERANCE}); the folder was not written"
        )
    return difference
