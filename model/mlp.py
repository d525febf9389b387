"""SwiGLU feed-forward, column-parallel in, row-parallel out (one all-reduce)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from lm2.model.config import ModelConfig
from lm2.model.layers import normal_init, output_init


class MLP(nn.Module):
    """gate/up/down named as in Hugging Face Llama."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        init = normal_init(cfg.init_std)
        self.gate_proj = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_hidden_size, config=mp, init_method=init,
                                              bias=False, gather_output=False)
        self.up_proj = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_hidden_size, config=mp, init_method=init,
                                            bias=False, gather_output=False)
        self.down_proj = RowParallelLinear(cfg.ffn_hidden_size, cfg.hidden_size, config=mp,
                                           init_method=output_init(cfg.init_std, cfg.num_layers), bias=False,
                                           input_is_parallel=True, skip_bias_add=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)[0]) * self.up_proj(x)[0])[0]
