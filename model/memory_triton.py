"""The memory's write scan and read as Triton kernels (memory_triton_kernels.py), forward and backward, for CUDA
in fp32 and bf16.

`fused_write_scan` and `fused_read` take and return exactly what memory_kernels' CPU functions of the same names do
(the token projections in their own layout, the states head-first, the gates for the probes; either write rule of
MemoryConfig.write_rule), so the memory picks a backend in one place; `applies` says where these run. Both compute
the function of the memory's PyTorch operations (tests/model/test_memory_triton.py compares values, every gradient
and the gates). On CPU they run only under Triton's interpreter, with TRITON_INTERPRET=1 set before this module
first loads its kernels: that is how the tests check them on a machine without a GPU.

What autograd saves: the write keeps the states, q, u (the attention's output) and the gates of every segment, and
per slot the softmax's log-sum-exp, never the [N, S] probabilities (backward recomputes them, as flash attention
does); the read keeps r and the gates of every token and their log-sum-exp. fp32 operands multiply at torch's fp32
matmul precision (TF32 only where torch.set_float32_matmul_precision allows it).
"""

from __future__ import annotations

import functools

import torch

_BLOCK = 64
"""The largest slot or token tile. The tests lower it to run several tiles, partial ones included, at tiny sizes."""


@functools.cache
def _kernels():
    """The kernels' module, or None where Triton does not import."""
    try:
        from lm2.model import memory_triton_kernels
    except ImportError:
        return None
    return memory_triton_kernels


