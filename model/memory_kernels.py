"""The memory's write scan and read as fused CPU kernels (memory_kernels.c), forward and backward.

`LM2Memory` runs them on CPU in fp32 (training and evaluation alike), and its own PyTorch operations elsewhere: on
GPU, in bf16, under torch.compile, or where no C compiler is found (memory_backend.py chooses). Both compute the
same function (tests/model/test_memory_kernels.py compares values, gradients and gates). Why: at CPU sizes a write
is some 40 PyTorch operations forward and backward on [4, 4, 16, 32] tensors, below torch's parallel grain, and
the read a dozen more plus two layout copies; together they cost more time than their FLOPs (bench/NOTES.md). The
kernels take the token projections in their own layout ([B, tokens, heads * dh]), so no head-first or
segment-major copy is made. They are compiled on first use with the system's `cc` into a folder only this user can
write (kernel_cache.py: ~/.cache/lm2; keyed by the source, flags and CPU), and link the OpenMP runtime torch has
already loaded, so they share torch's threads. Python passes each call's shape and tensors as ctypes structures that
mirror the C structs field by field.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import shutil
import subprocess
import uuid
import warnings
from pathlib import Path

import torch

from lm2.model import kernel_cache
from lm2.model.kernel_cache import is_private, this_cpu

_SOURCE = Path(__file__).with_name("memory_kernels.c")
_FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")


def _build(compiler: str, folder: Path) -> Path:
    """The library built from the source in `folder` (kernel_cache.folder(): this user's alone), reused when its key
    (source, flags, compiler, CPU features) matches and it is still this user's alone."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode() + version.encode() + this_cpu().encode())
    library = folder / f"memory_kernels-{key.hexdigest()[:16]}.so"
    if not is_private(library):
        # Ranks may build at once: each writes its own file and renames it into place (atomic).
        partial = library.with_name(f"{library.name}.{uuid.uuid4().hex}.tmp")
        subprocess.run(
            [compiler, *_FLAGS, "-o", str(partial), str(_SOURCE)], check=True, capture_output=True, text=True
        )
        partial.chmod(0o700)  # whatever the umask: only this user may change what lm2 loads
        partial.replace(library)
    return library


class Shape(ctypes.Structure):
    """The C `Shape`: sizes of a write scan, its write rule (convex: 1 for MemoryConfig.write_rule "convex"), the
    token row strides of keys/values and of their gradients."""

    _fields_ = [
        (name, ctypes.c_int)
        for name in ("heads", "rows", "segments", "slots", "head_dim", "seg_len", "threads", "convex")
    ]
    _fields_ += [("token_row", ctypes.c_long), ("grad_row", ctypes.c_long)]


class ReadShape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in ("heads", "row_segments", "slots", "head_dim", "seg_len", "threads")]


def _tensors(*names: str) -> type[ctypes.Structure]:
    """A ctypes mirror of a C struct of float pointers with these field names, in this order."""
    return type("Tensors", (ctypes.Structure,), {"_fields_": [(name, ctypes.c_void_p) for name in names]})


ScanForward = _tensors("start", "keys", "values", "wm", "bias", "wu", "states", "q", "probs", "u", "gates")
ScanBackward = _tensors(
    "keys",
    "values",
    "wm_t",
    "wu_t",
    "states",
    "q",
    "probs",
    "u",
    "gates",
    "d_states",
    "d_start",
    "d_keys",
    "d_values",
    "d_wm",
    "d_bias",
    "d_wu",
)
ReadForward = _tensors("q_tokens", "states", "wkv", "wg", "bg", "out", "kv", "probs", "r", "gates")
ReadBackward = _tensors(
    "q_tokens",
    "states",
    "wkv_t",
    "wg_t",
    "kv",
    "probs",
    "r",
    "gates",
    "d_out",
    "d_q",
    "d_states",
    "d_wkv",
    "d_wg",
    "d_bg",
)


