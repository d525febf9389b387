"""SwiGLU feed-forward, column-parallel in, row-parallel out (one all-reduce)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lm2.model.config import ModelConfig
from lm2.model.layers import TensorParallel, normal_init, output_init


class MLP(nn.Module):
    """gate/up/down named as in Hugging Face Llama."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        init = normal_init(cfg.init_std)
        self.gate_proj = tp.column(cfg.hidden_size, cfg.ffn_hidden_size, init)
        self.up_proj = tp.column(cfg.hidden_size, cfg.ffn_hidden_size, init)
        self.down_proj = tp.row(cfg.ffn_hidden_size, cfg.hidden_size, output_init(cfg.init_std, cfg.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
