"""The training run: build, then for each step: step, log, validate (checkpoints come from checkpoint.py)."""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
import torch.distributed as dist

from lm2.model.accounting import forward_flops_per_token
from lm2.pipeline.config import RunConfig
from lm2.pipeline.data.streaming import RowLoader, build_train_loader
from lm2.pipeline.parallel.dims import ParallelDims
from lm2.pipeline.parallel.init import init_distributed
from lm2.pipeline.train.engine import Engine, build_engine
from lm2.pipeline.train.metrics import MetricsLogger, Throughput, gate_metrics
from lm2.pipeline.train.step import MicroBatches, eval_loss, memory_gate_means, train_step


def micro_batch_stream(loader: RowLoader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) on `device`, epoch after epoch."""
    while True:
        for batch in loader:
            yield batch["input_ids"].to(device), batch["labels"].to(device)


def take(stream: Iterator, count: int) -> MicroBatches:
    return [next(stream) for _ in range(count)]


def build_val_loader(run: RunConfig, dims: ParallelDims, rank: int) -> RowLoader:
    """The val split of every training stream, unshuffled."""
    streams = [dataclasses.replace(stream, split="val") for stream in run.data.streams]
    data = dataclasses.replace(run.data, streams=streams, shuffle=False)
    return build_train_loader(data, dims, rank, run.train.micro_batch, run.model)


class Trainer:
    """Holds what a run is made of; `fit()` runs the steps. Checkpointing hooks in through `after_step`."""

    def __init__(self, run: RunConfig):
        self.run = run
        self.dims = init_distributed(run.parallel.tp, run.parallel.pp)
        self.rank = dist.get_rank()
        torch.manual_seed(run.train.seed)  # dropout-free model: this only fixes any stray randomness
        self.engine: Engine = build_engine(run, self.dims)
        self.device = self.engine.engine.device
        self.train_loader = build_train_loader(run.data, self.dims, self.rank, run.train.micro_batch, run.model)
        self.val_loader = build_val_loader(run, self.dims, self.rank) if run.train.eval_every else None
        self.step = 0
        self.logger: MetricsLogger | None = None

    @property
    def tokens_per_step(self) -> int:
        return self.run.train.global_batch * self.run.model.row_length

    def validate(self) -> float:
        stream = micro_batch_stream(self.val_loader, self.device)
        return eval_loss(self.engine, take(stream, self.run.train.eval_batches)).item()

    def fit(self, after_step=None) -> None:
        run = self.run
        self.logger = self.logger or MetricsLogger(run, self.rank)
        throughput = Throughput(3 * forward_flops_per_token(run.model), self.dims.world_size, run.train.peak_tflops)
        stream = micro_batch_stream(self.train_loader, self.device)
        while self.step < run.train.steps:
            loss, grad_norm = train_step(self.engine, take(stream, self.engine.grad_accum))
            self.step += 1
            throughput.add(self.tokens_per_step)
            metrics = {}
            if self.step % run.train.log_every == 0 or self.step == run.train.steps:
                metrics = {"loss": loss.item(), "lr": self.engine.engine.get_lr()[0],
                           "grad_norm": float(grad_norm) if grad_norm is not None else None,
                           "samples": self.step * run.train.global_batch, "tokens": self.step * self.tokens_per_step,
                           **throughput.report(),
                           **gate_metrics(memory_gate_means(self.engine, run.model.num_layers))}
            if run.train.eval_every and self.step % run.train.eval_every == 0:
                metrics["val_loss"] = self.validate()
            if metrics:
                self.logger.log(self.step, metrics)
            if after_step is not None:
                after_step(self)
        self.logger.finish()