def applies(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels run for `tensor` (the memory or its projections): fp32 or bf16, eager, Triton
    importable, and on a CUDA device (or on CPU under Triton's interpreter)."""
    if tensor.dtype not in (torch.float32, torch.bfloat16) or torch.compiler.is_compiling():
        return False
    kernels = _kernels()
    return kernels is not None and (tensor.is_cuda or (tensor.device.type == "cpu" and kernels.INTERPRETED))


def _options(slots: int, tokens: int, head_dim: int, dtype: torch.dtype) -> dict:
    """The tiles and launch settings for a head width, the slot and token counts and the inputs' dtype.

    NOTE: chosen, not tuned: no GPU was at hand, only ptxas (compiled for sm_90: at most 161 KiB of shared memory;
    in bf16 at most 0.4 KB of register spills per thread; fp32 heads of 128, whose exact products run on the FMA
    units, spill kilobytes). Tiles are powers of two of at least 16 rows (tl.dot's least) and at most _BLOCK, and a
    key or value tile stays within 16 KiB, so that the pipelined copies of a loop's two tiles and a [dh, dh] weight
    fit in shared memory (fp32 heads of 128 get 32-row tiles). 8 warps where a head is 128 wide."""
    width = max(16, 1 << (head_dim - 1).bit_length())
    most = min(_BLOCK, 16384 // (width * dtype.itemsize))

    def tile(size: int) -> int:
        return max(16, min(1 << (size - 1).bit_length(), most))

    precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return dict(
        BLOCK_N=tile(slots),
        BLOCK_S=tile(tokens),
        BLOCK_D=width,
        HEAD_DIM=head_dim,
        PRECISION=precision,
        num_warps=4 if width <= 64 else 8,
    )


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    """A [B, tokens, width] projection the kernels can read by its own row and token strides."""
    return t if t.stride(-1) == 1 else t.contiguous()


class _WriteScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, start, keys, values, from_mem, bias, from_u, segment_length, convex):
        """As fused_write_scan. Saves q and u [HB, n, N, dh] (HB = heads * rows) and the log-sum-exp [HB, n, N]."""
        heads, rows, slots, head_dim = start.shape
        units, segments = heads * rows, keys.shape[1] // segment_length
        keys, values = _last_contiguous(keys), _last_contiguous(values)
        from_mem, bias, from_u = from_mem.contiguous(), bias.contiguous(), from_u.contiguous()
        states = start.new_empty(heads, rows, segments + 1, slots, head_dim)
        states[:, :, 0] = start
        q, u = (start.new_empty(units, segments, slots, head_dim) for _ in range(2))
        gates = start.new_empty(segments, heads, rows, slots, 2 * head_dim)
        lse = start.new_empty(units, segments, slots, dtype=torch.float32)
        tiles = _options(slots, segment_length, head_dim, states.dtype)
        grid = (units, -(-slots // tiles["BLOCK_N"]))
        _kernels()._write_forward[grid](
            keys,
            values,
            from_mem,
            bias,
            from_u,
            states,
            q,
            u,
            gates,
            lse,
            rows,
            segments,
            slots,
            segment_length,
            *keys.stride()[:2],
            *values.stride()[:2],
            CONVEX=convex,
            **tiles,
        )
        ctx.save_for_backward(keys, values, from_mem, from_u, states, q, u, gates, lse)
        ctx.segment_length, ctx.convex = segment_length, convex
        ctx.mark_non_differentiable(gates)
        return states, gates

    @staticmethod
    def backward(ctx, d_states, _d_gates):
        """The chain kernel, then the token kernel (it reads the chain's d_u and delta), then the weights in torch.
        Transient: d_a [HB, n, N, 3dh] and d_u [HB, n, N, dh] in fp32, four times the states' size."""
        keys, values, from_mem, from_u, states, q, u, gates, lse = ctx.saved_tensors
        heads, rows, _, slots, head_dim = states.shape
        units, segments, segment_length = heads * rows, q.shape[1], ctx.segment_length
        d_start = states.new_empty(heads, rows, slots, head_dim)
        d_a = states.new_empty(units, segments, slots, 3 * head_dim, dtype=torch.float32)
        d_u = states.new_empty(units, segments, slots, head_dim, dtype=torch.float32)
        delta = states.new_empty(units, segments, slots, dtype=torch.float32)
        tiles = _options(slots, segment_length, head_dim, states.dtype)
        strides = (*keys.stride()[:2], *values.stride()[:2])
        # The chain holds more [slots, dh] tiles than any other kernel: 32-slot blocks where heads are 128 wide (64
        # spilled 1.4 KB per thread, 32 about 0.1 KB: ptxas for sm_90, bf16).
        chain = dict(tiles, BLOCK_N=min(tiles["BLOCK_N"], 32 if tiles["BLOCK_D"] >= 128 else _BLOCK))
        _kernels()._write_chain_backward[(units, -(-slots // chain["BLOCK_N"]))](
            keys,
            values,
            from_mem,
            from_u,
            states,
            q,
            u,
            gates,
            lse,
            d_states.contiguous(),
            d_start,
            d_a,
            d_u,
            delta,
            rows,
            segments,
            slots,
            segment_length,
            *strides,
            CONVEX=ctx.convex,
            **chain,
        )
        d_keys, d_values = (keys.new_empty(rows, segments * segment_length, heads * head_dim) for _ in range(2))
        _kernels()._write_token_backward[(units, segments, -(-segment_length // tiles["BLOCK_S"]))](
            keys,
            values,
            q,
            d_u,
            lse,
            delta,
            d_keys,
            d_values,
            rows,
            segments,
            slots,
            segment_length,
            *strides,
            *d_keys.stride()[:2],
            **tiles,
        )
        weights = _write_weight_grads(states, u, d_a, heads)
        return (d_start, d_keys, d_values, *(g.to(from_mem.dtype) for g in weights), None, None)


def _write_weight_grads(states, u, d_a, heads):
    """The gradients of from_mem [H, dh, 3dh], bias [H, 1, 3dh] and from_u [H, dh, 2dh], in fp32: sums over rows,
    segments and slots of M_s^T dA, dA and u^T dZ; a batched matmul per (head, row), then a sum over rows."""
    units, segments, slots, head_dim = u.shape
    mem = states.view(units, segments + 1, slots, head_dim)[:, :segments].flatten(1, 2).float()  # [HB, n*N, dh]
    d_a = d_a.view(units, segments * slots, 3 * head_dim)
    d_gates = d_a[..., head_dim:]
    d_from_mem = torch.bmm(mem.transpose(1, 2), d_a).view(heads, -1, head_dim, 3 * head_dim).sum(1)
    d_bias = d_a.view(heads, -1, 3 * head_dim).sum(1, keepdim=True)
    d_from_u = torch.bmm(u.view(units, -1, head_dim).float().transpose(1, 2), d_gates)
    return d_from_mem, d_bias, d_from_u.view(heads, -1, head_dim, 2 * head_dim).sum(1)


def fused_write_scan(
    start: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    weights,
    segment_length: int,
    convex: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """start M_s [Hl, B, N, dh]; keys and values: the write projections of n segments as they come, [B, n * S, Hl * dh]
    (a slice of a row's tokens is fine); weights: LM2Memory.write_weights(); convex: the write rule
    M' = g_f * M + (1 - g_f) * tanh(u) instead of the paper's (MemoryConfig.write_rule). Returns the states
    M_s..M_{s+n} [Hl, B, n + 1, N, dh] and every write's gates [n, Hl, B, N, 2dh] (input gate, computed even where
    the convex rule leaves it unused, then forget gate; not differentiable: for the probes)."""
    return _WriteScan.apply(start, keys, values, *weights, segment_length, bool(convex))


class _ReadAttention(torch.autograd.Function):
    """The read after the projection of the memory's keys and values: attention of each segment's tokens over its
    slots, then the output gate."""

    @staticmethod
    def forward(ctx, q_tokens, kv, gate_weight, gate_bias, rows, segment_length):
        """kv [Hl, B*k, N, 2dh]; the rest as fused_read's."""
        heads, row_segments, slots, head_dim = kv.shape[0], kv.shape[1], kv.shape[2], kv.shape[3] // 2
        units, segments = heads * row_segments, row_segments // rows
        q_tokens, gate_weight, gate_bias = _last_contiguous(q_tokens), gate_weight.contiguous(), gate_bias.contiguous()
        out = q_tokens.new_empty(rows, segments * segment_length, heads * head_dim)
        gates, r = (kv.new_empty(heads, row_segments, segment_length, head_dim) for _ in range(2))
        lse = kv.new_empty(units, segment_length, dtype=torch.float32)
        tiles = _options(slots, segment_length, head_dim, kv.dtype)
        _kernels()._read_forward[(units, -(-segment_length // tiles["BLOCK_S"]))](
            q_tokens,
            kv,
            gate_weight,
            gate_bias,
            out,
            gates,
            r,
            lse,
            row_segments,
            segments,
            slots,
            segment_length,
            *q_tokens.stride()[:2],
            *out.stride()[:2],
            **tiles,
        )
        ctx.save_for_backward(q_tokens, kv, gate_weight, gates, r, lse)
        ctx.rows = rows
        ctx.mark_non_differentiable(gates)
        return out, gates

    @staticmethod
    def backward(ctx, d_out, _d_gates):
        q_tokens, kv, gate_weight, gates, r, lse = ctx.saved_tensors
        heads, row_segments, segment_length, head_dim = r.shape
        units, slots, segments = heads * row_segments, kv.shape[2], row_segments // ctx.rows
        d_out = _last_contiguous(d_out)
        d_q = q_tokens.new_empty(q_tokens.shape)
        d_z, d_r = (r.new_empty(r.shape, dtype=torch.float32) for _ in range(2))
        delta = r.new_empty(units, segment_length, dtype=torch.float32)
        tiles = _options(slots, segment_length, head_dim, kv.dtype)
        sizes = (row_segments, segments, slots, segment_length, *q_tokens.stride()[:2])
        _kernels()._read_query_backward[(units, -(-segment_length // tiles["BLOCK_S"]))](
            q_tokens,
            kv,
            gate_weight,
            gates,
            r,
            lse,
            d_out,
            d_q,
            d_z,
            d_r,
            delta,
            *sizes,
            *d_out.stride()[:2],
            *d_q.stride()[:2],
            **tiles,
        )
        d_kv = torch.empty_like(kv)
        _kernels()._read_memory_backward[(units, -(-slots // tiles["BLOCK_N"]))](
            q_tokens, kv, lse, d_r, delta, d_kv, *sizes, **tiles
        )
        # The gate's weights: sums over every token of r^T dZ and dZ, one batched matmul over heads, in fp32.
        d_gate_weight = torch.bmm(r.view(heads, -1, head_dim).float().transpose(1, 2), d_z.view(heads, -1, head_dim))
        d_gate_bias = d_z.sum((1, 2))
        return d_q, d_kv, d_gate_weight.to(kv.dtype), d_gate_bias.to(kv.dtype), None, None


def fused_read(
    q_tokens: torch.Tensor,
    states: torch.Tensor,
    kv_weight: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    segment_length: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q_tokens: the read queries [B, k*S, Hl*dh] as the projection gives them; states: every segment's memory
    [Hl, B, k, N, dh]; kv_weight [Hl, dh, 2dh] (the scaled key weight, then the value weight); gate_weight
    [Hl, dh, dh] and gate_bias [Hl, dh]: the output gate. Returns the gated read [B, k*S, Hl*dh], token-major for
    the output projection, and the output gate [Hl, B*k, S, dh] (not differentiable: for the probe).

    The memory's keys and values are one batched matmul in torch (autograd differentiates it): inside the kernel
    every token tile would recompute them for all N slots, dh / BLOCK_S times the attention's own work."""
    heads, rows, segments, slots, head_dim = states.shape
    kv = torch.bmm(states.reshape(heads, -1, head_dim), kv_weight).view(heads, rows * segments, slots, 2 * head_dim)
    return _ReadAttention.apply(q_tokens, kv, gate_weight, gate_bias, rows, segment_length)