@functools.cache
def _library() -> ctypes.CDLL | None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        warnings.warn(
            "lm2: no C compiler (cc) found; the memory's read and write run as PyTorch operations on CPU "
            "(slower). Install gcc to build the fused kernels.",
            stacklevel=3,
        )
        return None
    folder = kernel_cache.folder()
    if folder is None:
        warnings.warn(
            f"lm2: no folder only you can write for the fused memory kernels ({kernel_cache.user_cache()} is not "
            "yours alone and no private temporary folder could be made); the memory's read and write run as "
            "PyTorch operations on CPU (slower).",
            stacklevel=3,
        )
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler, folder)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(
            f"lm2: the fused memory kernels did not build ({detail.strip()[:300]}); the memory's read and "
            "write run as PyTorch operations on CPU (slower).",
            stacklevel=3,
        )
        return None
    for name, shape, tensors in (
        ("write_scan_forward", Shape, ScanForward),
        ("write_scan_backward", Shape, ScanBackward),
        ("read_forward", ReadShape, ReadForward),
        ("read_backward", ReadShape, ReadBackward),
    ):
        getattr(library, name).argtypes = [ctypes.POINTER(shape), ctypes.POINTER(tensors)]
        getattr(library, name).restype = ctypes.c_int
    return library


def _call(name: str, shape: ctypes.Structure, tensors: type[ctypes.Structure], **named: torch.Tensor) -> None:
    """Runs kernel `name` on the named tensors. `named` holds every one of them until the kernel returns: the memory
    of a temporary whose pointer alone was kept would be freed before the kernel read it."""
    pointers = tensors(**{field: named[field].data_ptr() for field, _ in tensors._fields_})
    if getattr(_library(), name)(ctypes.byref(shape), ctypes.byref(pointers)) != 0:
        raise MemoryError(f"the fused memory kernel {name} could not allocate its scratch memory")


def available() -> bool:
    """Whether the kernels are built (the first call builds them, or warns once why not)."""
    return _library() is not None


def _token_major(t: torch.Tensor) -> torch.Tensor:
    """A [B, tokens, width] projection as the kernel reads it: tokens `width` apart, rows any distance apart."""
    return t if t.stride(2) == 1 and t.stride(1) == t.shape[2] else t.contiguous()


class _WriteScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, start, keys, values, from_mem, bias, from_u, segment_length, convex):
        heads, rows, slots, head_dim = start.shape
        segments = keys.shape[1] // segment_length
        states = start.new_empty(heads, rows, segments + 1, slots, head_dim)
        q, u = (start.new_empty(segments, heads, rows, slots, head_dim) for _ in range(2))
        probs = start.new_empty(segments, heads, rows, slots, segment_length)
        gates = start.new_empty(segments, heads, rows, slots, 2 * head_dim)
        keys, values = _token_major(keys), _token_major(values)
        if keys.stride(0) != values.stride(0):
            keys, values = keys.contiguous(), values.contiguous()
        # Gradients of keys and values come out contiguous: rows are segments * S tokens apart.
        shape = Shape(
            heads=heads,
            rows=rows,
            segments=segments,
            slots=slots,
            head_dim=head_dim,
            seg_len=segment_length,
            threads=torch.get_num_threads(),
            convex=int(convex),
            token_row=keys.stride(0),
            grad_row=keys.shape[1] * keys.shape[2],
        )
        start, from_mem, bias, from_u = (t.contiguous() for t in (start, from_mem, bias, from_u))
        _call(
            "write_scan_forward",
            shape,
            ScanForward,
            start=start,
            keys=keys,
            values=values,
            wm=from_mem,
            bias=bias,
            wu=from_u,
            states=states,
            q=q,
            probs=probs,
            u=u,
            gates=gates,
        )
        ctx.shape = shape
        ctx.save_for_backward(keys, values, from_mem, from_u, states, q, probs, u, gates)
        ctx.mark_non_differentiable(gates)
        return states, gates

    @staticmethod
    def backward(ctx, d_states, _d_gates):
        keys, values, from_mem, from_u, states, q, probs, u, gates = ctx.saved_tensors
        heads, rows, head_dim = ctx.shape.heads, ctx.shape.rows, ctx.shape.head_dim
        d_start = states.new_empty(heads, rows, ctx.shape.slots, head_dim)
        d_keys, d_values = (states.new_empty(keys.shape) for _ in range(2))
        # Weight gradients per (head, row), summed over rows below: no two threads write the same memory.
        d_from_mem = states.new_empty(heads, rows, *from_mem.shape[1:])
        d_bias = states.new_empty(heads, rows, 3 * head_dim)
        d_from_u = states.new_empty(heads, rows, *from_u.shape[1:])
        wm_t, wu_t = (w.transpose(1, 2).contiguous() for w in (from_mem, from_u))
        _call(
            "write_scan_backward",
            ctx.shape,
            ScanBackward,
            keys=keys,
            values=values,
            wm_t=wm_t,
            wu_t=wu_t,
            states=states,
            q=q,
            probs=probs,
            u=u,
            gates=gates,
            d_states=d_states.contiguous(),
            d_start=d_start,
            d_keys=d_keys,
            d_values=d_values,
            d_wm=d_from_mem,
            d_bias=d_bias,
            d_wu=d_from_u,
        )
        return (
            d_start,
            d_keys,
            d_values,
            d_from_mem.sum(1),
            d_bias.sum(1, keepdim=True),
            d_from_u.sum(1),
            None,
            None,
        )


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
    return _WriteScan.apply(start, keys, values, *weights, segment_length, convex)


