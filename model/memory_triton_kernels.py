"""The LM2 memory's write scan and read as Triton kernels, forward and backward; memory_triton.py launches them.

The math is memory_kernels.c's (see its header); the tiling is for a GPU at the paper's sizes (N = 2048 slots,
dh = 128, S = 2048-token segments), where neither a unit's [N, S] attention nor its [N, dh] state fits one program:
- write: a program owns a block of BLOCK_N slots of one (head, row) unit and scans the segments with its block of
  M in registers. A slot's update reads only its own row of M (the head-local weights act on rows), so slot blocks
  never exchange anything. Each segment's keys and values stream through in tiles of BLOCK_S tokens with an online
  softmax: flash attention with the slots as queries. It saves q, u and the softmax's log-sum-exp, not the [N, S]
  probabilities, which backward recomputes. The write rule is a compile-time constant, CONVEX (each rule compiles
  separately): the paper's M' = g_in * tanh(u) + g_f * M, or M' = g_f * M + (1 - g_f) * tanh(u), where the input
  gate is computed and stored for the probes but unused.
- write backward, two kernels: the chain kernel runs the segments in reverse per slot block, as the forward did
  (the gradients of the states, and of each write's q and gates; with CONVEX the input gate's is exactly 0); then
  the token kernel gives every tile of a segment's tokens its key and value gradients, looping over the slot tiles
  (it only sees d_u, so it is the same for both rules).
- read: flash attention of a segment's tokens over the slots of M_s (its keys and values projected by the caller),
  fused with the output gate; backward in two kernels the same way (token tiles: dq; slot tiles: dk, dv).
Every output element is written by exactly one program, so there are no atomics and the same inputs give the same
bits; the weights' gradients (sums over units, segments and slots) are left to batched matmuls in torch.

Products accumulate in fp32. Operands go to tl.dot in the inputs' dtype (bf16: tensor cores) and every tensor that
is saved for backward or read by the next segment is rounded to that dtype first, so backward differentiates the
function forward computed. Sizes need not be powers of two: tiles are padded and masked (loads give 0, padded
tokens and slots get probability 0). The head width is a compile-time constant (one compilation per width): its
masks and strides then fold away, which cut the register spills of the dh = 128 bf16 kernels from kilobytes per
thread to at most a few hundred bytes (ptxas for sm_90).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

INTERPRETED = bool(knobs.runtime.interpret)  # read once: @triton.jit decides at decoration, below
_INTERPRETED = tl.constexpr(INTERPRETED)


@triton.jit
def _round(x, dtype: tl.constexpr):
    """x in dtype, rounded to nearest even as the GPU's conversion does. The interpreter truncates fp32 to bf16:
    there the bits are rounded first, so that its bf16 results err as the GPU's do, not twice as much."""
    if _INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _mm(a, b, OPERAND: tl.constexpr, PRECISION: tl.constexpr):
    """a [M, K] @ b [K, N] accumulated in fp32, both operands rounded to OPERAND (the inputs' dtype)."""
    a = _round(a, OPERAND)
    b = _round(b, OPERAND)
    if _INTERPRETED:  # the interpreter multiplies bf16 as raw 16-bit integers: take the same products in fp32
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _square(base, column, ld, d, d_ok, TRANSPOSED: tl.constexpr):
    """The [dh, dh] block at `column` of a row-major weight with rows ld apart (or its transpose: loaded by rows,
    transposed on its way to tl.dot), zero-padded to [BLOCK_D, BLOCK_D]."""
    block = tl.load(base + d[:, None] * ld + column + d[None, :], mask=d_ok[:, None] & d_ok[None, :], other=0.0)
    if TRANSPOSED:
        block = tl.trans(block)
    return block


@triton.jit
def _rows(base, index, ld, d, ok):
    """Rows `index` of a matrix with rows ld apart, columns d; masked-out elements 0. In the tensor's dtype: tl.dot
    takes bf16 as it is, and the callers convert what they compute with to fp32."""
    return tl.load(base + index[:, None] * ld + d[None, :], mask=ok, other=0.0)


