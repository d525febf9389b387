"""The training loop: for each step, train, log, validate and checkpoint. `Trainer` runs what build.py built."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from lm2.model.accounting import forward_flops_per_token, parameter_counts
from lm2.pipeline.checkpoint.format import Manifest
from lm2.pipeline.checkpoint.save import Retention, code_version, save
from lm2.pipeline.console import human, saved_line
from lm2.pipeline.data.streaming import RowLoader
from lm2.pipeline.launch.exit_codes import EXIT_REQUEUE
from lm2.pipeline.launch.signals import StopSignals
from lm2.pipeline.launch.slurm import requeue_note
from lm2.pipeline.parallel.init import host_group
from lm2.pipeline.train.build import RunParts
from lm2.pipeline.train.gates import GateMonitor
from lm2.pipeline.train.metrics import MetricsLogger, Throughput, gate_metrics
from lm2.pipeline.train.step import FiniteWatch, MicroBatches, eval_loss, train_step


def micro_batch_stream(loader: RowLoader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) on `device`, epoch after epoch."""
    while True:
        for batch in loader:
            yield batch["input_ids"].to(device), batch["labels"].to(device)


def take(stream: Iterator, count: int) -> MicroBatches:
    return [next(stream) for _ in range(count)]


class RequeueExit(SystemExit):
    """Raised after a signal-triggered checkpoint; the process exits with EXIT_REQUEUE."""

    def __init__(self) -> None:
        super().__init__(EXIT_REQUEUE)


