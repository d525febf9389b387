"""The Triton memory kernels (model/memory_triton.py) compute what the memory's PyTorch operations compute: values,
every gradient and the gates, over truncated-BPTT windows, at sizes off their tiles, in fp32 and bf16, with either
write rule (with the convex one the input gate's gradients are exactly zero on every path).

Without a GPU they run under Triton's interpreter, in one subprocess for every case: TRITON_INTERPRET must be set
before the kernels are first imported, and another test of this pytest worker may already have imported them
compiled. The subprocess builds its world of one from a bare gloo group (DeepSpeed's initialisation would cost it
minutes on a busy machine). On a GPU the same comparisons run in-process, plus sizes where a head is 128 wide and
the slots and tokens span several tiles."""

import json
import os
import subprocess
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch

import lm2.model
from lm2.model import memory_backend, memory_triton
from lm2.model.memory import LM2Memory
from lm2.pipeline.parallel.mpu import tensor_parallel
from tests.model.tiny import tiny_config


@dataclass(frozen=True)
class Case:
    memory: dict
    row_length: int
    bptt: int
    segment_length: int = 8
    dtype: str = "float32"
    block: int = 64  # memory_triton._BLOCK, the largest tile
    extra: dict = field(default_factory=dict)  # other ModelConfig fields


CASES = {
    "three windows": Case(dict(slots=6), 40, 2),  # 5 segments of 8
    "a short last window": Case(dict(slots=6), 40, 3),
    "whole tiles": Case(dict(slots=16), 64, 8, segment_length=16),  # 16 slots, 16 tokens, 32-wide heads
    # Tiles of 16 slots and tokens, then of 4 slots and 8 tokens.
    "several tiles": Case(dict(slots=20), 72, 2, segment_length=24, block=16),
    "heads of 20 columns": Case(dict(slots=5, dim=40), 32, 4),
    # A tensor-parallel rank of 4 heads at tp=2 holds 2 heads of 16 columns: projections 32 wide, not d = 64.
    "tp-local heads": Case(dict(heads=2, dim=32), 32, 2),
    "bf16": Case(dict(slots=5, dim=40), 24, 2, dtype="bfloat16"),
    # One head of 128 columns: the chain kernel's 32-slot blocks (40 slots: 32, then 8) under the others' 64.
    "a 128-wide head": Case(dict(slots=40, heads=1, dim=128), 32, 2, segment_length=16),
    # The convex write rule: 4 writes in windows of 3 and 1; then tiles of 16 slots and tokens, short ones last.
    "convex, a short last window": Case(dict(slots=6, write_rule="convex"), 40, 3),
    "convex, several tiles": Case(dict(slots=20, write_rule="convex"), 72, 2, segment_length=24, block=16),
    # 3 writes in windows of 2 and 1, 2 slot tiles (16, then 4), heads of 20 columns.
    "convex, bf16": Case(
        dict(slots=20, dim=40, write_rule="convex"), 64, 2, segment_length=16, dtype="bfloat16", block=16
    ),
}
GPU_CASES = {  # heads of 128 and 64 columns, several tiles of 64 slots and tokens, short ones last
    "128-wide heads": Case(dict(slots=150, heads=2, dim=256), 400, 2, segment_length=80, extra=dict(hidden_size=256)),
    "64-wide heads, bf16": Case(
        dict(slots=100, heads=4, dim=256), 400, 3, segment_length=100, dtype="bfloat16", extra=dict(hidden_size=256)
    ),
    "128-wide heads, convex": Case(
        dict(slots=150, heads=2, dim=256, write_rule="convex"), 400, 3, segment_length=80, extra=dict(hidden_size=256)
    ),
    "64-wide heads, bf16, convex": Case(
        dict(slots=100, heads=4, dim=256, write_rule="convex"),
        400,
        2,
        segment_length=100,
        dtype="bfloat16",
        extra=dict(hidden_size=256),
    ),
}


