"""Which implementation runs the memory's write scan and row-level read: the one place that chooses.

The module's PyTorch operations (model/memory.py) are the reference and run everywhere; the fused CPU kernels
(memory_kernels.py) replace them on CPU in fp32 when they are built, the Triton kernels (memory_triton.py) on CUDA
in fp32 and bf16. Under torch.compile the PyTorch operations run, since inductor fuses them itself and cannot trace
into a ctypes call or a hand-written kernel. Every backend has the same two functions, `fused_write_scan` and
`fused_read`, with the same arguments and results.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType
from typing import Literal

import torch

from lm2.model import memory_kernels, memory_triton

Choice = Literal["auto", "pytorch"]
_choice: Choice = "auto"


def fused_kernels(tensor: torch.Tensor) -> ModuleType | None:
    """The fused kernels that run for `tensor` (the memory or its token projections), or None for the module's
    PyTorch operations."""
    if _choice == "pytorch" or torch.compiler.is_compiling():
        return None
    if tensor.device.type == "cpu" and tensor.dtype == torch.float32 and memory_kernels.available():
        return memory_kernels
    if tensor.is_cuda and memory_triton.applies(tensor):
        return memory_triton
    return None


@contextlib.contextmanager
def choose(choice: Choice) -> Iterator[None]:
    """Within the block, "pytorch" runs the module's PyTorch operations everywhere; "auto" (the default) picks
    the fused kernels where they apply. For tests and benchmarks that compare the two."""
    global _choice
    previous, _choice = _choice, choice
    try:
        yield
    finally:
        _choice = previous
