"""The trainer's sections of a run config: parallel degrees, optimiser and schedule, the loop, logging."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lm2.model.config import require, require_choice

ZeroStage = Literal[0, 1, 2, 3]
Decay = Literal["cosine", "linear"]
Precision = Literal["auto", "fp32", "bf16"]
WandbMode = Literal["offline", "online", "disabled"]


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel degree: heads, memory heads, MLP and vocabulary are split over tp ranks."""
    pp: int = 1
    """Pipeline stages (DeepSpeed 1F1B). The world size must be a multiple of tp * pp; the rest is data-parallel."""
    zero_stage: ZeroStage = 1
    """DeepSpeed ZeRO stage for optimizer state (0-3 with pp=1; 0-1 with pp>1)."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"parallel.{name} must be a positive integer, got {value!r}")
        require_choice("parallel.zero_stage", self.zero_stage, ZeroStage)
        require(
            self.pp == 1 or self.zero_stage <= 1,
            f"parallel.zero_stage={self.zero_stage} with parallel.pp={self.pp}: DeepSpeed's pipeline engine "
            "supports ZeRO 0-1 only (ZeRO-2/3 partition gradients, which the 1F1B schedule accumulates across "
            "micro-batches); use zero_stage: 1 with pipelining or pp: 1 with ZeRO-2/3",
        )


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate, reached after warmup_steps."""
    min_lr: float = 3e-5
    """The learning rate at the end of the decay."""
    warmup_steps: int = 100
    decay: Decay = "cosine"
    """cosine or linear decay from lr to min_lr between warmup_steps and train.steps."""
    weight_decay: float = 0.1
    """Decoupled (AdamW) decay of matrices; norms, biases and the memory banks are not decayed."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""

    def __post_init__(self) -> None:
        require(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, f"optim.min_lr={self.min_lr} must lie between 0 and optim.lr={self.lr}")
        require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        require_choice("optim.decay", self.decay, Decay)
        require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1 and optim.beta2 must lie in [0, 1)")
        require(self.eps > 0, f"optim.eps must be positive (Adam divides by sqrt(v) + eps), got {self.eps}")
        require(self.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {self.grad_clip}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    """Optimizer steps of the run."""
    global_batch: int = 8
    """Rows per optimizer step across all data-parallel ranks."""
    micro_batch: int = 2
    """Rows per forward/backward on one rank; global_batch / (micro_batch * dp) micro-batches accumulate."""
    seed: int = 0
    """Initialisation seed (weights are the same at any TP/PP degree)."""
    precision: Precision = "auto"
    """fp32, bf16, or auto: bf16 on GPU, fp32 on CPU."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them."""
    compile: bool = False
    """torch.compile each decoder block in place (names, hooks and checkpoints unchanged). Off by default: on CPU
    it made LM2's steps 4-7 % faster but the first step 9-43 s slower (bench/README.md)."""
    log_every: int = 10
    eval_every: int = 0
    """Validation loss every this many steps on the val split of data.streams; 0 disables."""
    eval_batches: int = 4
    """Micro-batches per data-parallel rank in one validation pass."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device for MFU (e.g. 989 for an H100 in bf16); 0 leaves MFU out."""

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch", "micro_batch", "log_every", "eval_batches"):
            require(getattr(self, name) > 0, f"train.{name} must be positive, got {getattr(self, name)}")
        require(self.eval_every >= 0, f"train.eval_every must be >= 0, got {self.eval_every}")
        require(0 <= self.seed < 2**32, f"train.seed must lie in [0, 2**32) (numpy's seed range), got {self.seed}")
        require_choice("train.precision", self.precision, Precision)
        require(self.peak_tflops >= 0, f"train.peak_tflops must be >= 0, got {self.peak_tflops}")

    def grad_accum(self, dp: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        steps, rest = divmod(self.global_batch, self.micro_batch * dp)
        require(
            rest == 0 and steps > 0,
            f"train.global_batch={self.global_batch} must be a multiple of train.micro_batch * data-parallel "
            f"size = {self.micro_batch} * {dp}: change global_batch or micro_batch, or the world size",
        )
        return steps


@dataclass(frozen=True)
class LoggingConfig:
    run_dir: str = "runs/tiny"
    """Where the run writes: checkpoints/, wandb/, the resolved config."""
    wandb: WandbMode = "offline"
    """offline (default, no network), online, or disabled."""
    project: str = "lm2"
    run_name: str | None = None

    def __post_init__(self) -> None:
        require(bool(self.run_dir), "logging.run_dir is empty: give the folder the run writes to")
        require_choice("logging.wandb", self.wandb, WandbMode)


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100
    """Save every this many steps (0: only at the end and on a signal)."""
    keep: int = 3
    """Complete checkpoints to keep; older ones are deleted once a newer one is complete."""
    resume: str = "none"
    """none, auto (the newest complete checkpoint under logging.run_dir/checkpoints, if any), or the path of
    one checkpoint folder (.../checkpoints/step_00000100)."""

    def __post_init__(self) -> None:
        require(self.every >= 0, f"checkpoint.every must be >= 0, got {self.every}")
        require(self.keep >= 1, f"checkpoint.keep must be >= 1, got {self.keep}")
        require(bool(self.resume), "checkpoint.resume must be none, auto or a checkpoint folder")
