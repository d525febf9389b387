"""The trainer's sections of a run config: the optimiser and its schedule, and the training loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lm2.model.config import require, require_choice

Decay = Literal["cosine", "linear"]
Precision = Literal["auto", "fp32", "bf16"]


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
    init_from: str | None = None
    """Fine-tuning: the run starts from the weights of this lm2 checkpoint (a step_* folder, a run's checkpoints
    folder or its `latest` file; written at any TP/PP/ZeRO layout) or Hugging Face folder (lm2's LM2 export or a
    Llama, safetensors), with the fresh optimizer, LR schedule and data position of a new run. Its model must have
    the config's shape (train/init_from.py: vocabulary, widths, layers, heads, tied embeddings, and the memory's
    slots, dim, heads and layers), else the run is refused naming the field; row_length, segment_length and the
    memory's training options may differ. A source without memory (a Llama, a vanilla run) gives the backbone; the
    memory starts as a new run's. Ignored when the run resumes a checkpoint of its own (checkpoint.resume auto
    finding one, or a named checkpoint): a requeued fine-tuning job continues where it stopped, it does not
    restart from init_from."""

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch", "micro_batch", "log_every", "eval_batches"):
            require(getattr(self, name) > 0, f"train.{name} must be positive, got {getattr(self, name)}")
        require(self.eval_every >= 0, f"train.eval_every must be >= 0, got {self.eval_every}")
        require(0 <= self.seed < 2**32, f"train.seed must lie in [0, 2**32) (numpy's seed range), got {self.seed}")
        require_choice("train.precision", self.precision, Precision)
        require(self.peak_tflops >= 0, f"train.peak_tflops must be >= 0, got {self.peak_tflops}")
        require(self.init_from != "", "train.init_from must be a checkpoint or Hugging Face folder, or null")

    def grad_accum(self, dp: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        steps, rest = divmod(self.global_batch, self.micro_batch * dp)
        require(
            rest == 0 and steps > 0,
            f"train.global_batch={self.global_batch} must be a multiple of train.micro_batch * data-parallel "
            f"size = {self.micro_batch} * {dp}: change global_batch or micro_batch, or the world size",
        )
        return steps
