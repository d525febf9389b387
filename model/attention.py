"""Grouped-query causal self-attention with RoPE, tensor-parallel over heads (megatron-core linears)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from lm2.model.config import ModelConfig
from lm2.model.layers import apply_rope, normal_init, output_init


class Attention(nn.Module):
    """q/k/v/o projections named as in Hugging Face Llama, so export is a rename plus a TP gather.

    Each TP rank holds num_heads/tp query heads and num_kv_heads/tp kv heads; o_proj is row-parallel and
    all-reduces. The caller decides what a sequence is: a whole row (vanilla) or one segment (LM2).
    """

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        tp = mp.tensor_model_parallel_size
        self.head_dim = cfg.head_dim
        self.local_heads = cfg.num_heads // tp
        self.local_kv_heads = cfg.num_kv_heads // tp
        init = normal_init(cfg.init_std)

        def column(out_features: int) -> ColumnParallelLinear:
            return ColumnParallelLinear(cfg.hidden_size, out_features, config=mp, init_method=init, bias=False,
                                        gather_output=False)

        self.q_proj = column(cfg.num_heads * cfg.head_dim)
        self.k_proj = column(cfg.num_kv_heads * cfg.head_dim)
        self.v_proj = column(cfg.num_kv_heads * cfg.head_dim)
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, config=mp,
                                        init_method=output_init(cfg.init_std, cfg.num_layers), bias=False,
                                        input_is_parallel=True, skip_bias_add=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [B, T, d] normalised input; cos/sin: [T, head_dim]. Returns [B, T, d], causal over T."""
        b, t, _ = x.shape
        q = self.q_proj(x)[0].view(b, t, self.local_heads, self.head_dim).transpose(1, 2)  # [B, h, T, hd]
        k = self.k_proj(x)[0].view(b, t, self.local_kv_heads, self.head_dim).transpose(1, 2)  # [B, kv, T, hd]
        v = self.v_proj(x)[0].view(b, t, self.local_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             enable_gqa=self.local_heads != self.local_kv_heads)
        out = out.transpose(1, 2).reshape(b, t, self.local_heads * self.head_dim)
        return self.o_proj(out)[0]
