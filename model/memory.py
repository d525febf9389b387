"""The LM2 memory module: a gated memory bank read by cross-attention and written once per segment.

Semantics as fixed in docs/memory.md. Per block with memory, N slots of width d_m split into H_m heads of
width d_h = d_m / H_m. Every weight that touches M is head-local (block-diagonal: memory head h only sees its
d_h columns), so under tensor parallelism a rank holds H_m/tp heads, the matching columns of M and of every
projection and gate, and the module is sharded exactly like attention: column-parallel in (the token
projections), row-parallel out (out_proj, one all-reduce), no communication inside the segment scan.

Shapes below use the rank-local sizes: Hl = H_m / tp heads, dh = d_h. The PyTorch operations below work head-first
([Hl, B, rows, dh]): a head-local weight is then one batched matmul over a view, with no copy per operation
(bench/NOTES.md measures why that matters). The write scan and the row-level read run instead as fused kernels
that take the token projections as they are, wherever memory_backend.py finds some (CPU fp32: memory_kernels.py;
CUDA fp32 and bf16: memory_triton.py; both write rules); all compute the same function.

Carried memory. By default every row starts from the learned bank M_0. With a `carry` input (a training option,
pipeline/train/carry.py), each row belongs to a lane: it starts from the state its lane's previous row ended with,
detached (no gradient crosses rows), or from M_0 where it is marked fresh (a new document, a reset), and the state
it ends with is kept for the lane's next row. The states live in `LaneStates`, which the trainer attaches to every
memory module; the model only reads and writes the rows of its lanes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lm2.model import memory_backend
from lm2.model.config import ModelConfig
from lm2.model.layers import Probe, TensorParallel, normal_init, output_init, sharded_parameter


def _per_head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [Hl, ..., i] @ weight: [Hl, i, j] -> [Hl, ..., j], each head with its own matrix."""
    return torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[-1])


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention, q [Hl, B, Tq, dh] over k/v [Hl, B, Tk, dh], the softmax scale already folded into q
    or k. On GPU SDPA's fused kernels never build the [Tq, Tk] scores; on CPU, at the memory's sizes (16 slots,
    64-token segments), SDPA's fixed cost per call exceeded the explicit softmax's (bench/NOTES.md)."""
    return _attend_fused(q, k, v) if q.is_cuda else _attend_explicit(q, k, v)


def _attend_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Fused kernels need the last dim contiguous; the write keys are transposed views (see _segments).
    return F.scaled_dot_product_attention(q, k.contiguous(), v, scale=1.0)


def _attend_explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


class LaneStates:
    """The carried memory of one block on this rank, per lane: `current` [lanes, Hl, N, dh] holds the state each
    lane's previous row ended with and is what rows start from; `next` receives the states this step's rows end
    with. The trainer swaps them after the step (`commit`): within a step, a forward recomputed under activation
    checkpointing reads the same start as the first one."""

    def __init__(self, lanes: int, heads: int, slots: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.current = torch.zeros(lanes, heads, slots, head_dim, dtype=dtype, device=device)
        self.next = torch.zeros_like(self.current)

    def commit(self) -> None:
        self.current, self.next = self.next, self.current

    @torch.compiler.disable  # an indexed read of state outside the model's parameters: eager under train.compile
    def read(self, lanes: torch.Tensor) -> torch.Tensor:
        """The carried states of rows whose lanes are `lanes` [B], head-first: [Hl, B, N, dh]."""
        return self.current[lanes].transpose(0, 1)

    @torch.compiler.disable
    def write(self, lanes: torch.Tensor, states: torch.Tensor) -> None:
        """Keeps the final states [Hl, B, N, dh] of rows whose lanes are `lanes` [B] for the lanes' next rows."""
        self.next[lanes] = states.detach().transpose(0, 1).to(self.next.dtype)


