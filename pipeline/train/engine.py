"""Builds the DeepSpeed engine: the model (plain or pipelined), AdamW param groups, the LR schedule, ds_config."""

from __future__ import annotations

import math
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

from lm2.model.block import DecoderBlock
from lm2.model.config import ModelConfig
from lm2.model.lm import LM2Model
from lm2.pipeline.checkpoint import engine_io
from lm2.pipeline.checkpoint.format import Layout
from lm2.pipeline.config import RunConfig
from lm2.pipeline.parallel.dims import ParallelDims
from lm2.pipeline.parallel.mpu import DeepSpeedMPU, tensor_parallel
from lm2.pipeline.parallel.pipe import build_pipeline_model, model_name
from lm2.pipeline.parallel.tp_shards import gather_named
from lm2.pipeline.train.config import OptimConfig, TrainConfig
from lm2.pipeline.train.plan import reduce_bucket_elements


def params_dtype(train: TrainConfig) -> torch.dtype:
    if train.precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return torch.bfloat16 if train.precision == "bf16" else torch.float32


def ds_config(run: RunConfig, dims: ParallelDims) -> dict:
    """The DeepSpeed config, derived from the run config (never hand-written): DeepSpeed checks
    train_batch_size == micro * grad_accum * dp, with dp taken from the mpu or the pipeline topology."""
    train = run.train
    return {
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum(dims.dp),
        "gradient_clipping": run.optim.grad_clip,
        "zero_optimization": {"stage": run.parallel.zero_stage, "reduce_bucket_size": reduce_bucket_elements(run)},
        "bf16": {"enabled": params_dtype(train) == torch.bfloat16},
        "zero_allow_untested_optimizer": True,  # our torch AdamW; ZeRO wraps it
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: not norms, biases (gate biases are 2-D) or the memory banks."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or name.endswith("_bias") or name.endswith("init_bank")
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Linear warmup to optim.lr, then cosine or linear decay to optim.min_lr at total_steps (a factor of lr)."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if optim.decay == "cosine" else 1 - progress
    return (optim.min_lr + (optim.lr - optim.min_lr) * shape) / optim.lr


def resume_schedule(ds_engine: deepspeed.DeepSpeedEngine, optim: OptimConfig, total_steps: int, step: int) -> None:
    """After loading a checkpoint at `step`, the LR schedule is the config's: DeepSpeed restores the checkpoint's
    base LRs, which would ignore a changed optim.lr (the scheduler's lambda already closes over the config). With
    an unchanged schedule this sets the very LRs the checkpoint holds."""
    scheduler = ds_engine.lr_scheduler
    scheduler.base_lrs = [optim.lr] * len(scheduler.base_lrs)
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"] = optim.lr
        group["lr"] = optim.lr * lr_factor(step, optim, total_steps)  # what optimizer step number `step` applies


@dataclass
class Engine:
    deepspeed: deepspeed.DeepSpeedEngine
    """DeepSpeed's engine (a PipelineEngine when pipelined): it owns the model, optimizer and LR schedule."""
    pipelined: bool
    grad_accum: int
    """Micro-batches per optimizer step on each data-parallel rank."""
    layout: Layout
    """The parallel layout and ZeRO stage, as checkpoints record it."""
    model: ModelConfig


def build_engine(run: RunConfig, dims: ParallelDims) -> Engine:
    tp = tensor_parallel(params_dtype(run.train))
    if dims.pp_enabled:
        model = build_pipeline_model(run.model, dims, tp, run.train.seed, run.train.activation_checkpointing)
    else:
        model = LM2Model(run.model, tp, seed=run.train.seed)
        model.activation_checkpointing = run.train.activation_checkpointing
    if run.train.compile:
        for block in model.modules():
            if isinstance(block, DecoderBlock):
                block.compile()  # in place: parameter names, hooks and checkpoints stay as they are
    optim = run.optim
    # fused: one pass over each (flat, under ZeRO) parameter tensor, where the default implementation allocates
    # parameter-sized temporaries every step (bench/NOTES.md: 4.8 % of an LM2 step at d=512 on CPU).
    optimizer = torch.optim.AdamW(
        param_groups(model, optim.weight_decay),
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        fused=True,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, optim, run.train.steps))
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=ds_config(run, dims),
        mpu=None if dims.pp_enabled else DeepSpeedMPU(),
    )
    engine_io.install(engine)  # checkpoints load without running code, and saves report their files
    layout = Layout(tp=dims.tp, pp=dims.pp, dp=dims.dp, zero_stage=run.parallel.zero_stage)
    return Engine(engine, dims.pp_enabled, run.train.grad_accum(dims.dp), layout, run.model)


def full_model_state(engine: Engine, vocab_size: int, num_layers: int) -> dict[str, torch.Tensor]:
    """Every weight of the model, unsharded and under its LM2Model name, on every rank (CPU tensors).

    Gathers ZeRO-3 partitions, TP shards (by partition_dim) and pipeline stages; a collective over the world.
    """
    module = engine.deepspeed.module
    params = list(module.named_parameters())
    if engine.pipelined:
        params = [(model_name(name, num_layers), param) for name, param in params]
    with deepspeed.zero.GatheredParameters(
        [p for _, p in params], enabled=engine.deepspeed.zero_optimization_stage() == 3
    ):
        state = gather_named(params, vocab_size)
    if engine.pipelined:
        stages = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(stages, state, group=parallel_state.get_pipeline_model_parallel_group())
        state = {name: tensor for stage in stages for name, tensor in stage.items()}
    return state