@contextmanager
def backend(triton: bool):
    """The memory's fused calls (memory_backend picks them) routed to the Triton kernels where they apply (on CPU:
    under the interpreter), or to none (its PyTorch operations)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            memory_backend,
            "fused_kernels",
            lambda tensor: memory_triton if triton and memory_triton.applies(tensor) else None,
        )
        yield


def memory_module(case: Case, tp, device: str) -> tuple[LM2Memory, torch.Tensor, int]:
    """A memory module with weights moved well off their initial values (every gate and the chain of states then
    matter to the output), a batch of rows for it, and its segment length."""
    cfg = tiny_config(
        row_length=case.row_length,
        segment_length=case.segment_length,
        **case.extra,
        memory_fields=dict(bptt_segments=case.bptt, **case.memory),
    )
    torch.manual_seed(0)
    module = LM2Memory(cfg, tp)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    xn = torch.randn(2, case.row_length, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    return module.to(device), xn.to(device), cfg.segment_length


def output_and_gradients(module, xn, segment_length, triton: bool):
    """The module's read of rows xn and the gradients of a fixed random projection of it, every tensor fp64."""
    xn = xn.detach().clone().requires_grad_()
    with backend(triton):
        out = module(xn, segment_length)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out * weights.to(out)).sum().backward()
    grads = {name: p.grad.double() for name, p in module.named_parameters()}
    grads["xn"] = xn.grad.double()
    module.zero_grad(set_to_none=True)
    return out.detach().double(), grads


def errors(case: Case, tp, device: str) -> dict[str, list[float]]:
    """{output or gradient: [the kernels' error, the PyTorch operations' error]}, both in the case's dtype, relative
    to the largest value of the module's PyTorch operations in fp64 (from the same weights and rows). With the
    convex rule the input gate's gradients are zero: for those, [the kernels', the PyTorch operations' and the fp64
    operations' largest magnitude]."""
    module, xn, segment_length = memory_module(case, tp, device)
    dtype = getattr(torch, case.dtype)
    xn = xn.to(dtype)  # the reference computes from the same rounded weights and rows: it measures the operations
    exact = output_and_gradients(module.to(dtype).double(), xn.double(), segment_length, False)
    module.to(dtype)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(memory_triton, "_BLOCK", case.block)
        kernels = output_and_gradients(module, xn, segment_length, True)
    pytorch = output_and_gradients(module, xn, segment_length, False)
    found = {}
    for name in ["output", *exact[1]]:
        pick = (lambda run: run[0]) if name == "output" else (lambda run, name=name: run[1][name])
        if case.memory.get("write_rule") == "convex" and name.startswith("in_gate"):
            found[name] = [pick(run).abs().max().item() for run in (kernels, pytorch, exact)]
            continue
        scale = pick(exact).abs().max()
        assert scale > 0, name
        found[name] = [((pick(run) - pick(exact)).abs().max() / scale).item() for run in (kernels, pytorch)]
    return found


def gates_seen(tp, device: str, write_rule: str = "paper") -> dict:
    """The gates the probes see, kernels against PyTorch operations: how many, their largest difference, and how far
    the kernels' input gates are from 1 - their forget gates (the convex rule's weight of tanh(u))."""
    case = CASES["three windows"]
    module, xn, segment_length = memory_module(
        replace(case, memory={**case.memory, "write_rule": write_rule}), tp, device
    )
    seen = {}
    for triton in (True, False):
        gates = seen[triton] = []
        hooks = [
            probe.register_forward_hook(lambda m, a, out, g=gates: g.append(out.clone()))
            for probe in (module.in_gate_probe, module.forget_gate_probe, module.out_gate_probe)
        ]
        with torch.no_grad(), backend(triton):
            module(xn, segment_length)
        for hook in hooks:
            hook.remove()
    writes = seen[True][:-1]  # input then forget gate of each write, then the read's output gate
    return dict(
        count=[len(seen[True]), len(seen[False])],
        difference=max((a - b).abs().max().item() for a, b in zip(seen[True], seen[False])),
        complement=max((g_in - (1 - g_f)).abs().max().item() for g_in, g_f in zip(writes[::2], writes[1::2])),
    )


