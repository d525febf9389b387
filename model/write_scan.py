"""The memory's write scan as one fused CPU kernel: forward and backward of a window's segment writes in C.

`LM2Memory` scans with it on CPU in fp32 (training and evaluation alike), and with its own PyTorch writes elsewhere:
on GPU, in bf16, under torch.compile, or where no C compiler is found. Both compute the same function
(tests/model/test_write_scan.py compares values and gradients). Why: a tiny model's write is some 40 PyTorch
operations forward and backward on [4, 4, 16, 32] tensors, below torch's parallel grain, and cost about 9 % of a
CPU step (bench/README.md). The kernel is compiled on first use with the system's `cc` into ~/.cache/lm2 (keyed by
its source, flags and the CPU), and links the OpenMP runtime torch has already loaded, so it shares torch's threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import shutil
import subprocess
import tempfile
import uuid
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("write_scan.c")
_FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")
_INT, _PTR = ctypes.c_int, ctypes.c_void_p


def _cpu_key() -> bytes:
    cpuinfo = Path("/proc/cpuinfo")
    flags = [line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")] if cpuinfo.exists() else []
    return (flags[0] if flags else "").encode()


def _cache_dir() -> Path:
    for folder in (Path.home() / ".cache" / "lm2", Path(tempfile.gettempdir()) / "lm2-cache"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        except OSError:
            continue
    raise OSError("no writable cache folder for the write-scan kernel")


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode() + version.encode() + _cpu_key())
    library = _cache_dir() / f"write_scan-{key.hexdigest()[:16]}.so"
    if not library.exists():
        # Ranks may build at once: each writes its own file and renames it into place (atomic).
        partial = library.with_name(f"{library.name}.{uuid.uuid4().hex}.tmp")
        subprocess.run([compiler, *_FLAGS, "-o", str(partial), str(_SOURCE), "-lm"], check=True, capture_output=True,
                       text=True)
        partial.replace(library)
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        warnings.warn("lm2: no C compiler (cc) found; the memory write scan runs as PyTorch operations on CPU "
                      "(slower). Install gcc to build the fused kernel.", stacklevel=3)
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        warnings.warn(f"lm2: the fused write-scan kernel did not build ({detail.strip()[:300]}); the memory write "
                      "scan runs as PyTorch operations on CPU (slower).", stacklevel=3)
        return None
    library.write_scan_forward.argtypes = [_INT] * 7 + [_PTR] * 11
    library.write_scan_backward.argtypes = [_INT] * 7 + [_PTR] * 16
    return library


def applies(start: torch.Tensor) -> bool:
    """Whether the fused kernel runs for memory `start`: CPU fp32, eager, and the kernel built."""
    return (start.device.type == "cpu" and start.dtype == torch.float32 and not torch.compiler.is_compiling()
            and _library() is not None)


def _pointers(*tensors: torch.Tensor) -> list[int]:
    return [t.data_ptr() for t in tensors]


class _WriteScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, start, keys, values, from_mem, bias, from_u):
        heads, rows, slots, head_dim = start.shape
        segments, seg_len = keys.shape[0], keys.shape[-1]
        states = start.new_empty(heads, rows, segments + 1, slots, head_dim)
        q, u = (start.new_empty(segments, heads, rows, slots, head_dim) for _ in range(2))
        probs = start.new_empty(segments, heads, rows, slots, seg_len)
        gates = start.new_empty(segments, heads, rows, slots, 2 * head_dim)
        shape = (heads, rows, segments, slots, head_dim, seg_len, torch.get_num_threads())
        inputs = [t.contiguous() for t in (start, keys, values, from_mem, bias, from_u)]
        _library().write_scan_forward(*shape, *_pointers(*inputs, states, q, probs, u, gates))
        ctx.shape = shape
        ctx.save_for_backward(inputs[1], inputs[2], inputs[3], inputs[5], states, q, probs, u, gates)
        ctx.mark_non_differentiable(gates)
        return states, gates

    @staticmethod
    def backward(ctx, d_states, _d_gates):
        keys, values, from_mem, from_u, states, q, probs, u, gates = ctx.saved_tensors
        heads, rows, _, slots, head_dim, _, _ = ctx.shape
        d_start = states.new_empty(heads, rows, slots, head_dim)
        d_keys, d_values = torch.empty_like(keys), torch.empty_like(values)
        # Weight gradients per (head, row), summed over rows below: no two threads write the same memory.
        d_from_mem = states.new_empty(heads, rows, *from_mem.shape[1:])
        d_bias = states.new_empty(heads, rows, 3 * head_dim)
        d_from_u = states.new_empty(heads, rows, *from_u.shape[1:])
        # Every tensor the kernel reads is held by a name until it returns: a temporary's memory would be freed as
        # soon as its pointer was taken.
        transposed = [w.transpose(1, 2).contiguous() for w in (from_mem, from_u)]
        d_states = d_states.contiguous()
        _library().write_scan_backward(*ctx.shape, *_pointers(keys, values, *transposed, states, q, probs, u, gates,
                                                               d_states, d_start, d_keys, d_values, d_from_mem,
                                                               d_bias, d_from_u))
        return d_start, d_keys, d_values, d_from_mem.sum(1), d_bias.sum(1, keepdim=True), d_from_u.sum(1)


def fused_scan(start: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """start M_s [Hl, B, N, dh]; keys [n, Hl, B, dh, S] (stored transposed); values [n, Hl, B, S, dh]; weights:
    LM2Memory.write_weights(). Returns the states M_s..M_{s+n} [Hl, B, n + 1, N, dh] and every write's gates
    [n, Hl, B, N, 2dh] (input gate, then forget gate; not differentiable: for the probes)."""
    return _WriteScan.apply(start, keys, values, *weights)
