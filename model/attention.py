"""Grouped-query causal self-attention with RoPE, tensor-parallel over heads (megatron-core linears)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lm2.model.config import ModelConfig
from lm2.model.layers import TensorParallel, apply_rope, normal_init, output_init


class Attention(nn.Module):
    """q/k/v/o projections named as in Hugging Face Llama, so export is a rename plus a TP gather.

    Each TP rank holds num_heads/tp query heads and num_kv_heads/tp kv heads; o_proj is row-parallel and
    all-reduces. The caller decides what a sequence is: a whole row (vanilla) or one segment (LM2).
    """

    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.local_heads = cfg.num_heads // tp.size
        self.local_kv_heads = cfg.num_kv_heads // tp.size
        init = normal_init(cfg.init_std)
        self.q_proj = tp.column(cfg.hidden_size, cfg.num_heads * cfg.head_dim, init)
        self.k_proj = tp.column(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, init)
        self.v_proj = tp.column(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, init)
        self.o_proj = tp.row(cfg.num_heads * cfg.head_dim, cfg.hidden_size, output_init(cfg.init_std, cfg.num_layers))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [B, T, d] normalised input; cos/sin: [T, head_dim]. Returns [B, T, d], causal over T."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.local_heads, self.head_dim).transpose(1, 2)  # [B, h, T, hd]
        k = self.k_proj(x).view(b, t, self.local_kv_heads, self.head_dim).transpose(1, 2)  # [B, kv, T, hd]
        v = self.v_proj(x).view(b, t, self.local_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.local_heads != self.local_kv_heads
        )
        out = out.transpose(1, 2).reshape(b, t, self.local_heads * self.head_dim)
        return self.o_proj(out)
