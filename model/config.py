"""Architecture of an LM2 model: the backbone (ModelConfig) and its memory bank (MemoryConfig).

Only shape and initialisation live here; batch sizes, optimiser and parallel degrees belong to the trainer's
config. Every field checks itself when the dataclass is built, and `validate_for_tp` checks what depends on the
tensor-parallel degree, so a bad config fails before any weight is allocated, naming the field and the fix.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from lm2.model.errors import ConfigError


def require(ok: bool, message: str) -> None:
    """Raises ConfigError(message) unless ok: the checks of every config dataclass read as a list of rules."""
    if not ok:
        raise ConfigError(message)


def require_choice(name: str, value: Any, choices: Any) -> None:
    """value must be one of the Literal type `choices` (the field's annotation, so the options are written once)."""
    options = typing.get_args(choices)
    # `type(...) is`: True == 1 would otherwise pass for an integer choice.
    ok = any(value == option and type(value) is type(option) for option in options)
    listed = ", ".join(map(str, options[:-1])) + f" or {options[-1]}"
    require(ok, f"{name} must be {listed}, got {value!r}")


WriteRule = Literal["paper", "convex"]


def _positive(name: str, value: int) -> None:
    require(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class MemoryConfig:
    enabled: bool = True
    """False gives the vanilla baseline: the same backbone with full causal attention over the row."""
    slots: int = 16
    """N, the number of memory slots per block (the paper: 2048)."""
    dim: int | None = None
    """d_m, the width of a memory slot. None means the model's hidden_size."""
    heads: int = 4
    """H_m, memory heads. Heads are head-local and are split over tensor-parallel ranks like attention heads."""
    layers: list[int] | None = None
    """Indices of the blocks that carry memory; None means every block."""
    bptt_segments: int = 4
    """Truncated BPTT in windows: the segments of a row form windows of bptt_segments segments, and every block's
    memory is detached where a window starts (for reads and writes), so no gradient leaves its window, through any
    number of stacked blocks. At least 2: with 1 no write would ever be trained."""
    forget_bias_init: float = 1.0
    """Initial forget-gate bias: +1 makes a fresh model remember by default."""
    input_bias_init: float = 0.0
    """Initial input-gate bias (write_rule "paper" only: the convex rule has no input gate)."""
    write_rule: WriteRule = "paper"
    """How a write merges the update u into the memory. "paper": M' = g_in * tanh(u) + g_f * M, the paper's
    LSTM-like rule, whose M can grow by up to 1 per write. "convex": M' = g_f * M + (1 - g_f) * tanh(u), so every
    element stays within max(1, |M_0|) at any number of segments. With "convex" the input gate (in_gate,
    in_gate_bias) is unused: its parameters stay, so checkpoints and the name table do not depend on the rule, but
    they get zero gradients, and the input-gate metric (g_in) reports the weight of tanh(u), 1 - g_f."""
    read_norm: bool = False
    """RMSNorm of M_s before the read (not the write), per memory head over its d_h columns, so tensor-parallel
    ranks need no communication: every read sees memory of unit RMS, however the writes scaled it. It has no
    learnable gain: a gain before the read is a per-column scale of M that the read's key and value projections
    (read_k, read_v) already express by scaling their rows, so it would add parameters, not function."""

    def __post_init__(self) -> None:
        _positive("memory.slots", self.slots)
        require_choice("memory.write_rule", self.write_rule, WriteRule)
        _positive("memory.heads", self.heads)
        require(
            isinstance(self.bptt_segments, int) and self.bptt_segments >= 2,
            f"memory.bptt_segments must be an integer >= 2, got {self.bptt_segments!r}: with 1 every "
            "segment's memory is detached and no memory write is trained",
        )
        if self.dim is not None:
            _positive("memory.dim", self.dim)
            require(
                self.dim % self.heads == 0,
                f"memory.dim={self.dim} must be divisible by memory.heads={self.heads}: "
                "change one of them so every memory head gets the same width",
            )


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    """Tokenizer vocabulary size; the embedding is padded to a multiple of tp * 128 (see padded_vocab_size)."""
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    """Grouped-query attention: num_heads must be a multiple of it."""
    ffn_hidden_size: int
    """Inner width of the SwiGLU MLP."""
    row_length: int
    """Tokens per training row (the context the model is trained on)."""
    segment_length: int
    """S: with memory on, a row is processed as row_length / S segments; attention stays inside a segment."""
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    """Standard deviation of the normal weight init; output projections are scaled by 1/sqrt(2 * num_layers)."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "ffn_hidden_size",
            "row_length",
            "segment_length",
        ):
            _positive(name, getattr(self, name))
        require(
            self.hidden_size % self.num_heads == 0,
            f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}",
        )
        require(self.head_dim % 2 == 0, f"head dim hidden_size/num_heads={self.head_dim} must be even for RoPE")
        require(
            self.num_heads % self.num_kv_heads == 0,
            f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} "
            "(grouped-query attention shares each kv head between num_heads/num_kv_heads query heads)",
        )
        require(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        require(self.init_std > 0, f"init_std must be positive, got {self.init_std}")
        require(
            self.norm_eps > 0,
            f"norm_eps must be positive (RMSNorm divides by sqrt(mean(x^2) + norm_eps)), got {self.norm_eps}",
        )
        if not self.memory.enabled:
            return
        require(
            self.row_length % self.segment_length == 0,
            f"row_length={self.row_length} must be a multiple of segment_length={self.segment_length}: "
            "a row is processed as whole segments",
        )
        require(
            self.memory_dim % self.memory.heads == 0,
            f"memory.dim (defaults to hidden_size={self.hidden_size}) = {self.memory_dim} must be divisible by "
            f"memory.heads={self.memory.heads}",
        )
        for layer in self.memory.layers or []:
            require(
                isinstance(layer, int) and 0 <= layer < self.num_layers,
                f"memory.layers contains {layer!r}; block indices run from 0 to num_layers-1={self.num_layers - 1}",
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def memory_dim(self) -> int:
        return self.memory.dim or self.hidden_size

    @property
    def num_segments(self) -> int:
        return self.row_length // self.segment_length if self.memory.enabled else 1

    def has_memory(self, layer: int) -> bool:
        return self.memory.enabled and (self.memory.layers is None or layer in self.memory.layers)

    def padded_vocab_size(self, tp_size: int) -> int:
        """Vocabulary rounded up to a multiple of tp_size * 128, as megatron does, so shards are equal and aligned."""
        multiple = 128 * tp_size
        return math.ceil(self.vocab_size / multiple) * multiple

    def validate_for_tp(self, tp_size: int) -> None:
        """Checks that every sharded dimension splits evenly over tp_size ranks."""
        _positive("tensor parallel size", tp_size)
        require(
            self.num_kv_heads % tp_size == 0,
            f"num_kv_heads={self.num_kv_heads} must be divisible by the tensor-parallel size {tp_size}: "
            "lower parallel.tp or raise num_kv_heads",
        )
        require(
            self.ffn_hidden_size % tp_size == 0,
            f"ffn_hidden_size={self.ffn_hidden_size} must be divisible by the tensor-parallel size {tp_size}",
        )
        if self.memory.enabled:
            require(
                self.memory.heads % tp_size == 0,
                f"memory.heads={self.memory.heads} must be divisible by the tensor-parallel size {tp_size}: "
                "memory heads are split over tensor-parallel ranks like attention heads",
            )
