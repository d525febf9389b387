"""The LM2 model as a DeepSpeed PipelineModule: the same parts as LM2Model, one LayerSpec each.

Stages exchange hidden states only (each block owns its memory), and with carried memory the rows' lanes (a
[B, 2] int64 tensor, see LM2Model.forward): every stage's memory blocks read and keep their own lanes' states.
Every part is built under the seed LM2Model uses for it, so a pipelined model starts from exactly the weights of
the single-process one. Weight names map back to LM2Model's with `model_name`, which checkpoint conversion and
export use.
"""

from __future__ import annotations

import re
from functools import partial

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state
from torch import nn

from lm2.model.block import DecoderBlock
from lm2.model.config import ModelConfig
from lm2.model.layers import RMSNorm, TensorParallel, seeded
from lm2.model.lm import block_seed, build_embedding, build_lm_head, mean_loss, output_logits, real_vocab_columns
from lm2.pipeline.parallel.dims import ParallelDims


class EmbeddingStage(nn.Module):
    """Token embedding; with tied embeddings it also serves as the output layer on the last stage."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, seed: int):
        super().__init__()
        self.embed_tokens = build_embedding(cfg, tp, seed)
        if cfg.tie_embeddings:
            self.lm_head = build_lm_head(cfg, tp, seed)  # owns no weight
            self.real_vocab_columns = real_vocab_columns(cfg, tp)

    def forward(self, inputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor]):
        """tokens, or (tokens, carry) -> hidden states, or (hidden states, carry)."""
        if isinstance(inputs, tuple):
            tokens, carry = inputs
            return self.embed_tokens(tokens), carry
        return self.embed_tokens(inputs)

    def tied_output(self, hn: torch.Tensor) -> torch.Tensor:
        return output_logits(self.lm_head, hn, self.real_vocab_columns, self.embed_tokens.weight)


class PipeBlock(DecoderBlock):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, index: int, seed: int):
        with seeded(block_seed(seed, index)):
            super().__init__(cfg, tp, index)

    def forward(self, inputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor]):
        if isinstance(inputs, tuple):
            h, carry = inputs
            return super().forward(h, carry), carry
        return super().forward(inputs)


class NormStage(RMSNorm):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__(cfg.hidden_size, cfg.norm_eps, tp.config.params_dtype)

    def forward(self, inputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The final norm of the hidden states; the carry ends here."""
        return super().forward(inputs[0] if isinstance(inputs, tuple) else inputs)


class OutputStage(nn.Module):
    """The untied output layer."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, seed: int):
        super().__init__()
        self.lm_head = build_lm_head(cfg, tp, seed)
        self.real_vocab_columns = real_vocab_columns(cfg, tp)

    def forward(self, hn: torch.Tensor) -> torch.Tensor:
        return output_logits(self.lm_head, hn, self.real_vocab_columns, None)


def topology(dims: ParallelDims) -> PipeModelDataParallelTopology:
    """DeepSpeed's grid, checked against megatron-core's groups: both put TP fastest and PP slowest."""
    topo = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
    coord = topo.get_coord(torch.distributed.get_rank())
    ours = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
    )
    if (coord.pipe, coord.data, coord.model) != ours:
        raise RuntimeError(
            f"DeepSpeed's pipeline grid puts this rank at (pipe, data, model)="
            f"{(coord.pipe, coord.data, coord.model)} but megatron-core at {ours}"
        )
    return topo


def build_pipeline_model(
    cfg: ModelConfig, dims: ParallelDims, tp: TensorParallel, seed: int, activation_checkpointing: bool
) -> PipelineModule:
    if cfg.tie_embeddings:
        first = TiedLayerSpec("embed", EmbeddingStage, cfg, tp, seed, tied_weight_attr="embed_tokens.weight")
        last = TiedLayerSpec(
            "embed",
            EmbeddingStage,
            cfg,
            tp,
            seed,
            tied_weight_attr="embed_tokens.weight",
            forward_fn=EmbeddingStage.tied_output,
        )
    else:
        first, last = LayerSpec(EmbeddingStage, cfg, tp, seed), LayerSpec(OutputStage, cfg, tp, seed)
    blocks = [LayerSpec(PipeBlock, cfg, tp, i, seed) for i in range(cfg.num_layers)]
    return PipelineModule(
        layers=[first, *blocks, LayerSpec(NormStage, cfg, tp), last],
        topology=topology(dims),
        loss_fn=mean_loss,
        partition_method="type:PipeBlock",  # balance blocks; embedding and output ride on the end stages
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        activation_checkpoint_func=partial(torch.utils.checkpoint.checkpoint, use_reentrant=False),
        checkpointable_layers=["PipeBlock"],
    )


def model_name(pipe_name: str, num_layers: int) -> str:
    """A PipelineModule parameter name -> the LM2Model name of the same weight.

    The layer list is [embedding, block 0..L-1, norm, output]; tied embeddings live under tied_modules.embed.
    """
    if pipe_name.startswith("tied_modules.embed."):
        return pipe_name.removeprefix("tied_modules.embed.")
    index, rest = re.fullmatch(r"(\d+)\.(.+)", pipe_name).groups()
    index = int(index)
    if index == 0 or index == num_layers + 2:
        return rest  # embed_tokens.weight, lm_head.weight
    if index == num_layers + 1:
        return f"norm.{rest}"
    return f"layers.{index - 1}.{rest}"
