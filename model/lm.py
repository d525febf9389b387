"""The LM2 language model: embedding, decoder blocks, final norm and a vocab-parallel output layer."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import VocabParallelEmbedding, vocab_parallel_cross_entropy
from torch import nn

from lm2.model.block import DecoderBlock
from lm2.model.config import ModelConfig
from lm2.model.layers import RMSNorm, TensorParallel, normal_init


class LM2Model(nn.Module):
    """Decoder-only LM2 (or, with memory disabled, a plain Llama-style model) on megatron-core TP layers.

    Weight names follow Hugging Face Llama (embed_tokens, layers.{i}.self_attn.q_proj, ..., norm, lm_head), so
    export is a rename table plus the memory tensors. Logits stay vocab-parallel: each TP rank holds its slice
    of the padded vocabulary; padding columns are masked so they take no probability, which makes the loss
    independent of how much padding a TP degree needs.

    megatron-core's parallel_state must be initialised, also in a single process (a world of one): its layers and
    cross-entropy take their tensor-parallel group from it. `lm2.pipeline.parallel.init.init_distributed` does.

    Args:
        cfg: the architecture, validated.
        params_dtype: fp32 on CPU, bf16 on GPU.
        cpu_init: draw every full weight on CPU from the global RNG and keep this rank's slice (TP-invariant
            initialisation); False initialises on the GPU with megatron's RNG tracker.
    """

    def __init__(self, cfg: ModelConfig, params_dtype: torch.dtype = torch.float32, cpu_init: bool = True):
        super().__init__()
        tp = TensorParallel.from_parallel_state(params_dtype, cpu_init)
        cfg.validate_for_tp(tp.size)
        self.cfg = cfg
        self.padded_vocab_size = cfg.padded_vocab_size(tp.size)
        init = normal_init(cfg.init_std)
        self.embed_tokens = VocabParallelEmbedding(self.padded_vocab_size, cfg.hidden_size, config=tp.config,
                                                   init_method=init, tp_group=tp.group)
        self.layers = nn.ModuleList(DecoderBlock(cfg, tp, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        # Tied: the head reuses embed_tokens.weight, passed at call time (same [V/tp, d] vocab split).
        self.lm_head = tp.column(cfg.hidden_size, self.padded_vocab_size, init,
                                 skip_weight_param_allocation=cfg.tie_embeddings)
        # Parameters whose dim 0 is the padded vocabulary: full-state tools cut the padding off / add it back.
        self.vocab_parameter_names = ("embed_tokens.weight",) if cfg.tie_embeddings else (
            "embed_tokens.weight", "lm_head.weight")
        local_vocab = self.padded_vocab_size // tp.size
        vocab_ids = torch.arange(tp.rank * local_vocab, (tp.rank + 1) * local_vocab)
        self.register_buffer("vocab_padding", vocab_ids >= cfg.vocab_size, persistent=False)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output layer: h [B, T, d] -> this rank's logits [B, T, V_pad/tp]."""
        weight = self.embed_tokens.weight if self.cfg.tie_embeddings else None
        logits = self.lm_head(self.norm(h), weight=weight)[0]
        return logits.masked_fill(self.vocab_padding, torch.finfo(logits.dtype).min)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L] (L = row_length or any multiple of segment_length), fresh memory -> local logits."""
        h = self.embed_tokens(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.logits(h)

    def initial_memory(self, batch: int) -> list[torch.Tensor | None]:
        """Per block: its M_0 for `batch` fresh rows, or None for a block without memory."""
        return [layer.memory.initial_state(batch) if layer.memory is not None else None for layer in self.layers]

    def forward_segment(self, tokens: torch.Tensor, memory: list[torch.Tensor | None], segment: int):
        """Segment number `segment` of rows, tokens [B, S], given every block's memory
        -> (local logits, updated memory). Incremental use: generation, evaluation of long inputs."""
        h = self.embed_tokens(tokens)
        new_memory = []
        for layer, mem in zip(self.layers, memory):
            h, mem = layer.forward_segment(h, mem, segment)
            new_memory.append(mem)
        return self.logits(h), new_memory


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy from vocab-parallel logits [B, T, V/tp] (all-reduces over TP) -> [B, T], fp32.

    NOTE: megatron-core's cross-entropy overwrites fp32 logits in place (it saves the largest activation of the
    model a copy); do not read `logits` afterwards.
    """
    return vocab_parallel_cross_entropy(logits.float(), labels)
