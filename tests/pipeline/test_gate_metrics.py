"""Memory-gate metrics come from forward hooks on the gates' probes: the right gate under the right name, only
inside a recording, only from row-level forwards, NaN where a layer has no memory."""

import math

import pytest
import torch

from lm2.model.lm import LM2Model
from lm2.pipeline.parallel.mpu import tensor_parallel
from lm2.pipeline.train.gates import GateMonitor
from tests.model.tiny import tiny_config


def _constant_gates(model: LM2Model) -> None:
    """Zero gate weights: every gate is sigmoid(its bias), g_in = g_out = 0.5 and g_forget = sigmoid(1)."""
    with torch.no_grad():
        for layer in model.layers:
            if layer.memory is not None:
                for name in ("in_gate", "forget_gate", "out_gate"):
                    getattr(layer.memory, name).zero_()


def test_gate_means_name_each_gate_and_skip_layers_without_memory(single_process):
    model = LM2Model(tiny_config(memory_fields=dict(layers=[1])), tensor_parallel(), seed=0)
    _constant_gates(model)
    monitor = GateMonitor(model, model.cfg.num_layers, torch.device("cpu"))
    x = torch.randint(0, model.cfg.vocab_size, (2, model.cfg.row_length))
    model(x)  # outside a recording: nothing is kept
    assert torch.isnan(monitor.means()).all()
    with monitor.recording():
        model(x)
    means = monitor.means().tolist()
    assert all(math.isnan(value) for value in means[0])  # block 0 has no memory
    assert means[1] == pytest.approx([0.5, 1 / (1 + math.exp(-1)), 0.5], rel=1e-6)
    assert not model.layers[1].memory.out_gate_probe._forward_hooks  # the hooks are gone after the recording


def test_incremental_steps_are_not_recorded(single_process):
    model = LM2Model(tiny_config(), tensor_parallel(), seed=0)
    monitor = GateMonitor(model, model.cfg.num_layers, torch.device("cpu"))
    x = torch.randint(0, model.cfg.vocab_size, (2, model.cfg.segment_length))
    with monitor.recording():
        model.forward_segment(x, model.initial_memory(2), 0)
    assert torch.isnan(monitor.means()).all()