class Trainer:
    """Runs a built run (build.py) from its start to run.train.steps: `fit()`.

    `signals` are the stop signals received so far: install them before building the run (it takes a while)."""

    def __init__(self, parts: RunParts, signals: StopSignals | None = None):
        self.parts, self.run, self.dims, self.engine = parts, parts.run, parts.dims, parts.engine
        self.train_loader, self.val_loader = parts.train_loader, parts.val_loader
        self.signals = signals or StopSignals()
        self.rank = dist.get_rank()
        self.host_group = host_group()
        self.device = self.engine.deepspeed.device
        self.gates = GateMonitor(self.engine.deepspeed.module, self.run.model.num_layers, self.device)
        self.step, self.wandb_id = parts.start.step, parts.start.wandb_id
        resumed = parts.start.resumed_from
        self.retention = Retention(self.run.checkpoint.keep, [resumed.name] if resumed is not None else [])
        if self.rank == 0:
            print(self.startup_summary(), flush=True)

    def startup_summary(self) -> str:
        """What a user checks before a run goes on: the model, the layout, the data, where it writes, where it
        starts."""
        run, dims = self.run, self.dims
        counts = parameter_counts(run.model)
        memory = (
            f"{run.model.memory.slots} memory slots x {run.model.memory_dim}"
            if run.model.memory.enabled
            else "no memory (vanilla)"
        )
        streams = ", ".join(
            f"{s.path}" + (f" ({s.proportion:g})" if s.proportion is not None else "") for s in run.data.streams
        )
        start = (
            f"resumed from step {self.step}{requeue_note(os.environ)}: {self.parts.start.resumed_from} "
            f"({self.parts.start.verified})"
            if self.parts.start.resumed_from is not None
            else "fresh run from step 0"
        )
        return "\n".join(
            [
                f"model   {human(counts.total)} parameters ({human(counts.memory)} memory), "
                f"{run.model.num_layers} layers, {memory}, rows of {run.model.row_length}",
                f"layout  {dims.world_size} rank(s): tp={dims.tp} pp={dims.pp} dp={dims.dp} "
                f"zero={run.parallel.zero_stage}, {self.engine.grad_accum} micro-batch(es) of "
                f"{run.train.micro_batch} per step and rank",
                f"data    {streams or '-'}; {run.train.global_batch} rows ({human(self.tokens_per_step)} tokens) "
                "per step",
                f"run     {run.logging.run_dir} ({run.train.steps} steps, checkpoint every "
                f"{run.checkpoint.every or '-'})",
                f"start   {start}",
            ]
        )

    @property
    def tokens_per_step(self) -> int:
        return self.run.train.global_batch * self.run.model.row_length

    def save_checkpoint(self) -> None:
        manifest = Manifest(
            step=self.step,
            layout=self.engine.layout,
            config=self.run.to_dict(),
            samples=self.step * self.run.train.global_batch,
            tokens=self.step * self.tokens_per_step,
            code_version=code_version(),
            wandb_id=self.wandb_id,
            data=self.train_loader.state_dict(),
            tokenizer_sha256=self.train_loader.tokenizer_sha256,
        )
        started = time.perf_counter()
        folder = save(self.engine, self.run.checkpoints, manifest, self.retention)
        if self.rank == 0:
            print(saved_line(self.step, folder, time.perf_counter() - started), flush=True)

    def validate(self) -> float:
        stream = micro_batch_stream(self.val_loader, self.device)
        return eval_loss(self.engine, take(stream, self.run.train.eval_batches)).item()

    def _stop_requested(self) -> bool:
        """Whether any rank received SIGTERM/SIGUSR1 (a launcher may signal only some ranks): all ranks agree at the
        same step boundary, so they save the same step."""
        flag = np.array([self.signals.received], dtype=np.int32)  # host memory over gloo: no device sync per step
        dist.all_reduce(torch.from_numpy(flag), op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(flag[0])

    def fit(self) -> None:
        """Trains to run.train.steps. Saves every checkpoint.every steps and at the end; on SIGTERM or SIGUSR1
        saves at the next step boundary and raises RequeueExit."""
        run = self.run
        logger = MetricsLogger(run, self.rank, self.wandb_id)
        self.wandb_id = logger.wandb_id if self.rank == 0 else None
        throughput = Throughput(3 * forward_flops_per_token(run.model), self.dims.world_size, run.train.peak_tflops)
        stream = micro_batch_stream(self.train_loader, self.device)
        first_step, started, logged_loss = self.step, time.perf_counter(), None
        finite = FiniteWatch(self.device)
        try:
            while self.step < run.train.steps:
                log_due = self._log_due(self.step + 1)
                lr = self.engine.deepspeed.get_lr()[0]  # the LR this step applies (the step moves it on)
                with self.gates.recording(enabled=log_due):
                    loss, grad_norm = train_step(self.engine, take(stream, self.engine.grad_accum))
                self.step += 1
                finite.observe(self.step, loss, grad_norm)
                if log_due:
                    finite.check()
                throughput.add(self.tokens_per_step)
                metrics = self._train_metrics(throughput, loss, grad_norm, lr) if log_due else {}
                if run.train.eval_every and self.step % run.train.eval_every == 0:
                    metrics["val_loss"] = self.validate()
                if metrics:
                    logger.log(self.step, metrics)
                    logged_loss = metrics.get("loss", logged_loss)
                stop = self._stop_requested()
                every = run.checkpoint.every
                if stop or self.step == run.train.steps or (every and self.step % every == 0):
                    finite.check()  # never save a blown-up model
                    self.save_checkpoint()
                if stop:
                    # Every rank leaves only when all are done, wandb included: launchers stop the other ranks of
                    # a job once one exits with a non-zero code.
                    logger.finish()
                    dist.barrier()
                    raise RequeueExit()
        finally:
            logger.finish()
        if self.rank == 0 and logged_loss is not None:  # the last step always logs: no extra host read
            print(
                f"done: steps {first_step + 1}-{self.step} in {time.perf_counter() - started:.0f} s, final loss "
                f"{logged_loss:.4f}; checkpoints in {self.run.checkpoints}",
                flush=True,
            )

    def _log_due(self, step: int) -> bool:
        return step % self.run.train.log_every == 0 or step == self.run.train.steps

    def _train_metrics(self, throughput: Throughput, loss: torch.Tensor, grad_norm, lr: float) -> dict:
        """The log step's training metrics. Loss, grad norm and gate means reach the host in one transfer (the
        one host sync of a log step), before the throughput clock is read."""
        gates = self.gates.means()  # a collective: every rank logs the same steps
        norm = torch.as_tensor(float("nan") if grad_norm is None else grad_norm, dtype=torch.float64)
        values = torch.cat(
            [loss.detach().double().view(1).to(gates.device), norm.view(1).to(gates.device), gates.flatten()]
        ).tolist()
        run = self.run
        return {
            "loss": values[0],
            "lr": lr,
            "grad_norm": values[1] if grad_norm is not None else None,
            "samples": self.step * run.train.global_batch,
            "tokens": self.step * self.tokens_per_step,
            **throughput.report(),
            **gate_metrics([values[2 + 3 * i : 5 + 3 * i] for i in range(run.model.num_layers)]),
        }
