"""One decoder block: attention and memory read side by side on the residual stream, then the MLP."""

from __future__ import annotations

import functools

import torch
from torch import nn

from lm2.model.attention import Attention
from lm2.model.config import ModelConfig
from lm2.model.layers import RMSNorm, TensorParallel, rope_cos_sin
from lm2.model.memory import LM2Memory
from lm2.model.mlp import MLP


def _positions_table(length: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype):
    return rope_cos_sin(torch.arange(length, device=device), head_dim, theta, dtype)


_cached_positions_table = functools.lru_cache(maxsize=16)(_positions_table)


def _rope_table(length: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype):
    """cos/sin for positions 0..length-1: cached when eager; a compiled block (train.compile) computes them in its
    graph instead, since dynamo bypasses a cache and warns that it did."""
    table = _positions_table if torch.compiler.is_compiling() else _cached_positions_table
    return table(length, head_dim, theta, device, dtype)


class DecoderBlock(nn.Module):
    """x -> h = x + Attn(norm(x)) + Mem(norm(x)); out = h + MLP(norm(h)).

    With memory enabled (in the model, whether or not this block carries a bank) attention is causal inside
    each segment of S tokens and RoPE positions restart at 0 per segment: across segments only memory carries
    information. With memory disabled attention is causal over the whole row. forward is a pure function of its
    inputs (tensors in, tensor out), as pipeline stages and activation checkpointing require; with carry, the memory
    also keeps the rows' final states in its LaneStates (memory.py).
    """

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, layer_index: int):
        super().__init__()
        self.cfg = cfg
        self.layer_index = layer_index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, tp.config.params_dtype)
        self.self_attn = Attention(cfg, tp)
        self.memory = LM2Memory(cfg, tp) if cfg.has_memory(layer_index) else None
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, tp.config.params_dtype)
        self.mlp = MLP(cfg, tp)

    def _attention(self, xn: torch.Tensor) -> torch.Tensor:
        """Causal attention of [B', T, d] sequences, RoPE positions 0..T-1."""
        cos, sin = _rope_table(xn.shape[1], self.cfg.head_dim, self.cfg.rope_theta, xn.device, xn.dtype)
        return self.self_attn(xn, cos, sin)

    def forward(self, x: torch.Tensor, carry: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, L, d], whole rows starting from the initial memory, or with carry [B, 2] (lane, fresh) from their
        lanes' carried memory."""
        b, length, d = x.shape
        xn = self.input_layernorm(x)
        if self.cfg.memory.enabled:
            seg = self.cfg.segment_length
            # Every segment's attention at once: segments become rows of a [B*k, S] batch.
            h = x + self._attention(xn.reshape(b * length // seg, seg, d)).view(b, length, d)
        else:
            h = x + self._attention(xn)
        if self.memory is not None:
            h = h + self.memory(xn, self.cfg.segment_length, carry)
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_segment(self, x: torch.Tensor, mem: torch.Tensor | None, segment: int):
        """Segment number `segment`, x: [B, S, d], with this block's memory M_s (None if it has none)
        -> (out, M_{s+1})."""
        xn = self.input_layernorm(x)
        h = x + self._attention(xn)
        if self.memory is not None:
            read, mem = self.memory.step(xn, mem, segment)
            h = h + read
        return h + self.mlp(self.post_attention_layernorm(h)), mem
