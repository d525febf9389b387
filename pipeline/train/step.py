"""One optimizer step and one validation pass: the math, no logging and no files.

Batches are (input_ids, labels) pairs of [micro_batch, row_length] tensors on this rank's device.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from lm2.model.block import DecoderBlock
from lm2.model.lm import token_losses
from lm2.pipeline.train.engine import Engine

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; training stops before anything is saved."""


def _dp_mean(value: torch.Tensor) -> torch.Tensor:
    value = value.detach().float().clone()
    dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
    return value / parallel_state.get_data_parallel_world_size()


def train_step(engine: Engine, batches: Batches) -> tuple[torch.Tensor, float | None]:
    """Accumulates engine.grad_accum micro-batches and steps. Returns (mean loss over the global batch, grad norm).

    Raises NonFiniteLossError (on every rank alike: the loss is reduced over data-parallel ranks first).
    """
    ds = engine.engine
    if engine.pipelined:
        loss = ds.train_batch(data_iter=batches).detach().float()  # DP-mean, broadcast to every stage
    else:
        total = torch.zeros((), device=ds.device)
        for _ in range(engine.grad_accum):
            inputs, labels = next(batches)
            micro_loss = token_losses(ds(inputs), labels).mean()
            ds.backward(micro_loss)
            ds.step()  # optimizer step only at the accumulation boundary
            total += micro_loss.detach()
        loss = _dp_mean(total / engine.grad_accum)
    grad_norm = ds.get_global_grad_norm()
    if not torch.isfinite(loss) or (grad_norm is not None and not math.isfinite(float(grad_norm))):
        raise NonFiniteLossError(
            f"non-finite loss {loss.item()} / grad norm {grad_norm} at step {ds.global_steps}: stopping without "
            "saving. Lower optim.lr, raise optim.warmup_steps or check the data; resume from the last checkpoint")
    return loss, grad_norm


@torch.no_grad()
def eval_loss(engine: Engine, batches: Batches, num_batches: int) -> torch.Tensor:
    """Mean loss over num_batches micro-batches per data-parallel rank, averaged over ranks."""
    ds = engine.engine
    if engine.pipelined:
        # eval_batch runs the pipeline over `micro_batches` micro-batches and returns their DP-mean loss.
        return ds.eval_batch(data_iter=batches, num_micro_batches=num_batches).detach().float()
    was_training = ds.module.training
    ds.module.eval()
    total = torch.zeros((), device=ds.device)
    for _ in range(num_batches):
        inputs, labels = next(batches)
        total += token_losses(ds(inputs), labels).mean()
    ds.module.train(was_training)
    return _dp_mean(total / num_batches)


def memory_gate_means(engine: Engine, num_layers: int) -> torch.Tensor:
    """Per layer (g_in, g_forget, g_out) means of the last forward, averaged over every rank holding the layer
    (TP ranks hold different heads, DP ranks different rows). [num_layers, 3]; NaN for layers without memory.
    A collective over the whole world: each pipeline stage contributes its own layers."""
    sums = torch.zeros(num_layers, 3, dtype=torch.float64)
    counts = torch.zeros(num_layers, 1, dtype=torch.float64)
    for module in engine.engine.module.modules():
        if isinstance(module, DecoderBlock) and module.memory is not None:
            sums[module.layer_index] = module.memory.gate_means().double().cpu()
            counts[module.layer_index] = 1
    both = torch.cat([sums, counts], dim=1).to(engine.engine.device)
    dist.all_reduce(both)
    return (both[:, :3] / both[:, 3:]).float().cpu()  # 0/0 = NaN where no rank holds a memory layer
