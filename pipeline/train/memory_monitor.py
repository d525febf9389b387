"""Memory metrics, observed from outside the model: forward hooks on each memory module's probes.

The model keeps nothing for logging; `MemoryMonitor.recording()` hooks in for the steps that are logged. What it
reports per memory layer, from the latest row-level forward on this rank (with activation checkpointing the
recompute in backward gives the same values):
- the mean input, forget and output gate, averaged over every rank that holds the layer (TP ranks hold different
  heads, DP ranks different rows, pipeline stages different layers);
- the memory's health: the mean and the largest norm of a memory slot (over all its heads) in the last state of
  the rows, M_k with carried memory, M_{k-1} without (the state the row's last segment reads).
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

from lm2.model.block import DecoderBlock

GATES = ("g_in", "g_forget", "g_out")
NORMS = ("slot_norm_mean", "slot_norm_max")
COLUMNS = GATES + NORMS


class MemoryMonitor:
    """Hooks on the memory modules of `module` (an LM2Model or this rank's pipeline stages).

    Args:
        module: the model the engine trains (``engine.deepspeed.module``).
        num_layers: blocks in the whole model (a pipeline stage holds only some).
        device: where the metrics are reduced (the engine's device).
    """

    def __init__(self, module: nn.Module, num_layers: int, device: torch.device):
        self.num_layers, self.device = num_layers, device
        self.memories = {
            block.layer_index: block.memory
            for block in module.modules()
            if isinstance(block, DecoderBlock) and block.memory is not None
        }
        self._gates: dict[int, dict[str, list[torch.Tensor]]] = {}
        self._squared_norms: dict[int, torch.Tensor] = {}  # layer -> [B, N], this rank's heads
        self._running: int | None = None  # the layer whose row-level forward is running

    def _start(self, layer: int, module, args) -> None:
        self._running = layer
        self._gates[layer] = {gate: [] for gate in GATES}  # a new forward replaces the last one

    def _stop(self, module, args, output) -> None:
        self._running = None

    def _record_gate(self, layer: int, gate: str, module, args, output: torch.Tensor) -> None:
        # Only inside the layer's row-level forward: incremental steps (generation) would grow without end.
        if self._running == layer:
            self._gates[layer][gate].append(output.detach().float().mean())  # stays on the device: no sync

    def _record_state(self, layer: int, module, args, output: torch.Tensor) -> None:
        if self._running == layer:  # [Hl, B, N, dh] -> each slot's squared norm over this rank's heads, [B, N]
            self._squared_norms[layer] = output.detach().float().square().sum(dim=(0, 3))

    @contextlib.contextmanager
    def recording(self, enabled: bool = True):
        """Records while open (nothing when not enabled); the hooks are removed on exit."""
        if not enabled:
            yield
            return
        handles = []
        for layer, memory in self.memories.items():
            handles.append(memory.register_forward_pre_hook(partial(self._start, layer)))
            handles.append(memory.register_forward_hook(self._stop))
            for gate, probe in zip(GATES, (memory.in_gate_probe, memory.forget_gate_probe, memory.out_gate_probe)):
                handles.append(probe.register_forward_hook(partial(self._record_gate, layer, gate)))
            handles.append(memory.state_probe.register_forward_hook(partial(self._record_state, layer)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._running = None

    def summary(self) -> torch.Tensor:
        """[num_layers, 5] on the device: the gate means (g_in, g_forget, g_out) and the slot norms' mean and max;
        NaN for layers without memory and for gates the last forward did not use (no write in a one-segment row).
        A collective over the whole world; no host sync."""
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
        table = torch.zeros(self.num_layers, 5, dtype=torch.float64, device=self.device)  # 4 sums and a count
        largest = torch.full((self.num_layers,), -1.0, dtype=torch.float64, device=self.device)
        norms = self._slot_norms()
        for layer, gates in self._gates.items():
            table[layer, :3] = torch.stack([torch.stack(v).mean().double() if v else nan for v in gates.values()])
            table[layer, 3] = norms[layer].mean() if layer in norms else nan
            table[layer, 4] = 1
            largest[layer] = norms[layer].max() if layer in norms else largest[layer]
        dist.all_reduce(table)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        largest = torch.where(largest < 0, nan, largest)
        return torch.cat([table[:, :4] / table[:, 4:], largest[:, None]], dim=1)  # 0/0 = NaN: no rank holds it

    def _slot_norms(self) -> dict[int, torch.Tensor]:
        """Layer -> every row's slot norms [B, N] over all heads: the TP ranks of a stage hold the same layers and
        rows, each its own heads' share of the squares."""
        layers = sorted(self._squared_norms)
        if not layers:
            return {}
        squares = torch.stack([self._squared_norms[layer] for layer in layers])
        dist.all_reduce(squares, group=parallel_state.get_tensor_model_parallel_group())
        return {layer: squares[i].sqrt().double() for i, layer in enumerate(layers)}
