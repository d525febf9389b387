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
from lm2.pipeline.checkpoint.save import PendingSave, Retention, code_version, save
from lm2.pipeline.console import human, saved_line
from lm2.pipeline.data.lanes import LaneLoader
from lm2.pipeline.data.streaming import RowLoader
from lm2.pipeline.launch.exit_codes import EXIT_REQUEUE
from lm2.pipeline.launch.signals import StopSignals
from lm2.pipeline.launch.slurm import requeue_note
from lm2.pipeline.parallel.init import host_group
from lm2.pipeline.train.build import RunParts, build_loader
from lm2.pipeline.train.memory_monitor import COLUMNS, MemoryMonitor
from lm2.pipeline.train.metrics import MetricsLogger, Throughput, memory_metrics
from lm2.pipeline.train.peak import resolve_peak_tflops
from lm2.pipeline.train.step import FiniteWatch, MicroBatches, eval_loss, train_step


def micro_batch_stream(loader: RowLoader | LaneLoader, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's micro-batches (input_ids, labels and, from document lanes, carry) on `device`, epoch after
    epoch."""
    while True:
        for batch in loader:
            yield {key: batch[key].to(device) for key in ("input_ids", "labels", "carry") if key in batch}


def device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def take(stream: Iterator, count: int) -> list[dict[str, torch.Tensor]]:
    return [next(stream) for _ in range(count)]


def plain(batches: list[dict[str, torch.Tensor]]) -> MicroBatches:
    """The engine's micro-batches without carried memory: (input_ids, labels)."""
    return [(batch["input_ids"], batch["labels"]) for batch in batches]


class RequeueExit(SystemExit):
    """Raised after a signal-triggered checkpoint; the process exits with EXIT_REQUEUE."""

    def __init__(self) -> None:
        super().__init__(EXIT_REQUEUE)


class Trainer:
    """Runs a built run (build.py) from its start to run.train.steps: `fit()`.

    `signals` are the stop signals received so far: install them before building the run (it takes a while)."""

    def __init__(self, parts: RunParts, signals: StopSignals | None = None):
        self.parts, self.run, self.dims, self.engine = parts, parts.run, parts.dims, parts.engine
        self.train_loader, self.val_loader, self.carry = parts.train_loader, parts.val_loader, parts.carry
        self.signals = signals or StopSignals()
        self.rank = dist.get_rank()
        self.host_group = host_group()
        self.device = self.engine.deepspeed.device
        self.memory_monitor = MemoryMonitor(self.engine.deepspeed.module, self.run.model.num_layers, self.device)
        self.step, self.wandb_id = parts.start.step, parts.start.wandb_id
        self.stage = self.run.train.stage_at(self.step)  # the curriculum stage the train loader reads
        resumed = parts.start.resumed_from
        self.retention = Retention(self.run.checkpoint.keep, [resumed.name] if resumed is not None else [])
        self.pending: PendingSave | None = None
        """The asynchronous save whose files are still being written (checkpoint.async_save)."""
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
        if run.train.stages:
            stages = ", ".join(f"{stage.steps} steps of <= {stage.segments} segment(s)" for stage in run.train.stages)
            streams = f"a curriculum of {len(run.train.stages)} stages ({stages}); validation {streams}"
        start = (
            f"resumed from step {self.step}{requeue_note(os.environ)}: {self.parts.start.resumed_from} "
            f"({self.parts.start.verified})"
            if self.parts.start.resumed_from is not None
            else "fresh run from step 0"
            + (f", weights from {self.parts.start.initialised_from}" if self.parts.start.initialised_from else "")
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

    def _rows(self, stage: int | None) -> int:
        """Tokens per row of a curriculum stage (model.row_length without stages)."""
        model = self.run.model
        return model.row_length if stage is None else self.run.train.stages[stage].segments * model.segment_length

    @property
    def tokens_per_step(self) -> int:
        return self.run.train.global_batch * self._rows(self.stage)

    def tokens_through(self, step: int) -> int:
        """Tokens of the first `step` steps, stage by stage."""
        if not self.run.train.stages:
            return step * self.tokens_per_step
        tokens, first = 0, 0
        for index, stage in enumerate(self.run.train.stages):
            tokens += max(0, min(step, first + stage.steps) - first) * self.run.train.global_batch * self._rows(index)
            first += stage.steps
        return tokens

    def _enter_stage(self, stage: int) -> None:
        """Switches the train loader to curriculum stage `stage`'s data (every rank at the same step)."""
        self.train_loader = build_loader(self.run, self.dims, self.rank, stage)
        self.stage = stage
        if self.rank == 0:
            config = self.run.train.stages[stage]
            print(
                f"stage {stage + 1}/{len(self.run.train.stages)} from step {self.step + 1}: samples of up to "
                f"{config.segments} segments ({self._rows(stage)} tokens), {', '.join(s.path for s in config.streams)}",
                flush=True,
            )

    def save_checkpoint(self, background: bool = False) -> None:
        """Saves the current step; with `background`, starts an asynchronous save (published later by
        publish_pending). A pending save is published first."""
        self.publish_pending(wait=True)
        manifest = Manifest(
            step=self.step,
            layout=self.engine.layout,
            config=self.run.to_dict(),
            samples=self.step * self.run.train.global_batch,
            tokens=self.tokens_through(self.step),
            code_version=code_version(),
            wandb_id=self.wandb_id,
            data=self.train_loader.state_dict(),
            stage=self.stage,
            tokenizer_sha256=self.train_loader.tokenizer_sha256,
        )
        started = time.perf_counter()
        carry = self.carry.state_dict() if self.carry is not None else None
        if background:
            self.pending = PendingSave.start(self.engine, self.run.checkpoints, manifest, self.retention, carry)
            return
        folder = save(self.engine, self.run.checkpoints, manifest, self.retention, carry)
        if self.rank == 0:
            print(saved_line(self.step, folder, time.perf_counter() - started), flush=True)

    def publish_pending(self, wait: bool = False) -> None:
        """Publishes the pending asynchronous save once every rank has written its files (a collective: every rank
        calls it at the same step boundaries); with `wait`, waits for them."""
        if self.pending is None:
            return
        pending = self.pending
        if pending.poll(self.host_group, wait=wait):
            self.pending = None
            if self.rank == 0:
                print(
                    saved_line(pending.manifest.step, pending.folder, pending.seconds)
                    + f" (in the background, published at step {self.step})",
                    flush=True,
                )

    def validate(self) -> float:
        stream = micro_batch_stream(self.val_loader, self.device)
        return eval_loss(self.engine, plain(take(stream, self.run.train.eval_batches))).item()

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
        peak, note = resolve_peak_tflops(run.train.peak_tflops, device_name(self.device))
        if note and self.rank == 0:
            print(note, flush=True)
        throughput = Throughput(3 * forward_flops_per_token(run.model), self.dims.world_size, peak)
        stream = micro_batch_stream(self.train_loader, self.device)
        first_step, started, logged_loss = self.step, time.perf_counter(), None
        finite = FiniteWatch(self.device)
        try:
            while self.step < run.train.steps:
                if run.train.stage_at(self.step) != self.stage:
                    self._enter_stage(run.train.stage_at(self.step))
                    stream = micro_batch_stream(self.train_loader, self.device)
                log_due = self._log_due(self.step + 1)
                lr = self.engine.deepspeed.get_lr()[0]  # the LR this step applies (the step moves it on)
                with self.memory_monitor.recording(enabled=log_due):
                    loss, grad_norm = train_step(self.engine, self._micro_batches(take(stream, self.engine.grad_accum)))
                if self.carry is not None:
                    self.carry.commit()
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
                self.publish_pending()
                every = run.checkpoint.every
                final = stop or self.step == run.train.steps
                if final or (every and self.step % every == 0):
                    finite.check()  # never save a blown-up model
                    self.save_checkpoint(background=run.checkpoint.async_save and not final)
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

    def _micro_batches(self, batches: list[dict[str, torch.Tensor]]) -> MicroBatches:
        """This step's micro-batches for the engine, with each row's lane when memory is carried."""
        return plain(batches) if self.carry is None else self.carry.micro_batches(self.step, batches)

    def _log_due(self, step: int) -> bool:
        return step % self.run.train.log_every == 0 or step == self.run.train.steps

    def _train_metrics(self, throughput: Throughput, loss: torch.Tensor, grad_norm, lr: float) -> dict:
        """The log step's training metrics. Loss, grad norm, gate means and slot norms reach the host in one transfer
        (the one host sync of a log step), before the throughput clock is read."""
        memory = self.memory_monitor.summary()  # a collective: every rank logs the same steps
        norm = torch.as_tensor(float("nan") if grad_norm is None else grad_norm, dtype=torch.float64)
        values = torch.cat(
            [loss.detach().double().view(1).to(memory.device), norm.view(1).to(memory.device), memory.flatten()]
        ).tolist()
        run, width = self.run, len(COLUMNS)
        return {
            "loss": values[0],
            "lr": lr,
            "grad_norm": values[1] if grad_norm is not None else None,
            "samples": self.step * run.train.global_batch,
            "tokens": self.tokens_through(self.step),
            **throughput.report(),
            **memory_metrics([values[2 + width * i : 2 + width * (i + 1)] for i in range(run.model.num_layers)]),
        }
