"""Small building blocks shared by the decoder: RMSNorm, rotary embeddings, megatron-core TP glue, init.

The TP glue: `TensorParallel` (the caller's group and megatron-core's config) builds `ColumnLinear` and
`RowLinear`, megatron-core's linears wrapped once so that model code calls them like nn.Linear. `Probe` marks an
activation that metrics may observe through forward hooks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn


class Probe(nn.Identity):
    """A named point where the model shows an activation without keeping it: returns its input unchanged. The trainer
    registers forward hooks on probes to compute metrics (pipeline/train/memory_monitor.py); no state, no cost."""


class RMSNorm(nn.Module):
    """Llama's RMSNorm, computed in fp32 whatever the activation dtype (bf16 sums of squares lose precision). Its
    weight is in the params dtype, like the linears': an fp32 weight would turn a bf16 model's activations fp32."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.type_as(x) * self.weight


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [len(positions), head_dim] in Hugging Face Llama's half-split layout.

    Our own implementation because megatron-core's RotaryEmbedding hard-codes CUDA.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, head_dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, head_dim]; cos/sin: [T, head_dim]. Same rotation as HF's rotate_half."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def normal_init(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def init(tensor: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(tensor, mean=0.0, std=std)

    return init


def output_init(std: float, num_layers: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Projections that write into the residual stream get std / sqrt(2 * layers), as in GPT-2 and megatron."""
    return normal_init(std / math.sqrt(2.0 * num_layers))


class ColumnLinear(ColumnParallelLinear):
    """megatron-core's column-parallel linear as a plain layer: x -> y (megatron returns (y, bias); we never
    split the bias off, and build these without one)."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x, weight=weight)[0]


class RowLinear(RowParallelLinear):
    """megatron-core's row-parallel linear as a plain layer: x -> y, all-reduced over the TP group."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


@dataclass(frozen=True)
class TensorParallel:
    """This rank's tensor-parallel context, handed to every layer by the caller (the trainer, the pipeline
    builder, tests): megatron-core's config and the TP group, never looked up from globals in the model.

    Build it with `TensorParallel.of_group(group, params_dtype)`. Weights are always initialised on CPU: every
    TP layer draws its full weight from the global torch RNG and keeps its slice, so a model at TP=2 holds
    exactly the weights of TP=1 (then it moves to its device). No sequence parallelism: its backward allocates
    on CUDA.
    """

    config: ModelParallelConfig
    group: dist.ProcessGroup
    rank: int
    size: int

    @classmethod
    def of_group(cls, group: dist.ProcessGroup, params_dtype: torch.dtype) -> TensorParallel:
        """The context of this rank in `group`, the tensor-parallel group; params_dtype: fp32 on CPU, bf16 on GPU."""
        size = dist.get_world_size(group)
        config = ModelParallelConfig(
            tensor_model_parallel_size=size,
            params_dtype=params_dtype,
            use_cpu_initialization=True,
            perform_initialization=True,
            sequence_parallel=False,
            gradient_accumulation_fusion=False,
        )
        return cls(config, group, dist.get_rank(group), size)

    def column(self, in_features: int, out_features: int, init: Callable, **kwargs) -> ColumnLinear:
        """in -> out/tp on this rank, no bias, output left split (the next layer consumes the split)."""
        return ColumnLinear(
            in_features,
            out_features,
            config=self.config,
            init_method=init,
            bias=False,
            gather_output=False,
            tp_group=self.group,
            **kwargs,
        )

    def row(self, in_features: int, out_features: int, init: Callable) -> RowLinear:
        """in/tp -> out, all-reduced over the group, no bias."""
        return RowLinear(
            in_features,
            out_features,
            config=self.config,
            init_method=init,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            tp_group=self.group,
        )


def sharded_parameter(full: torch.Tensor, dim: int, tp_rank: int, tp_size: int) -> nn.Parameter:
    """This rank's slice of a full tensor along dim, marked the way megatron-core marks its TP weights.

    DeepSpeed's grad norm and our checkpoint/export gathering read these attributes.
    """
    shard = full.chunk(tp_size, dim=dim)[tp_rank].clone()
    param = nn.Parameter(shard)
    tensor_parallel.set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)
    return param


@contextmanager
def seeded(seed: int):
    """Draws inside come from torch.manual_seed(seed); the global RNG is restored afterwards.

    Each part of the model is initialised under its own seed (see lm.py), so a block's weights depend only on
    the run's seed and its index: the same at every TP degree and on whichever pipeline stage builds it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def init_vocab_parallel_(weight: torch.Tensor, vocab_size: int, std: float, tp: TensorParallel) -> None:
    """Re-initialises a [V_pad/tp, d] vocab-parallel weight from a full [vocab_size, d] draw, padding rows zero.

    The padded size depends on the TP degree; drawing only the true vocabulary keeps the weights TP-invariant.
    """
    full = torch.zeros(weight.shape[0] * tp.size, *weight.shape[1:], dtype=weight.dtype)
    nn.init.normal_(full[:vocab_size], mean=0.0, std=std)
    with torch.no_grad():
        weight.copy_(full.chunk(tp.size, dim=0)[tp.rank])