class _Read(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_tokens, states, kv_weight, gate_weight, gate_bias, segment_length):
        q_tokens, states = q_tokens.contiguous(), states.contiguous()
        heads, rows, segments, slots, head_dim = states.shape
        units = (heads, rows * segments)
        out = torch.empty_like(q_tokens)
        kv = states.new_empty(*units, slots, 2 * head_dim)
        probs = states.new_empty(*units, segment_length, slots)
        r, gates = (states.new_empty(*units, segment_length, head_dim) for _ in range(2))
        shape = ReadShape(
            heads=heads,
            row_segments=rows * segments,
            slots=slots,
            head_dim=head_dim,
            seg_len=segment_length,
            threads=torch.get_num_threads(),
        )
        kv_weight, gate_weight, gate_bias = (w.contiguous() for w in (kv_weight, gate_weight, gate_bias))
        _call(
            "read_forward",
            shape,
            ReadForward,
            q_tokens=q_tokens,
            states=states,
            wkv=kv_weight,
            wg=gate_weight,
            bg=gate_bias,
            out=out,
            kv=kv,
            probs=probs,
            r=r,
            gates=gates,
        )
        ctx.shape = shape
        ctx.save_for_backward(q_tokens, states, kv_weight, gate_weight, kv, probs, r, gates)
        ctx.mark_non_differentiable(gates)
        return out, gates

    @staticmethod
    def backward(ctx, d_out, _d_gates):
        q_tokens, states, kv_weight, gate_weight, kv, probs, r, gates = ctx.saved_tensors
        units = (ctx.shape.heads, ctx.shape.row_segments)
        d_q, d_states = torch.empty_like(q_tokens), torch.empty_like(states)
        d_kv_weight = states.new_empty(*units, *kv_weight.shape[1:])  # per unit, summed below
        d_gate_weight = states.new_empty(*units, *gate_weight.shape[1:])
        d_gate_bias = states.new_empty(*units, gate_weight.shape[-1])
        wkv_t, wg_t = (w.transpose(1, 2).contiguous() for w in (kv_weight, gate_weight))
        _call(
            "read_backward",
            ctx.shape,
            ReadBackward,
            q_tokens=q_tokens,
            states=states,
            wkv_t=wkv_t,
            wg_t=wg_t,
            kv=kv,
            probs=probs,
            r=r,
            gates=gates,
            d_out=d_out.contiguous(),
            d_q=d_q,
            d_states=d_states,
            d_wkv=d_kv_weight,
            d_wg=d_gate_weight,
            d_bg=d_gate_bias,
        )
        return d_q, d_states, d_kv_weight.sum(1), d_gate_weight.sum(1), d_gate_bias.sum(1), None


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
    the output projection, and the output gate [Hl, B*k, S, dh] (not differentiable: for the probe)."""
    return _Read.apply(q_tokens, states, kv_weight, gate_weight, gate_bias, segment_length)