@triton.jit
def _write_forward(
    keys,
    values,
    from_mem,
    bias,
    from_u,
    states,
    q_out,
    u_out,
    gates,
    lse_out,
    rows,
    segments,
    slots,
    seg_len,
    key_row,
    key_token,
    value_row,
    value_token,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    CONVEX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (heads * rows, slot blocks). states [HB, n + 1, N, dh] holds M_0 on entry; fills M_1..M_n, q and u
    [HB, n, N, dh], gates [n, HB, N, 2dh] and the log-sum-exp [HB, n, N] (fp32). CONVEX: the write rule
    M' = g_f * M + (1 - g_f) * tanh(u); the input gate is still computed and stored (for the probes), unused."""
    unit, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    head, row, units = unit // rows, unit % rows, tl.num_programs(0)
    dtype = states.dtype.element_ty
    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    n_ok, d_ok = n < slots, d < HEAD_DIM
    tile_ok = n_ok[:, None] & d_ok[None, :]
    state, wide = slots * HEAD_DIM, 3 * HEAD_DIM
    w_mem, w_u = from_mem + head * HEAD_DIM * wide, from_u + head * HEAD_DIM * 2 * HEAD_DIM
    b = bias + head * wide
    m = _rows(states + unit * (segments + 1) * state, n, HEAD_DIM, d, tile_ok)  # in dtype: as stored, fewer registers
    for s in range(0, segments):
        at = (unit * segments + s) * state  # of this segment's q and u
        q = _mm(m, _square(w_mem, 0, wide, d, d_ok, False), dtype, PRECISION)
        q = _round(q + tl.load(b + d, mask=d_ok, other=0.0)[None, :], dtype)
        tl.store(q_out + at + n[:, None] * HEAD_DIM + d[None, :], q, mask=tile_ok)
        top = tl.full([BLOCK_N], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_N], tl.float32)
        u = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        first = s * seg_len
        k_base, v_base = keys + row * key_row + head * HEAD_DIM, values + row * value_row + head * HEAD_DIM
        for t0 in range(0, seg_len, BLOCK_S):
            t = t0 + tl.arange(0, BLOCK_S)
            t_ok = t < seg_len
            k = _rows(k_base, first + t, key_token, d, t_ok[:, None] & d_ok[None, :])
            v = _rows(v_base, first + t, value_token, d, t_ok[:, None] & d_ok[None, :])
            scores = tl.where(t_ok[None, :], _mm(q, tl.trans(k), dtype, PRECISION), float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, 1))
            rescale = tl.exp(top - new_top)
            p = tl.exp(scores - new_top[:, None])
            total = total * rescale + tl.sum(p, 1)
            u = u * rescale[:, None] + _mm(p, v, dtype, PRECISION)
            top = new_top
        u = _round(u / total[:, None], dtype)
        tl.store(u_out + at + n[:, None] * HEAD_DIM + d[None, :], u, mask=tile_ok)
        tl.store(lse_out + (unit * segments + s) * slots + n, top + tl.log(total), mask=n_ok)
        # One gate at a time, each folded into the update at once: fewer [BLOCK_N, dh] fp32 tiles live together.
        g_at = gates + (s * units + unit) * 2 * state + n[:, None] * 2 * HEAD_DIM + d[None, :]
        z = _mm(m, _square(w_mem, HEAD_DIM, wide, d, d_ok, False), dtype, PRECISION)
        z += _mm(u, _square(w_u, 0, 2 * HEAD_DIM, d, d_ok, False), dtype, PRECISION)
        g = tl.sigmoid(z + tl.load(b + HEAD_DIM + d, mask=d_ok, other=0.0)[None, :])
        tl.store(g_at, _round(g, dtype), mask=tile_ok)
        if CONVEX:  # the update is tanh(u) alone, weighed by 1 - g_f below
            update = _tanh(u.to(tl.float32))
        else:
            update = g * _tanh(u.to(tl.float32))
        z = _mm(m, _square(w_mem, 2 * HEAD_DIM, wide, d, d_ok, False), dtype, PRECISION)
        z += _mm(u, _square(w_u, HEAD_DIM, 2 * HEAD_DIM, d, d_ok, False), dtype, PRECISION)
        g = tl.sigmoid(z + tl.load(b + 2 * HEAD_DIM + d, mask=d_ok, other=0.0)[None, :])
        tl.store(g_at + HEAD_DIM, _round(g, dtype), mask=tile_ok)
        if CONVEX:
            m = _round((1.0 - g) * update + g * m.to(tl.float32), dtype)
        else:
            m = _round(update + g * m.to(tl.float32), dtype)
        tl.store(states + (unit * (segments + 1) + s + 1) * state + n[:, None] * HEAD_DIM + d[None, :], m, mask=tile_ok)


