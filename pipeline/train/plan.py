"""Per-device memory and throughput estimates of a run config, before anything is built (`lm2 info`).

Memory follows what DeepSpeed allocates for torch AdamW: weights and gradients in the params dtype; with ZeRO >= 1
(or bf16) an fp32 master copy and its fp32 gradient next to AdamW's two fp32 moments, partitioned over data-parallel
ranks from ZeRO-1 on; gradients partitioned from ZeRO-2, weights from ZeRO-3; ZeRO-1/2's gradient bucket (see
reduce_bucket_elements). Activations are element counts per token of the tensors autograd saves for backward
(weights excluded), fitted to saved_tensors_hooks counts of configs/tiny.yaml and tests/pipeline/tiny_train.yaml (the
tests check other shapes too, on CPU and GPU), scaled by the tokens of one micro-batch; megatron-core's
vocab-parallel cross-entropy keeps its softmax in fp32. Activation checkpointing keeps each block's input plus one
block's activations during its recompute. Estimates are of allocated tensors, not of the allocator's caching.
"""

from __future__ import annotations

from dataclasses import dataclass

from lm2.model.accounting import forward_flops_per_token, parameter_counts
from lm2.pipeline.config import RunConfig


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    """fp32 master copy and its gradient (ZeRO >= 1 or bf16) plus AdamW's two moments."""
    activations: int
    """Saved for backward, one micro-batch (times the micro-batches 1F1B keeps in flight on the first stage)."""
    activations_checkpointed: int
    """The same with train.activation_checkpointing."""
    memory_state: int
    """The memory banks' states across segments, one micro-batch; part of `activations`."""
    activation_checkpointing: bool
    gradient_bucket: int
    """ZeRO-1/2's buffer for reducing gradients (reduce_bucket_elements), in the params dtype."""
    carried: int = 0
    """train.carry: every lane's memory state in each memory block, twice (where rows start, where they end)."""
    staging: int = 0
    """checkpoint.async_save: this rank's part of one checkpoint, copied to host memory (pinned on GPUs) for the
    background writer; the buffers are kept for the next save. Host memory: not in `total`, which is the device's."""

    @property
    def total(self) -> int:
        acts = self.activations_checkpointed if self.activation_checkpointing else self.activations
        return self.weights + self.gradients + self.optimizer + self.gradient_bucket + acts + self.carried


DEEPSPEED_REDUCE_BUCKET = 500_000_000
"""DeepSpeed's default zero_optimization.reduce_bucket_size, in elements."""