def interpreted_report() -> None:
    """The subprocess's work (TRITON_INTERPRET=1): every case's errors, the probes' gates and what applies, one JSON
    line on stdout. A case that raises reports its traceback."""
    import torch.distributed as dist

    from lm2.model.layers import TensorParallel

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    tp = TensorParallel.of_group(dist.group.WORLD, torch.float32)
    report = {}
    for name, check in [
        *((name, lambda case=case: errors(case, tp, "cpu")) for name, case in CASES.items()),
        ("gates", lambda: gates_seen(tp, "cpu")),
        ("gates, convex", lambda: gates_seen(tp, "cpu", "convex")),
        (
            "applies",
            lambda: {
                str(t): memory_triton.applies(torch.zeros(1, dtype=t))
                for t in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
            },
        ),
    ]:
        try:
            report[name] = check()
        except Exception:  # reported: the case's test fails with it, the others still run
            report[name] = dict(traceback=traceback.format_exc())
    dist.destroy_process_group()
    print(json.dumps(report))


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """interpreted_report() of a subprocess."""
    command = "from tests.model.test_memory_triton import interpreted_report; interpreted_report()"
    done = subprocess.run(
        [sys.executable, "-c", command],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


def result(report: dict, name: str):
    if "traceback" in report[name]:
        pytest.fail(f"{name}:\n{report[name]['traceback']}")
    return report[name]


def assert_close_to_pytorch(found: dict[str, list[float]], case: Case) -> None:
    """The CPU kernels' rule: no more than 4x what the same PyTorch operations err in the same dtype. fp32's floor
    1e-6 is a few ulp; bf16's (errors about 1e-2) never binds. With the convex rule the input gate's gradients are
    exactly zero, from the kernels and from the PyTorch operations in both dtypes."""
    assert len(found) == 1 + 14 + 1  # the output, every parameter's gradient and the input's
    found, floor = dict(found), 1e-6 if case.dtype == "float32" else 1e-3
    if case.memory.get("write_rule") == "convex":
        unused = {name: found.pop(name) for name in ("in_gate", "in_gate_bias")}
        assert all(magnitude == 0 for magnitudes in unused.values() for magnitude in magnitudes), unused
    for name, (kernel_error, pytorch_error) in found.items():
        assert kernel_error < max(4 * pytorch_error, floor), (
            f"{name}: {kernel_error:.2e} against {case.dtype} PyTorch's {pytorch_error:.2e}"
        )


@pytest.mark.parametrize("name", CASES)
def test_interpreted_kernels_equal_the_pytorch_memory_in_fp64(interpreted, name):
    assert_close_to_pytorch(result(interpreted, name), CASES[name])


def assert_the_same_gates(gates: dict, write_rule: str) -> None:
    assert gates["count"] == [2 * 4 + 1] * 2  # input and forget gate of the 4 writes, output gate
    assert gates["difference"] < 1e-5
    if write_rule == "convex":  # the input-gate probe sees the weight of tanh(u)
        assert gates["complement"] == 0


@pytest.mark.parametrize("write_rule", ["paper", "convex"])
def test_interpreted_probes_see_the_same_gates(interpreted, write_rule):
    assert_the_same_gates(result(interpreted, "gates" if write_rule == "paper" else "gates, convex"), write_rule)


def test_the_kernels_apply_to_fp32_and_bf16_only(interpreted):
    assert result(interpreted, "applies") == {
        "torch.float32": True,
        "torch.bfloat16": True,
        "torch.float16": False,
        "torch.float64": False,
    }


def test_on_cpu_without_the_interpreter_the_kernels_do_not_apply():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton's interpreter")
    assert not memory_triton.applies(torch.zeros(1))


def test_without_triton_the_kernels_do_not_apply(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.delitem(sys.modules, "lm2.model.memory_triton_kernels", raising=False)
    monkeypatch.delattr(lm2.model, "memory_triton_kernels", raising=False)  # where `from lm2.model import` looks first
    memory_triton._kernels.cache_clear()
    try:
        assert memory_triton._kernels() is None
        assert not memory_triton.applies(torch.zeros(1))
    finally:
        memory_triton._kernels.cache_clear()  # the next caller imports the kernels again


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", [*CASES, *GPU_CASES])
def test_gpu_kernels_equal_the_pytorch_memory_in_fp64(single_process, name):
    case = {**CASES, **GPU_CASES}[name]
    assert_close_to_pytorch(errors(case, tensor_parallel(torch.float32), "cuda"), case)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("write_rule", ["paper", "convex"])
def test_gpu_probes_see_the_same_gates(single_process, write_rule):
    assert_the_same_gates(gates_seen(tensor_parallel(torch.float32), "cuda", write_rule), write_rule)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", ["128-wide heads", "128-wide heads, convex"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernels_give_the_same_bits_every_run(single_process, dtype, name):
    """No atomics: every output element has one writer, and the weights' sums are torch's (fixed order)."""
    module, xn, segment_length = memory_module(GPU_CASES[name], tensor_parallel(torch.float32), "cuda")
    module.to(dtype)
    runs = [output_and_gradients(module, xn.to(dtype), segment_length, True) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(runs[0][1][name], runs[1][1][name]) for name in runs[0][1])