@triton.jit
def _write_chain_backward(
    keys,
    values,
    from_mem,
    from_u,
    states,
    q_in,
    u_in,
    gates,
    lse_in,
    d_states,
    d_start,
    d_a,
    d_u,
    delta_out,
    rows,
    segments,
    slots,
    seg_len,
    key_row,
    key_token,
    value_row,
    value_token,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    CONVEX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (heads * rows, slot blocks), segments in reverse. d_states [HB, n + 1, N, dh]: every state's gradient
    from outside the scan (the reads); the chain's own is carried in registers from each write to the state it
    read. Fills d_start [HB, N, dh]; per segment, for the token kernel and the weights' gradients (all fp32):
    d_a [HB, n, N, 3dh] (the gradients of q and of the gates' pre-activations), d_u [HB, n, N, dh] and
    delta = rowsum(d_u * u) [HB, n, N], the softmax backward's correction. CONVEX: the rule
    M' = g_f * M + (1 - g_f) * tanh(u), whose gradient reaches M through g_f, tanh(u) through 1 - g_f and g_f
    through M - tanh(u); the unused input gate's pre-activation gets exactly 0."""
    unit, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    head, row, units = unit // rows, unit % rows, tl.num_programs(0)
    dtype = states.dtype.element_ty
    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    n_ok, d_ok = n < slots, d < HEAD_DIM
    tile_ok = n_ok[:, None] & d_ok[None, :]
    state, wide = slots * HEAD_DIM, 3 * HEAD_DIM
    w_mem, w_u = from_mem + head * HEAD_DIM * wide, from_u + head * HEAD_DIM * 2 * HEAD_DIM
    k_base, v_base = keys + row * key_row + head * HEAD_DIM, values + row * value_row + head * HEAD_DIM
    carry = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for j in range(0, segments):
        s = segments - 1 - j
        at = (unit * segments + s) * state  # of this segment's q, u and d_u
        a_at = d_a + (unit * segments + s) * 3 * state + n[:, None] * wide + d[None, :]
        d_next = _rows(d_states + (unit * (segments + 1) + s + 1) * state, n, HEAD_DIM, d, tile_ok).to(tl.float32)
        d_next += carry
        g_at = gates + (s * units + unit) * 2 * state
        if CONVEX:  # no input gate: its dZ is 0, and so are its products with the weights, left out
            u = _rows(u_in + at, n, HEAD_DIM, d, tile_ok).to(tl.float32)
            squashed = _tanh(u)
            g_f = _rows(g_at + HEAD_DIM, n, 2 * HEAD_DIM, d, tile_ok).to(tl.float32)
            du = d_next * (1.0 - g_f) * (1.0 - squashed * squashed)
            dm = d_next * g_f
            m = _rows(states + (unit * (segments + 1) + s) * state, n, HEAD_DIM, d, tile_ok).to(tl.float32)
            dz_f = d_next * (m - squashed) * g_f * (1.0 - g_f)
            tl.store(a_at + HEAD_DIM, tl.zeros([BLOCK_N, BLOCK_D], tl.float32), mask=tile_ok)
            tl.store(a_at + 2 * HEAD_DIM, dz_f, mask=tile_ok)
            du += _mm(dz_f, _square(w_u, HEAD_DIM, 2 * HEAD_DIM, d, d_ok, True), dtype, PRECISION)
            dm += _mm(dz_f, _square(w_mem, 2 * HEAD_DIM, wide, d, d_ok, True), dtype, PRECISION)
        else:
            g_in = _rows(g_at, n, 2 * HEAD_DIM, d, tile_ok).to(tl.float32)
            u = _rows(u_in + at, n, HEAD_DIM, d, tile_ok).to(tl.float32)
            squashed = _tanh(u)
            du = d_next * g_in * (1.0 - squashed * squashed)
            dz_in = d_next * squashed * g_in * (1.0 - g_in)
            g_f = _rows(g_at + HEAD_DIM, n, 2 * HEAD_DIM, d, tile_ok).to(tl.float32)
            dm = d_next * g_f
            m = _rows(states + (unit * (segments + 1) + s) * state, n, HEAD_DIM, d, tile_ok).to(tl.float32)
            dz_f = d_next * m * g_f * (1.0 - g_f)
            tl.store(a_at + HEAD_DIM, dz_in, mask=tile_ok)
            tl.store(a_at + 2 * HEAD_DIM, dz_f, mask=tile_ok)
            du += _mm(dz_in, _square(w_u, 0, 2 * HEAD_DIM, d, d_ok, True), dtype, PRECISION)
            du += _mm(dz_f, _square(w_u, HEAD_DIM, 2 * HEAD_DIM, d, d_ok, True), dtype, PRECISION)
            dm += _mm(dz_in, _square(w_mem, HEAD_DIM, wide, d, d_ok, True), dtype, PRECISION)
            dm += _mm(dz_f, _square(w_mem, 2 * HEAD_DIM, wide, d, d_ok, True), dtype, PRECISION)
        delta = tl.sum(du * u, 1)
        tl.store(d_u + at + n[:, None] * HEAD_DIM + d[None, :], du, mask=tile_ok)
        tl.store(delta_out + (unit * segments + s) * slots + n, delta, mask=n_ok)
        q = _rows(q_in + at, n, HEAD_DIM, d, tile_ok)
        lse = tl.load(lse_in + (unit * segments + s) * slots + n, mask=n_ok, other=0.0)
        dq = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        first = s * seg_len
        for t0 in range(0, seg_len, BLOCK_S):
            t = t0 + tl.arange(0, BLOCK_S)
            t_ok = t < seg_len
            k = _rows(k_base, first + t, key_token, d, t_ok[:, None] & d_ok[None, :])
            v = _rows(v_base, first + t, value_token, d, t_ok[:, None] & d_ok[None, :])
            p = tl.where(t_ok[None, :], tl.exp(_mm(q, tl.trans(k), dtype, PRECISION) - lse[:, None]), 0.0)
            d_scores = p * (_mm(du, tl.trans(v), dtype, PRECISION) - delta[:, None])
            dq += _mm(d_scores, k, dtype, PRECISION)
        tl.store(a_at, dq, mask=tile_ok)
        carry = dm + _mm(dq, _square(w_mem, 0, wide, d, d_ok, True), dtype, PRECISION)
    first_state = _rows(d_states + unit * (segments + 1) * state, n, HEAD_DIM, d, tile_ok).to(tl.float32)
    tl.store(
        d_start + unit * state + n[:, None] * HEAD_DIM + d[None, :], _round(first_state + carry, dtype), mask=tile_ok
    )


@triton.jit
def _write_token_backward(
    keys,
    values,
    q_in,
    d_u,
    lse_in,
    delta_in,
    d_keys,
    d_values,
    rows,
    segments,
    slots,
    seg_len,
    key_row,
    key_token,
    value_row,
    value_token,
    grad_row,
    grad_token,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (heads * rows, segments, token tiles): the gradients of one tile of a segment's keys and values, summed
    over the slots in a loop. d_keys and d_values [rows, n * S, H * dh], rows grad_row apart."""
    unit, s, tile = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    head, row = unit // rows, unit % rows
    dtype = q_in.dtype.element_ty
    t = tile * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    t_ok, d_ok = t < seg_len, d < HEAD_DIM
    tokens_ok = t_ok[:, None] & d_ok[None, :]
    first, at = s * seg_len, (unit * segments + s) * slots
    k = _rows(keys + row * key_row + head * HEAD_DIM, first + t, key_token, d, tokens_ok)
    v = _rows(values + row * value_row + head * HEAD_DIM, first + t, value_token, d, tokens_ok)
    dk = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    for n0 in range(0, slots, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < slots
        slots_ok = n_ok[:, None] & d_ok[None, :]
        q = _rows(q_in + at * HEAD_DIM, n, HEAD_DIM, d, slots_ok)
        du = _rows(d_u + at * HEAD_DIM, n, HEAD_DIM, d, slots_ok)
        lse = tl.load(lse_in + at + n, mask=n_ok, other=0.0)
        delta = tl.load(delta_in + at + n, mask=n_ok, other=0.0)
        p = tl.where(n_ok[None, :], tl.exp(_mm(k, tl.trans(q), dtype, PRECISION) - lse[None, :]), 0.0)  # [S, N]
        dv += _mm(p, du, dtype, PRECISION)
        dk += _mm(p * (_mm(v, tl.trans(du), dtype, PRECISION) - delta[None, :]), q, dtype, PRECISION)
    out = row * grad_row + (first + t[:, None]) * grad_token + head * HEAD_DIM + d[None, :]
    tl.store(d_keys + out, _round(dk, dtype), mask=tokens_ok)
    tl.store(d_values + out, _round(dv, dtype), mask=tokens_ok)


@triton.jit
def _read_forward(
    q_tokens,
    kv,
    gate_weight,
    gate_bias,
    out,
    gates,
    r_out,
    lse_out,
    row_segments,
    segments,
    slots,
    seg_len,
    q_row,
    q_token,
    out_row,
    out_token,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (heads * rows * k, token tiles); unit = head * (rows * k) + row * k + segment. The tokens of a segment
    read kv [units, N, 2dh] (keys, scaled, then values) of their M_s; out [rows, k * S, H * dh] token-major, rows
    out_row apart; fills gates and r [units, S, dh] and the log-sum-exp [units, S] (fp32)."""
    unit, tile = tl.program_id(0).to(tl.int64), tl.program_id(1)
    head, row, segment = unit // row_segments, unit % row_segments // segments, unit % segments
    dtype = kv.dtype.element_ty
    t = tile * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    t_ok, d_ok = t < seg_len, d < HEAD_DIM
    tokens_ok = t_ok[:, None] & d_ok[None, :]
    token = segment * seg_len + t
    q = _rows(q_tokens + row * q_row + head * HEAD_DIM, token, q_token, d, tokens_ok)
    memory = kv + unit * slots * 2 * HEAD_DIM
    top = tl.full([BLOCK_S], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_S], tl.float32)
    r = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    for n0 in range(0, slots, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < slots
        k = _rows(memory, n, 2 * HEAD_DIM, d, n_ok[:, None] & d_ok[None, :])
        v = _rows(memory + HEAD_DIM, n, 2 * HEAD_DIM, d, n_ok[:, None] & d_ok[None, :])
        scores = tl.where(n_ok[None, :], _mm(q, tl.trans(k), dtype, PRECISION), float("-inf"))
        new_top = tl.maximum(top, tl.max(scores, 1))
        rescale = tl.exp(top - new_top)
        p = tl.exp(scores - new_top[:, None])
        total = total * rescale + tl.sum(p, 1)
        r = r * rescale[:, None] + _mm(p, v, dtype, PRECISION)
        top = new_top
    r = _round(r / total[:, None], dtype)
    mine = (unit * seg_len + t[:, None]) * HEAD_DIM + d[None, :]
    tl.store(r_out + mine, r, mask=tokens_ok)
    tl.store(lse_out + unit * seg_len + t, top + tl.log(total), mask=t_ok)
    r = r.to(tl.float32)
    z = _mm(r, _square(gate_weight + head * HEAD_DIM * HEAD_DIM, 0, HEAD_DIM, d, d_ok, False), dtype, PRECISION)
    gate = tl.sigmoid(z + tl.load(gate_bias + head * HEAD_DIM + d, mask=d_ok, other=0.0)[None, :])
    tl.store(gates + mine, _round(gate, dtype), mask=tokens_ok)
    tl.store(
        out + row * out_row + token[:, None] * out_token + head * HEAD_DIM + d[None, :],
        _round(gate * r, dtype),
        mask=tokens_ok,
    )


@triton.jit
def _read_query_backward(
    q_tokens,
    kv,
    gate_weight,
    gates,
    r_in,
    lse_in,
    d_out,
    d_q,
    d_z,
    d_r,
    delta_out,
    row_segments,
    segments,
    slots,
    seg_len,
    q_row,
    q_token,
    d_out_row,
    d_out_token,
    d_q_row,
    d_q_token,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid as _read_forward's: the gradient of a token tile's queries, over the slots in a loop. Fills, for the
    memory kernel and the gate's weights (fp32), d_z (the gate's pre-activation) and d_r [units, S, dh] and
    delta = rowsum(d_r * r) [units, S]."""
    unit, tile = tl.program_id(0).to(tl.int64), tl.program_id(1)
    head, row, segment = unit // row_segments, unit % row_segments // segments, unit % segments
    dtype = kv.dtype.element_ty
    t = tile * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    t_ok, d_ok = t < seg_len, d < HEAD_DIM
    tokens_ok = t_ok[:, None] & d_ok[None, :]
    token = segment * seg_len + t
    mine = (unit * seg_len + t[:, None]) * HEAD_DIM + d[None, :]
    d_gated = _rows(d_out + row * d_out_row + head * HEAD_DIM, token, d_out_token, d, tokens_ok).to(tl.float32)
    gate = tl.load(gates + mine, mask=tokens_ok, other=0.0).to(tl.float32)
    r = tl.load(r_in + mine, mask=tokens_ok, other=0.0).to(tl.float32)
    dz = d_gated * r * gate * (1.0 - gate)
    dr = d_gated * gate + _mm(
        dz, _square(gate_weight + head * HEAD_DIM * HEAD_DIM, 0, HEAD_DIM, d, d_ok, True), dtype, PRECISION
    )
    delta = tl.sum(dr * r, 1)
    tl.store(d_z + mine, dz, mask=tokens_ok)
    tl.store(d_r + mine, dr, mask=tokens_ok)
    tl.store(delta_out + unit * seg_len + t, delta, mask=t_ok)
    q = _rows(q_tokens + row * q_row + head * HEAD_DIM, token, q_token, d, tokens_ok)
    lse = tl.load(lse_in + unit * seg_len + t, mask=t_ok, other=0.0)
    memory = kv + unit * slots * 2 * HEAD_DIM
    dq = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    for n0 in range(0, slots, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < slots
        k = _rows(memory, n, 2 * HEAD_DIM, d, n_ok[:, None] & d_ok[None, :])
        v = _rows(memory + HEAD_DIM, n, 2 * HEAD_DIM, d, n_ok[:, None] & d_ok[None, :])
        p = tl.where(n_ok[None, :], tl.exp(_mm(q, tl.trans(k), dtype, PRECISION) - lse[:, None]), 0.0)
        dq += _mm(p * (_mm(dr, tl.trans(v), dtype, PRECISION) - delta[:, None]), k, dtype, PRECISION)
    tl.store(
        d_q + row * d_q_row + token[:, None] * d_q_token + head * HEAD_DIM + d[None, :],
        _round(dq, dtype),
        mask=tokens_ok,
    )


@triton.jit
def _read_memory_backward(
    q_tokens,
    kv,
    lse_in,
    d_r,
    delta_in,
    d_kv,
    row_segments,
    segments,
    slots,
    seg_len,
    q_row,
    q_token,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (units, slot blocks): the gradient of a slot block's keys and values, d_kv [units, N, 2dh], over the
    segment's tokens in a loop."""
    unit, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    head, row, segment = unit // row_segments, unit % row_segments // segments, unit % segments
    dtype = kv.dtype.element_ty
    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    n_ok, d_ok = n < slots, d < HEAD_DIM
    slots_ok = n_ok[:, None] & d_ok[None, :]
    memory = unit * slots * 2 * HEAD_DIM + n[:, None] * 2 * HEAD_DIM + d[None, :]
    k = tl.load(kv + memory, mask=slots_ok, other=0.0)
    v = tl.load(kv + memory + HEAD_DIM, mask=slots_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for t0 in range(0, seg_len, BLOCK_S):
        t = t0 + tl.arange(0, BLOCK_S)
        t_ok = t < seg_len
        tokens_ok = t_ok[:, None] & d_ok[None, :]
        q = _rows(q_tokens + row * q_row + head * HEAD_DIM, segment * seg_len + t, q_token, d, tokens_ok)
        dr = _rows(d_r + unit * seg_len * HEAD_DIM, t, HEAD_DIM, d, tokens_ok)
        lse = tl.load(lse_in + unit * seg_len + t, mask=t_ok, other=0.0)
        delta = tl.load(delta_in + unit * seg_len + t, mask=t_ok, other=0.0)
        p = tl.where(t_ok[None, :], tl.exp(_mm(k, tl.trans(q), dtype, PRECISION) - lse[None, :]), 0.0)  # [N, S]
        dv += _mm(p, dr, dtype, PRECISION)
        dk += _mm(p * (_mm(v, tl.trans(dr), dtype, PRECISION) - delta[None, :]), q, dtype, PRECISION)
    tl.store(d_kv + memory, _round(dk, dtype), mask=slots_ok)
    tl.store(d_kv + memory + HEAD_DIM, _round(dv, dtype), mask=slots_ok)