def _params_per_device(run: RunConfig) -> float:
    """Parameters on one device of the first pipeline stage (which also holds the embedding), before ZeRO-3."""
    m, par = run.model, run.parallel
    counts = parameter_counts(m, m.padded_vocab_size(par.tp))
    layers_here = -(-m.num_layers // par.pp)
    return (
        counts.embedding // (1 if m.tie_embeddings else 2)
        + (counts.backbone + counts.memory) * layers_here // m.num_layers
    ) / par.tp


def reduce_bucket_elements(run: RunConfig) -> int:
    """The zero_optimization.reduce_bucket_size lm2 gives DeepSpeed: its default, 5e8 elements, unless the device
    holds fewer parameters. ZeRO-1/2 allocate the whole bucket at the first backward, whatever the model's size:
    1 GB in bf16 (on an H100 a 20M-parameter run peaked at 1.52 GB, 0.52 GB without it; on CPU its untouched pages
    stay out of RSS). A bucket that holds every gradient of the device is flushed once per step, as the default
    bucket is for any model of fewer than 5e8 parameters per device, so nothing is lost."""
    return int(min(DEEPSPEED_REDUCE_BUCKET, _params_per_device(run)))


def _layer_elements_per_token(run: RunConfig, memory: bool, device: str) -> float:
    """Elements autograd saves per token in one block on one TP rank (norm inputs, residuals and column-parallel
    inputs are replicated; q/k/v, attention output, the MLP's four ffn-wide tensors and the memory are split).
    Without TP a vanilla block saves 8d + 2 kv + 4 ffn per token."""
    m, tp = run.model, run.parallel.tp
    kv = m.num_kv_heads * m.head_dim
    elements = 4 * m.hidden_size + (4 * m.hidden_size + 2 * kv + 4 * m.ffn_hidden_size) / tp
    if memory:  # token projections and gates (write keys and values for every segment but the last, whose
        # write would feed nothing inside the row), the per-segment states and gates
        d_m, slots = m.memory_dim, m.memory.slots
        # Without carried memory the last segment's write would feed nothing inside the row: it is not computed.
        written = 1 if run.train.carry.enabled else (m.num_segments - 1) / m.num_segments
        elements += ((4 + 2 * written) * d_m + 10 * slots * d_m / m.segment_length) / tp
        if device == "cpu":  # the explicit softmax (model/memory.py) keeps the read's probabilities (every token
            # over N slots) and the writes' (N slots over every written token)
            elements += m.memory.heads * slots * (1 + written) / tp
    return elements


def memory_estimate(run: RunConfig, dp: int, params_bytes: int, device: str = "cuda") -> MemoryEstimate:
    """Bytes on the busiest device (the first pipeline stage, which also holds the embedding) at data-parallel size
    `dp`; params_bytes is 2 for bf16, 4 for fp32; device "cuda" or "cpu" (the memory's attention differs)."""
    m, par, train = run.model, run.parallel, run.train
    layers_here = -(-m.num_layers // par.pp)
    params = _params_per_device(run)
    zero = par.zero_stage
    weights = params * params_bytes / (dp if zero == 3 else 1)
    gradients = params * params_bytes / (dp if zero >= 2 else 1)
    master = 8 if (zero >= 1 or params_bytes == 2) else 0  # fp32 copy and its gradient
    optimizer = params * (8 + master) / (dp if zero >= 1 else 1)
    bucket = reduce_bucket_elements(run) * params_bytes if zero in (1, 2) else 0

    tokens = train.micro_batch * m.row_length
    accum = train.grad_accum(dp)  # also refuses a batch that does not split over dp
    in_flight = min(par.pp, accum) if par.pp > 1 else 1  # 1F1B: the first stage holds up to pp micro-batches
    layers = [_layer_elements_per_token(run, m.has_memory(i), device) for i in range(layers_here)]
    head = m.padded_vocab_size(par.tp) / par.tp * 4 + 3.4 * m.hidden_size * params_bytes  # fp32 softmax; final norm
    memory_layers = sum(m.has_memory(i) for i in range(layers_here))
    # Each memory block's forward also keeps its head-local weights rearranged for the scan: 7 x d_m x d_h.
    arranged = memory_layers * in_flight * 7 * m.memory_dim * (m.memory_dim // m.memory.heads) / par.tp * params_bytes
    activations = tokens * in_flight * (sum(layers) * params_bytes + head) + arranged
    checkpointed = (
        tokens * in_flight * (layers_here * m.hidden_size * params_bytes + head) + tokens * max(layers) * params_bytes
    )
    state = (
        memory_layers
        * train.micro_batch
        * in_flight
        * (m.num_segments + 1)
        * m.memory.slots
        * m.memory_dim
        / par.tp
        * params_bytes
    )
    carried = 2 * _lane_state_bytes(run, dp, params_bytes)
    staging = checkpoint_bytes(run, dp, params_bytes) if run.checkpoint.async_save else 0
    return MemoryEstimate(
        int(weights),
        int(gradients),
        int(optimizer),
        int(activations),
        int(checkpointed),
        int(state),
        train.activation_checkpointing,
        int(bucket),
        int(carried),
        int(staging),
    )


def checkpoint_bytes(run: RunConfig, dp: int, params_bytes: int) -> int:
    """Bytes the busiest rank (the first data-parallel rank of the first pipeline stage) writes into a checkpoint:
    DeepSpeed's model file holds the weights in the params dtype (ZeRO-3: only their partitioned fp32 copy in the
    optimizer file); the optimizer state is AdamW's two fp32 moments plus, with ZeRO >= 1 or bf16, the fp32 master
    copy, partitioned over data-parallel ranks from ZeRO-1 on; and this rank's carried lanes (train.carry)."""
    zero = run.parallel.zero_stage
    params = _params_per_device(run)
    weights = 0 if zero == 3 else params * params_bytes
    master = 4 if (zero >= 1 or params_bytes == 2) else 0
    optimizer = params * (8 + master) / (dp if zero >= 1 else 1)
    return int(weights + optimizer + _lane_state_bytes(run, dp, params_bytes))


def _lane_state_bytes(run: RunConfig, dp: int, params_bytes: int) -> float:
    """train.carry: one table of every lane's memory state in each memory block of the first pipeline stage."""
    m, par, train = run.model, run.parallel, run.train
    if not train.carry.enabled:
        return 0
    layers_here = -(-m.num_layers // par.pp)
    memory_layers = sum(m.has_memory(i) for i in range(layers_here))
    lanes = train.grad_accum(dp) * train.micro_batch
    return lanes * memory_layers * m.memory.slots * m.memory_dim / par.tp * params_bytes


def tokens_per_s_per_device(run: RunConfig, mfu: float, peak_tflops: float) -> float:
    """Tokens/s each device reaches at model FLOPs utilisation `mfu` of peak_tflops (training = 3 x forward)."""
    return mfu * peak_tflops * 1e12 / (3 * forward_flops_per_token(run.model))
