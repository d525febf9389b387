"""What the benchmarks share: interleaved timing that survives background load, and byte counts.

Timings on a shared machine drift with other people's work; alternating the subjects within every round exposes
them to the same load, and the median of the per-round ratios ignores the rounds that a burst hit.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize() -> None:
    """Waits for the GPU's queued work (a GPU runs asynchronously: a timer must not stop before it finishes)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(subjects: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each subject in each round; the subjects alternate within a round."""
    for subject in subjects.values():
        for _ in range(warmup):
            subject()
    seconds: dict[str, list[float]] = {name: [] for name in subjects}
    for _ in range(rounds):
        for name, subject in subjects.items():
            synchronize()
            start = time.perf_counter()
            subject()
            synchronize()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of numerator/denominator (same-round pairs)."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def saved_activation_bytes(model: torch.nn.Module, forward_loss: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd keeps for backward during forward_loss() (each storage counted once), the model's own
    weights (saved by matmuls) left out: the activations."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = forward_loss()
    loss.backward()
    return sum(storages.values())


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Weights, gradients and optimizer state as allocated now."""
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)
