"""One optimizer step and one validation pass: the math, no logging and no files.

Micro-batches are (inputs, labels) pairs on this rank's device: inputs are input_ids [micro_batch, row_length], or
with carried memory (input_ids, carry) (pipeline/train/carry.py), labels [micro_batch, row_length]. Every
rank, every pipeline stage included, receives the same list for its replica: the pipeline engine reads only
on its first and last stages, but all stages keep their loaders in step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from lm2.model.lm import mean_loss
from lm2.pipeline.train.engine import Engine

MicroBatches = list[tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], torch.Tensor]]


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf; training stops before anything is saved."""


def _dp_mean(value: torch.Tensor) -> torch.Tensor:
    value = value.detach().float().clone()
    dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
    return value / parallel_state.get_data_parallel_world_size()


def train_step(engine: Engine, micro_batches: MicroBatches) -> tuple[torch.Tensor, torch.Tensor | float | None]:
    """One optimizer step over this rank's engine.grad_accum micro-batches.
    Returns (mean loss over the global batch, grad norm), left where they are: reading them is a host sync, so
    callers check them with FiniteWatch and read them on log steps only.
    """
    ds = engine.deepspeed
    if engine.pipelined:
        loss = ds.train_batch(data_iter=iter(micro_batches)).detach().float()  # DP-mean, on every stage
    else:
        total = torch.zeros((), device=ds.device)
        for inputs, labels in micro_batches:
            micro_loss = mean_loss(ds(*inputs) if isinstance(inputs, tuple) else ds(inputs), labels)
            ds.backward(micro_loss)
            ds.step()  # optimizer step only at the accumulation boundary
            total += micro_loss.detach()
        loss = _dp_mean(total / engine.grad_accum)
    return loss, ds.get_global_grad_norm()


class FiniteWatch:
    """Remembers, on the device, the first step whose loss or gradient norm was NaN/inf. `observe` is device work
    only; `check` reads it (one host sync) and is called on log steps and before every checkpoint, so a run stops
    within log_every steps of a blow-up and never saves one."""

    def __init__(self, device: torch.device):
        self.device = device
        self.first_bad = torch.full((3,), -1.0, dtype=torch.float64, device=device)  # step, loss, grad norm

    def observe(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | float | None) -> None:
        def scalar(value: float) -> torch.Tensor:  # a fill on the device, not a host-to-device copy
            return torch.full((), value, dtype=torch.float64, device=self.device)

        if grad_norm is None or not torch.is_tensor(grad_norm):  # DeepSpeed gives a tensor, a float or None
            grad_norm = scalar(0.0 if grad_norm is None else grad_norm)
        values = torch.stack([scalar(step), loss.detach().double().reshape(()), grad_norm.double().reshape(())])
        bad = ~torch.isfinite(values[1:]).all() & (self.first_bad[0] < 0)
        self.first_bad = torch.where(bad, values, self.first_bad)

    def check(self) -> None:
        """Raises NonFiniteLossError (on every rank alike: the loss is reduced over data-parallel ranks first)."""
        step, loss, norm = self.first_bad.tolist()
        if step >= 0:
            raise NonFiniteLossError(
                f"non-finite loss {loss} / grad norm {norm} at step {int(step)}: stopping without saving. Lower "
                "optim.lr, raise optim.warmup_steps or check the data; resume from the last checkpoint with "
                "--override-schedule"
            )


@torch.no_grad()
def eval_loss(engine: Engine, micro_batches: MicroBatches) -> torch.Tensor:
    """Mean loss over this rank's micro-batches, averaged over data-parallel ranks."""
    ds = engine.deepspeed
    if engine.pipelined:
        return ds.eval_batch(data_iter=iter(micro_batches), num_micro_batches=len(micro_batches)).detach().float()
    was_training = ds.module.training
    ds.module.eval()
    total = torch.zeros((), device=ds.device)
    for inputs, labels in micro_batches:
        total += mean_loss(ds(inputs), labels)
    ds.module.train(was_training)
    return _dp_mean(total / len(micro_batches))
