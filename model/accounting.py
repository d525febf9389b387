"""Analytic parameter and FLOP counts of a ModelConfig, without building the model.

The trainer's MFU and `lm2 info` use these; tests check the parameter count against a built model.
FLOPs count a multiply-add as 2 and attention without the causal discount (the PaLM/megatron convention).
"""

from __future__ import annotations

from dataclasses import dataclass

from lm2.model.config import ModelConfig


@dataclass(frozen=True)
class ParameterCounts:
    embedding: int
    """Input embedding plus the output layer unless tied (true vocabulary, padding excluded)."""
    backbone: int
    """Attention, MLP and norms of every block, and the final norm."""
    memory: int
    """Every memory module: projections, gates, biases and the initial banks (the same with memory.write_rule
    "convex", whose unused input gate stays, and memory.read_norm, which has no weight)."""

    @property
    def total(self) -> int:
        return self.embedding + self.backbone + self.memory


def memory_parameters_per_block(cfg: ModelConfig) -> int:
    d, d_m, dh, slots = cfg.hidden_size, cfg.memory_dim, cfg.memory_dim // cfg.memory.heads, cfg.memory.slots
    token_projections = 4 * d * d_m  # read_q, write_k, write_v (d -> d_m) and out_proj (d_m -> d)
    head_local = 4 * d_m * dh + 2 * (2 * d_m * dh)  # read_k, read_v, out_gate, write_q; in/forget gates
    return token_projections + head_local + 3 * d_m + slots * d_m  # three gate biases, the bank


def parameter_counts(cfg: ModelConfig, vocab_size: int | None = None) -> ParameterCounts:
    """vocab_size: count a padded vocabulary instead of the true one (to compare with a built model)."""
    vocab = vocab_size or cfg.vocab_size
    d, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    attention = 2 * d * d + 2 * d * kv
    block = attention + 3 * d * cfg.ffn_hidden_size + 2 * d
    memory_blocks = sum(cfg.has_memory(i) for i in range(cfg.num_layers))
    return ParameterCounts(
        embedding=vocab * d * (1 if cfg.tie_embeddings else 2),
        backbone=cfg.num_layers * block + d,
        memory=memory_blocks * memory_parameters_per_block(cfg),
    )


def forward_flops_per_token(cfg: ModelConfig) -> int:
    """Forward FLOPs per token of a training row (training costs three times this), rounded down."""
    d, d_m, dh, slots = cfg.hidden_size, cfg.memory_dim, cfg.memory_dim // cfg.memory.heads, cfg.memory.slots
    seg = cfg.segment_length if cfg.memory.enabled else cfg.row_length
    counts = parameter_counts(cfg)
    matmul_params = counts.backbone - (2 * cfg.num_layers + 1) * d + cfg.vocab_size * d  # blocks + output layer
    flops = 2 * matmul_params + cfg.num_layers * 4 * seg * d  # projections; QK^T and AV over the segment
    memory_blocks = sum(cfg.has_memory(i) for i in range(cfg.num_layers))
    segments = cfg.num_segments
    per_row_memory = (
        cfg.row_length
        * (
            2 * 2 * d * d_m  # read query and output projections
            + 4 * slots * d_m  # read attention over N slots
            + 2 * d_m * dh  # output gate
        )
        + segments * 2 * 2 * slots * d_m * dh  # k/v of the slots each segment reads
        # the writes: none after the last segment (it would feed nothing inside the row); the segment's write keys
        # and values, write query, write attention over the segment, input and forget gates
        + (segments - 1)
        * (2 * 2 * seg * d * d_m + 2 * slots * d_m * dh + 4 * slots * seg * d_m + 2 * 2 * slots * 2 * d_m * dh)
    )
    return flops + memory_blocks * per_row_memory // cfg.row_length
