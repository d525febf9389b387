"""The LM2 memory module: a gated memory bank read by cross-attention and written once per segment.

Semantics as fixed in shared/LM2_MEMORY.md. Per block with memory, N slots of width d_m split into H_m heads of
width d_h = d_m / H_m. Every weight that touches M is head-local (block-diagonal: memory head h only sees its
d_h columns), so under tensor parallelism a rank holds H_m/tp heads, the matching columns of M and of every
projection and gate, and the module is sharded exactly like attention: column-parallel in (the token
projections), row-parallel out (out_proj, one all-reduce), no communication inside the segment scan.

Shapes below use the rank-local sizes: Hl = H_m / tp heads, dh = d_h.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lm2.model.config import ModelConfig
from lm2.model.layers import Probe, TensorParallel, normal_init, output_init, sharded_parameter


def _per_head(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [..., Hl, i] @ weight: [Hl, i, j] -> [..., Hl, j], each head with its own matrix."""
    return torch.einsum("...hi,hij->...hj", x, weight)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked multi-head attention on head-last tensors: q [B, Tq, Hl, dh], k/v [B, Tk, Hl, dh] -> [B, Tq, Hl, dh]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class LM2Memory(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        d, d_m, heads, slots = cfg.hidden_size, cfg.memory_dim, cfg.memory.heads, cfg.memory.slots
        self.slots, self.local_heads, self.head_dim = slots, heads // tp.size, d_m // heads
        self.bptt_segments = cfg.memory.bptt_segments
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
        self.in_gate_bias = head_local((self.head_dim,), fill=0.0)
        self.forget_gate = head_local((2 * self.head_dim, self.head_dim))
        self.forget_gate_bias = head_local((self.head_dim,), fill=cfg.memory.forget_bias_init)
        # The gates pass through probes, where the trainer's forward hooks read them for metrics.
        self.in_gate_probe, self.forget_gate_probe, self.out_gate_probe = Probe(), Probe(), Probe()

    def initial_state(self, batch: int) -> torch.Tensor:
        """M_0 for a batch of fresh rows: the learned bank expanded, never a buffer. [B, N, Hl, dh]."""
        return self.init_bank.view(1, self.slots, self.local_heads, self.head_dim).expand(batch, -1, -1, -1)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.local_heads, self.head_dim)

    def read(self, q: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        """Gated read. q: [B, T, Hl, dh] token queries; mem: [B, N, Hl, dh]. Returns [B, T, d] (all-reduced)."""
        r = _attend(q, _per_head(mem, self.read_k), _per_head(mem, self.read_v))  # [B, T, Hl, dh]
        gate = self.out_gate_probe(torch.sigmoid(_per_head(r, self.out_gate) + self.out_gate_bias))
        return self.out_proj((gate * r).flatten(-2))

    def write(self, k: torch.Tensor, v: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        """One segment's update. k/v: [B, S, Hl, dh] projections of the segment; mem: [B, N, Hl, dh] -> M_{s+1}."""
        u = _attend(_per_head(mem, self.write_q), k, v)  # [B, N, Hl, dh]
        both = torch.cat((u, mem), dim=-1)  # [B, N, Hl, 2dh]
        g_in = self.in_gate_probe(torch.sigmoid(_per_head(both, self.in_gate) + self.in_gate_bias))
        g_forget = self.forget_gate_probe(torch.sigmoid(_per_head(both, self.forget_gate) + self.forget_gate_bias))
        return g_in * torch.tanh(u) + g_forget * mem

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
        write_k, write_v = self._heads(self.write_k(xn)), self._heads(self.write_v(xn))
        return read, self.write(write_k, write_v, mem)

    def forward(self, xn: torch.Tensor, segment_length: int) -> torch.Tensor:
        """A batch of fresh rows. xn: [B, L, d] with L = k * S. Returns the memory read [B, L, d].

        The token projections run over all segments at once; only the N x S writes scan over segments; then
        every segment reads its own M_s in one batched attention over [B*k] rows.
        """
        b, length, _ = xn.shape
        k = length // segment_length
        seg = (b, k, segment_length, self.local_heads, self.head_dim)
        write_k, write_v = self.write_k(xn).view(seg), self.write_v(xn).view(seg)
        states = [self.initial_state(b)]
        for s in range(1, k):  # the write after the last segment feeds nothing inside this row
            states.append(self.truncate(self.write(write_k[:, s - 1], write_v[:, s - 1], states[-1]), s))
        stacked = torch.stack(states, dim=1).flatten(0, 1)  # [B*k, N, Hl, dh]
        q = self.read_q(xn).view(b * k, segment_length, self.local_heads, self.head_dim)
        return self.read(q, stacked).view(b, length, -1)
