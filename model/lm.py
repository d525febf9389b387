"""The LM2 language model: embedding, decoder blocks, final norm and a vocab-parallel output layer."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import VocabParallelEmbedding, vocab_parallel_cross_entropy
from torch import nn
from torch.utils.checkpoint import checkpoint

from lm2.model.block import DecoderBlock
from lm2.model.config import ModelConfig
from lm2.model.layers import ColumnLinear, RMSNorm, TensorParallel, init_vocab_parallel_, seeded


def build_embedding(cfg: ModelConfig, tp: TensorParallel, seed: int) -> VocabParallelEmbedding:
    embedding = VocabParallelEmbedding(
        cfg.padded_vocab_size(tp.size), cfg.hidden_size, config=tp.config, init_method=lambda w: w, tp_group=tp.group
    )
    with seeded(seed):
        init_vocab_parallel_(embedding.weight, cfg.vocab_size, cfg.init_std, tp)
    return embedding


def block_seed(seed: int, index: int) -> int:
    """The initialisation seed of block `index`: the embedding uses `seed`, the untied output layer the next."""
    return seed + 1 + index


def build_block(cfg: ModelConfig, tp: TensorParallel, index: int, seed: int) -> DecoderBlock:
    with seeded(block_seed(seed, index)):
        return DecoderBlock(cfg, tp, index)


def build_lm_head(cfg: ModelConfig, tp: TensorParallel, seed: int) -> ColumnLinear:
    """The vocab-parallel output projection; with tied embeddings it owns no weight (the embedding's is passed)."""
    lm_head = tp.column(
        cfg.hidden_size, cfg.padded_vocab_size(tp.size), lambda w: w, skip_weight_param_allocation=cfg.tie_embeddings
    )
    if not cfg.tie_embeddings:
        with seeded(block_seed(seed, cfg.num_layers)):
            init_vocab_parallel_(lm_head.weight, cfg.vocab_size, cfg.init_std, tp)
    return lm_head


def real_vocab_columns(cfg: ModelConfig, tp: TensorParallel) -> int:
    """How many of this rank's V_pad/tp logit columns are real vocabulary: padding ends the padded vocabulary, so
    on every rank the real columns come first and the padding (if any) follows."""
    local_vocab = cfg.padded_vocab_size(tp.size) // tp.size
    return min(max(cfg.vocab_size - tp.rank * local_vocab, 0), local_vocab)


def output_logits(
    lm_head: ColumnLinear, hn: torch.Tensor, real_columns: int, tied_weight: torch.Tensor | None
) -> torch.Tensor:
    """Normalised hidden states [B, T, d] -> this rank's logits [B, T, V_pad/tp], padding columns at the dtype's
    minimum: they take no probability, so the loss does not depend on how much padding a TP degree needs. Only the
    padding columns are written, in place: a masked copy of the whole logits (the model's largest activation),
    forward and backward, took 12-15 % of a tiny CPU step (bench/NOTES.md) and adds a [tokens, V/tp] buffer."""
    logits = lm_head(hn, weight=tied_weight)
    if real_columns < logits.shape[-1]:
        logits[..., real_columns:] = torch.finfo(logits.dtype).min
    return logits


class LM2Model(nn.Module):
    """Decoder-only LM2 (or, with memory disabled, a plain Llama-style model) on megatron-core TP layers.

    Weight names follow Hugging Face Llama (embed_tokens, layers.{i}.self_attn.q_proj, ..., norm, lm_head), so
    export is a rename table plus the memory tensors. Logits stay vocab-parallel: each TP rank holds its slice
    of the padded vocabulary. The parts are built by the functions above so that pipeline stages build exactly
    the same modules; each part is initialised under its own seed derived from `seed`, so the weights are the
    same at any TP or PP degree.

    The caller passes the tensor-parallel context in; the model reads no global parallel state. (The loss,
    `token_losses`, is megatron-core's vocab-parallel cross-entropy, which still takes its group from megatron's
    parallel_state: `lm2.pipeline.parallel.init.init_distributed` sets it up, also for a world of one.)

    Args:
        cfg: the architecture, validated.
        tp: this rank's tensor-parallel context (group and params dtype, fp32 on CPU, bf16 on GPU), e.g.
            `lm2.pipeline.parallel.mpu.tensor_parallel(dtype)`. Weights are built on CPU; move the model to its device.
        seed: initialisation seed.
    """

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, seed: int = 0):
        super().__init__()
        cfg.validate_for_tp(tp.size)
        self.cfg = cfg
        self.padded_vocab_size = cfg.padded_vocab_size(tp.size)
        self.embed_tokens = build_embedding(cfg, tp, seed)
        self.layers = nn.ModuleList(build_block(cfg, tp, i, seed) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, tp.config.params_dtype)
        self.lm_head = build_lm_head(cfg, tp, seed)
        self.real_vocab_columns = real_vocab_columns(cfg, tp)
        self.activation_checkpointing = False

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output layer: h [B, T, d] -> this rank's logits [B, T, V_pad/tp]."""
        tied_weight = self.embed_tokens.weight if self.cfg.tie_embeddings else None
        return output_logits(self.lm_head, self.norm(h), self.real_vocab_columns, tied_weight)

    def forward(self, tokens: torch.Tensor, carry: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, L] (L = row_length or any multiple of segment_length) -> local logits. Rows start from fresh
        memory, or with carry [B, 2] int64 (each row's lane, and 1 where the row starts fresh) from their lanes'
        carried memory, which every memory module's LaneStates holds (memory.py)."""
        h = self.embed_tokens(tokens)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, carry, use_reentrant=False)  # recompute the block in backward
            else:
                h = layer(h, carry)
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


VOCAB_PARAMETERS = ("embed_tokens.weight", "lm_head.weight")
"""The parameters whose dim 0 is the vocabulary, which checkpoints pad to a multiple of 128 * tp."""

IGNORE_INDEX = -100
"""Label of positions that carry no loss (PAD at the end of a dataset; torch's cross_entropy default). The loader
writes it, the loss skips it."""


def mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labels that are not IGNORE_INDEX (consumes logits, see token_losses)."""
    valid = labels != IGNORE_INDEX
    losses = token_losses(logits, labels.clamp(min=0))
    return (losses * valid).sum() / valid.sum().clamp(min=1)
