"""Full (unsharded) state of an LM2Model from its tensor-parallel shards, and back.

A parameter is sharded when megatron-core marked it `tensor_model_parallel`; it is split along its
`partition_dim` into equal contiguous chunks (stride 1), one per TP rank. The full state holds the true
vocabulary only: padding rows depend on the TP degree, so they are cut off here and zero-filled on load.
This is how checkpoints change TP degree and how export joins shards; nothing here lists layer names.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from lm2.model.lm import VOCAB_PARAMETERS, LM2Model


def _is_sharded(param: torch.Tensor) -> bool:
    return getattr(param, "tensor_model_parallel", False)


def gather_named(named_params, vocab_size: int, tensor_of=lambda p: p.detach()) -> dict[str, torch.Tensor]:
    """Full tensors of (LM2Model name, parameter) pairs; a collective over the TP group."""
    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    full = {}
    for name, param in named_params:
        tensor = tensor_of(param)
        if _is_sharded(param) and tp > 1:
            chunks = [torch.empty_like(tensor) for _ in range(tp)]
            dist.all_gather(chunks, tensor.contiguous(), group=group)
            tensor = torch.cat(chunks, dim=param.partition_dim)
        if name in VOCAB_PARAMETERS:
            tensor = tensor[:vocab_size]
        full[name] = tensor.cpu().clone()
    return full


def gather_full_state(model: LM2Model) -> dict[str, torch.Tensor]:
    """Collective over the TP group: every TP rank returns the same full tensors (on CPU)."""
    return gather_named(model.named_parameters(), model.cfg.vocab_size)


def gather_full_grads(model: LM2Model) -> dict[str, torch.Tensor]:
    """The full gradient of every parameter (zeros where none was computed), gathered like the weights."""
    return gather_named(
        model.named_parameters(),
        model.cfg.vocab_size,
        lambda param: param.grad if param.grad is not None else torch.zeros_like(param),
    )


def local_shard(param: torch.Tensor, name: str, full: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """This TP rank's part of the whole tensor `full` of parameter `name`: the vocabulary zero-padded to
    padded_vocab rows, then the rank's chunk along the parameter's partition_dim (megatron-core's attributes)."""
    if name in VOCAB_PARAMETERS:
        full = torch.cat((full, full.new_zeros(padded_vocab - full.shape[0], *full.shape[1:])))
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if _is_sharded(param) and tp > 1:
        full = full.chunk(tp, dim=param.partition_dim)[parallel_state.get_tensor_model_parallel_rank()]
    return full


def load_full_state(model: LM2Model, full: dict[str, torch.Tensor]) -> None:
    """Copies this rank's slice of every full tensor into the model (no communication)."""
    expected, given = {n for n, _ in model.named_parameters()}, set(full)
    if expected != given:
        raise ValueError(
            f"full state does not match the model: missing {sorted(expected - given)}, "
            f"unexpected {sorted(given - expected)}"
        )
    with torch.no_grad():
        for name, param in model.named_parameters():
            tensor = local_shard(param, name, full[name], model.padded_vocab_size)
            if tensor.shape != param.shape:
                raise ValueError(
                    f"{name}: full tensor gives a {tuple(tensor.shape)} shard, the model has "
                    f"{tuple(param.shape)}: the checkpoint was written for another model shape"
                )
            param.copy_(tensor)