class LM2Memory(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        d, d_m, heads, slots = cfg.hidden_size, cfg.memory_dim, cfg.memory.heads, cfg.memory.slots
        self.slots, self.local_heads, self.head_dim = slots, heads // tp.size, d_m // heads
        self.bptt_segments = cfg.memory.bptt_segments
        self.convex = cfg.memory.write_rule == "convex"
        self.read_norm_eps = cfg.norm_eps if cfg.memory.read_norm else None
        init = normal_init(cfg.init_std)

        def head_local(shape: tuple[int, ...], fill=None) -> nn.Parameter:
            # Drawn whole from the global RNG and sliced, so TP=2 holds exactly the weights of TP=1.
            full = torch.empty(heads, *shape, dtype=tp.config.params_dtype)
            init(full) if fill is None else full.fill_(fill)
            return sharded_parameter(full, 0, tp.rank, tp.size)

        # M_init[r, r mod d_m] = 1: slot r starts as the unit vector e_r. Columns are split by memory head.
        bank = torch.zeros(slots, d_m, dtype=tp.config.params_dtype)
        bank[torch.arange(slots), torch.arange(slots) % d_m] = 1.0
        self.init_bank = sharded_parameter(bank, 1, tp.rank, tp.size)  # [N, Hl*dh]

        # Read: tokens query the memory slots.
        self.read_q = tp.column(d, d_m, init)
        self.read_k = head_local((self.head_dim, self.head_dim))
        self.read_v = head_local((self.head_dim, self.head_dim))
        self.out_gate = head_local((self.head_dim, self.head_dim))
        self.out_gate_bias = head_local((self.head_dim,), fill=0.0)
        self.out_proj = tp.row(d_m, d, output_init(cfg.init_std, cfg.num_layers))
        # Write: slots attend to the segment's tokens, then LSTM-like input and forget gates.
        self.write_q = head_local((self.head_dim, self.head_dim))
        self.write_k = tp.column(d, d_m, init)
        self.write_v = tp.column(d, d_m, init)
        self.in_gate = head_local((2 * self.head_dim, self.head_dim))
        self.in_gate_bias = head_local((self.head_dim,), fill=cfg.memory.input_bias_init)
        self.forget_gate = head_local((2 * self.head_dim, self.head_dim))
        self.forget_gate_bias = head_local((self.head_dim,), fill=cfg.memory.forget_bias_init)
        # The gates pass through probes, where the trainer's forward hooks read them for metrics.
        self.in_gate_probe, self.forget_gate_probe, self.out_gate_probe = Probe(), Probe(), Probe()
        # The last state a row-level forward computed (M_k with carry, M_{k-1} without), for the trainer's slot
        # norm metrics.
        self.state_probe = Probe()
        self.lane_states: LaneStates | None = None

    def initial_state(self, batch: int) -> torch.Tensor:
        """M_0 for a batch of fresh rows: the learned bank expanded, never a buffer. [Hl, B, N, dh]."""
        bank = self.init_bank.view(self.slots, self.local_heads, self.head_dim).transpose(0, 1)
        return bank.unsqueeze(1).expand(-1, batch, -1, -1)

    def start_state(self, batch: int, carry: torch.Tensor | None) -> torch.Tensor:
        """Where rows start, [Hl, B, N, dh]: M_0, or with carry [B, 2] (each row's lane, and 1 where it starts
        fresh) the lane's carried state, detached, for rows that continue their lane."""
        fresh = self.initial_state(batch)
        if carry is None:
            return fresh
        return torch.where(carry[:, 1].bool().view(1, -1, 1, 1), fresh, self.lane_states.read(carry[:, 0]))

    def _heads(self, y: torch.Tensor) -> torch.Tensor:
        """A token projection [B, T, Hl*dh] -> head-first [Hl, B, T, dh] (one copy)."""
        return y.view(*y.shape[:-1], self.local_heads, self.head_dim).permute(2, 0, 1, 3).contiguous()

    def _segments(self, y: torch.Tensor, segment_length: int, keys: bool = False) -> torch.Tensor:
        """A token projection [B, k*S, Hl*dh] -> its k segments [k, Hl, B, S, dh], one copy: segment-major, so that
        backward joins their gradients with one contiguous cat. Keys are stored transposed, [k, Hl, B, dh, S]: the
        attention multiplies by k^T, whose gradient then comes out contiguous (a transposed gradient made that cat
        10x slower)."""
        b, length, _ = y.shape
        segments = y.view(b, length // segment_length, segment_length, self.local_heads, self.head_dim)
        return segments.permute(1, 3, 0, 4, 2).contiguous() if keys else segments.permute(1, 3, 0, 2, 4).contiguous()

    def _scale(self) -> float:
        return self.head_dim**-0.5

    def _read_kv_weight(self) -> torch.Tensor:
        """The read's key (softmax scale folded in) and value weights side by side: [Hl, dh, 2dh]."""
        return torch.cat((self.read_k * self._scale(), self.read_v), -1)

    def read_memory(self, mem: torch.Tensor) -> torch.Tensor:
        """The memory as the read sees it, any shape [..., dh] of head-local rows: RMS-normalised over each head's
        dh columns with memory.read_norm (computed in fp32, as RMSNorm; no gain, see MemoryConfig), else mem."""
        if self.read_norm_eps is None:
            return mem
        m32 = mem.float()
        return (m32 * torch.rsqrt(m32.pow(2).mean(-1, keepdim=True) + self.read_norm_eps)).type_as(mem)

    def read(self, q: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        """Gated read. q: [Hl, B, T, dh] token queries; mem: [Hl, B, N, dh]. Returns [B, T, d] (all-reduced)."""
        keys, values = _per_head(self.read_memory(mem), self._read_kv_weight()).chunk(2, -1)
        r = _attend(q, keys, values)  # [Hl, B, T, dh]
        gate = torch.baddbmm(self.out_gate_bias.unsqueeze(1), r.flatten(1, 2), self.out_gate).view_as(r)
        gate = self.out_gate_probe(torch.sigmoid(gate))
        return self.out_proj((gate * r).permute(1, 2, 0, 3).flatten(-2))

    def write_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The write's head-local weights arranged once per forward for two matmuls per segment: [Hl, dh, 3dh]
        applied to M_s (the scaled write query, then the M_s rows of the input and forget gates) with its bias
        [Hl, 1, 3dh], and [Hl, dh, 2dh] applied to u (the u rows of both gates)."""
        in_u, in_mem = self.in_gate.chunk(2, 1)
        forget_u, forget_mem = self.forget_gate.chunk(2, 1)
        from_mem = torch.cat((self.write_q * self._scale(), in_mem, forget_mem), -1)
        bias = torch.cat((torch.zeros_like(self.in_gate_bias), self.in_gate_bias, self.forget_gate_bias), -1)
        from_u = torch.cat((in_u, forget_u), -1)
        return from_mem, bias.unsqueeze(1), from_u

    def write(self, k: torch.Tensor, v: torch.Tensor, mem: torch.Tensor, weights) -> torch.Tensor:
        """One segment's update. k/v: [Hl, B, S, dh] projections of the segment; mem: [Hl, B, N, dh];
        weights: write_weights() -> M_{s+1}."""
        from_mem, bias, from_u = weights
        dh = self.head_dim
        q, from_mem_gates = torch.baddbmm(bias, mem.flatten(1, 2), from_mem).split((dh, 2 * dh), -1)
        u = _attend(q.view(mem.shape), k, v)  # [Hl, B, N, dh]
        gates = torch.sigmoid(torch.baddbmm(from_mem_gates, u.flatten(1, 2), from_u)).view(*mem.shape[:-1], 2 * dh)
        g_in, g_forget = gates.chunk(2, -1)
        if self.convex:  # the input gate computed above goes unused (see MemoryConfig.write_rule)
            g_in = 1 - g_forget
        return self.in_gate_probe(g_in) * torch.tanh(u) + self.forget_gate_probe(g_forget) * mem

    def truncate(self, mem: torch.Tensor, segment: int) -> torch.Tensor:
        """Truncated BPTT in windows of bptt_segments segments (RMT's scheme): at the first segment of every
        window, M_s is detached for its reads and its write alike. Every block cuts at the same boundaries, so no
        gradient leaves its window, also through stacked blocks (a block's reads feed the next block's writes).
        The write at the end of a window's last segment gets no gradient, hence bptt_segments >= 2."""
        return mem.detach() if segment > 0 and segment % self.bptt_segments == 0 else mem

    def step(self, xn: torch.Tensor, mem: torch.Tensor, segment: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment number `segment` for incremental use: xn [B, S, d], mem M_s -> (read [B, S, d], M_{s+1})."""
        mem = self.truncate(mem, segment)
        read = self.read(self._heads(self.read_q(xn)), mem)
        keys = self._segments(self.write_k(xn), xn.shape[1], keys=True)[0].transpose(-1, -2)
        values = self._segments(self.write_v(xn), xn.shape[1])[0]
        return read, self.write(keys, values, mem, self.write_weights())

    def _scan(
        self, start: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, weights, segment_length: int
    ) -> torch.Tensor:
        """M_s..M_{s+n} [Hl, B, n + 1, N, dh] from M_s and the write keys and values of n segments [B, n*S, Hl*dh]:
        in one fused call where memory_backend has kernels for `start` (CPU fp32: model/memory_kernels.py; CUDA:
        model/memory_triton.py), else one write() per segment."""
        kernels = memory_backend.fused_kernels(start)
        if keys.shape[1] > 0 and kernels is not None:
            states, gates = kernels.fused_write_scan(start, keys, values, weights, segment_length, self.convex)
            for g_in, g_forget in zip(*gates.chunk(2, -1)):
                self.in_gate_probe(1 - g_forget if self.convex else g_in), self.forget_gate_probe(g_forget)
            return states
        states = [start]
        keys, values = self._segments(keys, segment_length, keys=True), self._segments(values, segment_length)
        for k, v in zip(keys, values):
            states.append(self.write(k.transpose(-1, -2), v, states[-1], weights))
        return torch.stack(states, dim=2)

    def _states(
        self, start: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, segment_length: int
    ) -> torch.Tensor:
        """M_0..M_n [Hl, B, n + 1, N, dh] from the rows' start M_0 and the write keys and values of segments
        0..n-1 [B, n*S, Hl*dh]. The scan runs window by window: as in truncate(), M_s starts a new window,
        detached, at every multiple s of bptt_segments."""
        n, window = keys.shape[1] // segment_length, self.bptt_segments
        weights, pieces = self.write_weights(), []
        for first in range(0, n + 1, window):
            last = min(first + window, n)
            tokens = slice(first * segment_length, last * segment_length)
            states = self._scan(start, keys[:, tokens], values[:, tokens], weights, segment_length)  # M_first..M_last
            if last == first + window:
                start, states = states[:, :, -1].detach(), states[:, :, :-1]
            pieces.append(states)
        return torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]

    def forward(self, xn: torch.Tensor, segment_length: int, carry: torch.Tensor | None = None) -> torch.Tensor:
        """Rows xn: [B, L, d] with L = k * S, starting from M_0 or, with carry [B, 2] (lane, fresh), from their
        lanes' states (start_state). Returns the memory read [B, L, d].

        The token projections run over all segments at once; only the N x S writes scan over segments; then
        every segment reads its own M_s in one batched attention over [B*k] rows. Without carry, the write after
        the last segment would feed nothing, so neither it nor the last segment's write keys and values are
        computed; with carry, that write gives the state M_k the lane's next row starts from.
        """
        b, length, _ = xn.shape
        k = length // segment_length
        written = xn if carry is not None else xn[:, : length - segment_length]
        start = self.start_state(b, carry)
        states = self._states(start, self.write_k(written), self.write_v(written), segment_length)
        self.state_probe(states[:, :, -1])
        if carry is not None:
            self.lane_states.write(carry[:, 0], states[:, :, -1])
            states = states[:, :, :k]  # [Hl, B, k, N, dh]: what segments 0..k-1 read
        q = self.read_q(xn)
        kernels = memory_backend.fused_kernels(q)
        if kernels is not None:
            # The read norm runs as torch operations before the kernel: a few % of a step (bench/README.md).
            gated, gate = kernels.fused_read(
                q, self.read_memory(states), self._read_kv_weight(), self.out_gate, self.out_gate_bias, segment_length
            )
            self.out_gate_probe(gate)
            return self.out_proj(gated)
        q = self._heads(q).view(self.local_heads, b * k, segment_length, self.head_dim)
        return self.read(q, states.flatten(1, 2)).view(b, length, -1)
