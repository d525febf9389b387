"""Training metrics by hand: throughput and MFU from token counts and a clock, gate means and slot norms per layer
and on the console. Memory metrics come from forward hooks on the memory's probes: the right gate under the right
name, the slot norms of the row's last state, only inside a recording, only from row-level forwards, NaN where a
layer has no memory."""

import math

import pytest
import torch

from lm2.model.lm import LM2Model
from lm2.pipeline.parallel.mpu import tensor_parallel
from lm2.pipeline.train.memory_monitor import MemoryMonitor
from lm2.pipeline.train.metrics import Throughput, _console_line, memory_metrics
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
    monitor = MemoryMonitor(model, model.cfg.num_layers, torch.device("cpu"))
    x = torch.randint(0, model.cfg.vocab_size, (2, model.cfg.row_length))
    model(x)  # outside a recording: nothing is kept
    assert torch.isnan(monitor.summary()).all()
    with monitor.recording():
        model(x)
    means = monitor.summary().tolist()
    assert all(math.isnan(value) for value in means[0])  # block 0 has no memory
    assert means[1][:3] == pytest.approx([0.5, 1 / (1 + math.exp(-1)), 0.5], rel=1e-6)
    assert not model.layers[1].memory.out_gate_probe._forward_hooks  # the hooks are gone after the recording


def test_incremental_steps_are_not_recorded(single_process):
    model = LM2Model(tiny_config(), tensor_parallel(), seed=0)
    monitor = MemoryMonitor(model, model.cfg.num_layers, torch.device("cpu"))
    x = torch.randint(0, model.cfg.vocab_size, (2, model.cfg.segment_length))
    with monitor.recording():
        model.forward_segment(x, model.initial_memory(2), 0)
    assert torch.isnan(monitor.summary()).all()


def test_slot_norms_are_those_of_the_rows_last_state(single_process):
    """Against the segment-by-segment path: the state the last segment of each row reads, M_{k-1}."""
    model = LM2Model(tiny_config(), tensor_parallel(), seed=0)
    monitor = MemoryMonitor(model, model.cfg.num_layers, torch.device("cpu"))
    cfg = model.cfg
    x = torch.randint(0, cfg.vocab_size, (3, cfg.row_length), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        with monitor.recording():
            model(x)
        memory = model.initial_memory(3)
        for segment in range(cfg.row_length // cfg.segment_length - 1):
            _, memory = model.forward_segment(
                x[:, segment * cfg.segment_length : (segment + 1) * cfg.segment_length], memory, segment
            )
    for layer, state in enumerate(memory):  # [Hl, B, N, dh] -> each slot's norm over all heads
        norms = state.square().sum(dim=(0, 3)).sqrt()
        expected = [norms.mean().item(), norms.max().item()]
        assert monitor.summary()[layer, 3:].tolist() == pytest.approx(expected, rel=1e-5)


def test_throughput_reports_tokens_per_second_tflops_and_mfu_since_the_last_report():
    times = iter([100.0, 102.5, 104.5])  # construction, first report, second report
    throughput = Throughput(flops_per_token=6e6, world_size=4, peak_tflops=0.5, clock=lambda: next(times))
    throughput.add(1000)
    throughput.add(1500)
    first = throughput.report()
    assert first["tokens_per_s"] == pytest.approx(2500 / 2.5)  # 1000 tokens/s over the whole job
    assert first["tflops_per_device"] == pytest.approx(1000 * 6e6 / 1e12 / 4)  # 1.5e-3 TFLOP/s per device
    assert first["mfu"] == pytest.approx(1.5e-3 / 0.5)
    throughput.add(500)
    assert throughput.report()["tokens_per_s"] == pytest.approx(500 / 2.0)  # counts restart at each report
    assert "mfu" not in Throughput(6e6, 4, 0.0, clock=lambda: 0.0).report()  # no peak given: no MFU


def test_memory_metrics_and_their_console_means():
    nan = float("nan")
    metrics = memory_metrics([[0.2, 0.6, 0.4, 1.5, 2.0], [nan] * 5, [0.4, 0.8, 0.1, 2.5, 4.0]])
    assert metrics == {
        "gates/layer_00/g_in": 0.2,
        "gates/layer_00/g_forget": 0.6,
        "gates/layer_00/g_out": 0.4,
        "memory/layer_00/slot_norm_mean": 1.5,
        "memory/layer_00/slot_norm_max": 2.0,
        "gates/layer_02/g_in": 0.4,
        "gates/layer_02/g_forget": 0.8,
        "gates/layer_02/g_out": 0.1,
        "memory/layer_02/slot_norm_mean": 2.5,
        "memory/layer_02/slot_norm_max": 4.0,
    }
    line = _console_line(3, 10, {"loss": 2.0, **metrics})
    # means over layers 0 and 2; the largest slot norm of both
    assert line == "step 3/10 | loss 2.0000 | gates in/forget/out 0.30/0.70/0.25 | slot norm mean/max 2.00/4.00"
    # rows of one segment write nothing: only the output gate has a mean
    unwritten = memory_metrics([[nan, nan, 0.5, 1.0, 1.0]])
    assert _console_line(1, 10, unwritten).endswith("gates in/forget/out -/-/0.50 | slot norm mean/max 1.00/1.00")


@pytest.mark.parametrize(
    "configured,device,expected",
    [
        (None, "NVIDIA H100 80GB HBM3", 989.0),
        (None, "NVIDIA H100 PCIe", 756.0),
        (None, "NVIDIA H200", 989.0),
        (None, "NVIDIA A100-SXM4-80GB", 312.0),
        (None, "NVIDIA L40S", 362.0),
        (None, None, 0.0),  # CPU
        (500.0, "NVIDIA H100 80GB HBM3", 500.0),  # configured wins
        (0.0, "NVIDIA H100 80GB HBM3", 0.0),  # 0 leaves MFU out
    ],
)
def test_the_peak_for_mfu_comes_from_the_gpu_unless_configured(configured, device, expected):
    from lm2.pipeline.train.peak import resolve_peak_tflops

    assert resolve_peak_tflops(configured, device) == (expected, None)


def test_an_unknown_gpu_logs_no_mfu_and_says_how_to_set_it():
    from lm2.pipeline.train.peak import resolve_peak_tflops

    peak, note = resolve_peak_tflops(None, "Some Future GPU")
    assert peak == 0.0 and "Some Future GPU" in note and "train.peak_tflops" in note
