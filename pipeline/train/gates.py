"""Memory-gate metrics, observed from outside the model: forward hooks on each memory module's gate probes.

The model keeps nothing for logging; `GateMonitor.recording()` hooks in for the steps that are logged. What it
reports per memory layer is the mean input, forget and output gate of the latest row-level forward on this rank
(with activation checkpointing the recompute in backward gives the same values), averaged over every rank that
holds the layer: TP ranks hold different heads, DP ranks different rows, pipeline stages different layers.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from lm2.model.block import DecoderBlock

GATES = ("g_in", "g_forget", "g_out")


class GateMonitor:
    """Hooks on the memory modules of `module` (an LM2Model or this rank's pipeline stages).

    Args:
        module: the model the engine trains (``engine.deepspeed.module``).
        num_layers: blocks in the whole model (a pipeline stage holds only some).
        device: where the means are reduced (the engine's device).
    """

    def __init__(self, module: nn.Module, num_layers: int, device: torch.device):
        self.num_layers, self.device = num_layers, device
        self.memories = {
            block.layer_index: block.memory
            for block in module.modules()
            if isinstance(block, DecoderBlock) and block.memory is not None
        }
        self._latest: dict[int, dict[str, list[torch.Tensor]]] = {}
        self._running: int | None = None  # the layer whose row-level forward is running

    def _start(self, layer: int, module, args) -> None:
        self._running = layer
        self._latest[layer] = {gate: [] for gate in GATES}  # a new forward replaces the last one

    def _stop(self, module, args, output) -> None:
        self._running = None

    def _record(self, layer: int, gate: str, module, args, output: torch.Tensor) -> None:
        # Only inside the layer's row-level forward: incremental steps (generation) would grow without end.
        if self._running == layer:
            self._latest[layer][gate].append(output.detach().float().mean())  # stays on the device: no sync

    @contextlib.contextmanager
    def recording(self, enabled: bool = True):
        """Records gate means while open (nothing when not enabled); the hooks are removed on exit."""
        if not enabled:
            yield
            return
        handles = []
        for layer, memory in self.memories.items():
            handles.append(memory.register_forward_pre_hook(partial(self._start, layer)))
            handles.append(memory.register_forward_hook(self._stop))
            for gate, probe in zip(GATES, (memory.in_gate_probe, memory.forget_gate_probe, memory.out_gate_probe)):
                handles.append(probe.register_forward_hook(partial(self._record, layer, gate)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._running = None

    def means(self) -> torch.Tensor:
        """[num_layers, 3] (g_in, g_forget, g_out) on the device, averaged over the ranks holding each layer; NaN for
        layers without memory and for gates the last forward did not use (no write in a one-segment row).
        A collective over the whole world; no host sync."""
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
        table = torch.zeros(self.num_layers, 4, dtype=torch.float64, device=self.device)  # 3 sums and a count
        for layer, gates in self._latest.items():
            table[layer, :3] = torch.stack([torch.stack(v).mean().double() if v else nan for v in gates.values()])
            table[layer, 3] = 1
        dist.all_reduce(table)
        return table[:, :3] / table[:, 3:]  # 0/0 = NaN where no rank holds a memory layer
