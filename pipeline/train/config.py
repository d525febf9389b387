"""The trainer's sections of a run config: the optimiser and its schedule, and the training loop (with carried
memory and a curriculum of stages)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lm2.model.config import require, require_choice
from lm2.pipeline.data.config import StreamConfig

Decay = Literal["cosine", "linear"]
CarryMode = Literal["none", "state", "document"]
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
class CarryConfig:
    """Memory carried across rows (pipeline/train/carry.py). A lane is row slot j of micro-batch i on a rank; what
    a lane's row ends with is where its next row starts, detached: no gradient crosses rows."""

    mode: CarryMode = "none"
    """none: every row starts from the learned bank M_0. state ("state passing"): each lane's row starts from the
    final memory of that lane's previous row, related or not, so training reaches the memory states a long input
    reaches. document: lanes read documents in order (data prepared with `--packing document`): a document longer
    than a row continues in the same lane at the next step with its memory, which returns to M_0 exactly where a
    new document starts (evaluation's semantics, extended to training)."""
    reset: float = 0.0
    """state mode: the probability that a lane's row starts from M_0 instead, drawn per lane and row, so the model
    also keeps learning from a fresh bank."""

    def __post_init__(self) -> None:
        require_choice("train.carry.mode", self.mode, CarryMode)
        require(0 <= self.reset <= 1, f"train.carry.reset must lie in [0, 1], got {self.reset}")
        require(self.reset == 0 or self.mode == "state", "train.carry.reset applies to train.carry.mode: state only")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


@dataclass(frozen=True)
class StageConfig:
    """One stage of a curriculum (train.stages): the steps it runs, its data and the length of its rows."""

    steps: int
    """Optimizer steps of this stage."""
    streams: list[StreamConfig]
    """The stage's training data, read instead of data.streams while the stage runs (the same fields)."""
    segments: int
    """The longest a sample of this stage is, in segments: its rows hold segments x model.segment_length tokens
    (prepare the stage's data with that --row-length). Samples shorter than their row are padded without loss."""

    def __post_init__(self) -> None:
        require(self.steps > 0, f"train.stages[].steps must be positive, got {self.steps}")
        require(self.segments > 0, f"train.stages[].segments must be positive, got {self.segments}")
        require(bool(self.streams), "train.stages[].streams is empty: give the stage's data")


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
    it made LM2's steps 4-7 % faster but the first step 9-43 s slower (bench/NOTES.md)."""
    log_every: int = 10
    eval_every: int = 0
    """Validation loss every this many steps on the val split of data.streams; 0 disables."""
    eval_batches: int = 4
    """Micro-batches per data-parallel rank in one validation pass."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device for MFU (e.g. 989 for an H100 in bf16). None (default): the GPU's from a
    table (pipeline/train/peak.py), none on CPU or on a GPU the table lacks (the console says so); 0 leaves MFU
    out."""
    carry: CarryConfig = field(default_factory=CarryConfig)
    """Memory carried across rows: none (default), state or document."""
    stages: list[StageConfig] = field(default_factory=list)
    """A curriculum (RMT/ARMT's over segment counts, e.g. samples of at most 1, 2, 4, 8, 16 segments): stages run
    one after the other, each on its own data with rows of its own length; their steps add up to train.steps.
    Empty: one stage, data.streams at model.row_length. Validation always reads data.streams."""
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
        require(
            not self.stages or sum(stage.steps for stage in self.stages) == self.steps,
            f"train.stages' steps add up to {sum(stage.steps for stage in self.stages)}, train.steps is "
            f"{self.steps}: make them equal",
        )
        require(
            self.peak_tflops is None or self.peak_tflops >= 0, f"train.peak_tflops must be >= 0, got {self.peak_tflops}"
        )
        require(self.init_from != "", "train.init_from must be a checkpoint or Hugging Face folder, or null")

    def stage_at(self, step: int) -> int | None:
        """The index of the stage that runs optimizer step number `step` (counted from 0); None without stages."""
        end = 0
        for index, stage in enumerate(self.stages):
            end += stage.steps
            if step < end:
                return index
        return len(self.stages) - 1 if self.stages else None

    def grad_accum(self, dp: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        steps, rest = divmod(self.global_batch, self.micro_batch * dp)
        require(
            rest == 0 and steps > 0,
            f"train.global_batch={self.global_batch} must be a multiple of train.micro_batch * data-parallel "
            f"size = {self.micro_batch} * {dp}: change global_batch or micro_batch, or the world size",
        )
        return steps
