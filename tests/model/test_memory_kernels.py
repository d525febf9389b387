"""The fused CPU kernels (model/memory_kernels.c: the write scan and the read) compute what the memory's PyTorch
operations compute: values, gradients and gates, over truncated-BPTT windows and at sizes off their 4 x 16 blocks;
the same bits at any thread count; and without a C compiler the memory falls back to its PyTorch operations."""

import tempfile

import pytest
import torch

from lm2.model import memory_backend, memory_kernels
from lm2.model.memory import LM2Memory
from lm2.pipeline.parallel.mpu import tensor_parallel
from tests.model.tiny import tiny_config

requires_kernel = pytest.mark.skipif(not memory_kernels.available(), reason="no C compiler to build the kernel")


def memory_module(cfg, seed=0):
    """A memory module with weights moved well off their initial values, so that every gate and the chain of
    states matter to the output."""
    torch.manual_seed(seed)
    module = LM2Memory(cfg, tensor_parallel(torch.float32))
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return module


def output_and_gradients(module, xn, segment_length, fused):
    """The module's read of rows xn and the gradients of a fixed random projection of it, every tensor fp64."""
    xn = xn.detach().clone().requires_grad_()
    with memory_backend.choose("auto" if fused else "pytorch"):
        out = module(xn, segment_length)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out * weights.to(out.dtype)).sum().backward()
    grads = {name: p.grad.double() for name, p in module.named_parameters()}
    grads["xn"] = xn.grad.double()
    module.zero_grad(set_to_none=True)
    return out.detach().double(), grads


@requires_kernel
@pytest.mark.parametrize(
    "fields,row_length,bptt",
    [
        (dict(slots=6), 40, 2),  # 5 segments of 8: three windows; rows and columns off the 4 x 16 blocks
        (dict(slots=6), 40, 3),  # a short last window
        (dict(slots=16), 96, 8),  # one window; 16 slots, 32-wide heads: whole blocks
        (dict(slots=5, dim=40), 32, 4),  # heads of 20 columns
        (dict(slots=6, write_rule="convex"), 40, 3),
        (dict(slots=6, read_norm=True), 40, 3),
        (dict(slots=16, write_rule="convex", read_norm=True), 96, 8),
    ],
)
def test_fused_kernels_equal_the_pytorch_memory_in_fp64(single_process, fields, row_length, bptt):
    """Against the module's PyTorch operations in fp64, the kernels (fp32) err no more than the same operations in
    fp32 do, up to a small factor, on the module's output and on every gradient. The convex write rule leaves the
    input gate unused: its gradients are zero on every path."""
    cfg = tiny_config(row_length=row_length, memory_fields=dict(bptt_segments=bptt, **fields))
    module = memory_module(cfg)
    xn = torch.randn(3, row_length, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    fused = output_and_gradients(module, xn, cfg.segment_length, True)
    fp32 = output_and_gradients(module, xn, cfg.segment_length, False)
    exact = output_and_gradients(module.double(), xn.double(), cfg.segment_length, False)
    module.float()
    for name in ["output", *exact[1]]:
        pick = (lambda run: run[0]) if name == "output" else (lambda run, name=name: run[1][name])
        if cfg.memory.write_rule == "convex" and name.startswith("in_gate"):
            assert all(not pick(run).any() for run in (fused, fp32, exact)), name
            continue
        scale = pick(exact).abs().max()
        fused_error = (pick(fused) - pick(exact)).abs().max() / scale
        fp32_error = (pick(fp32) - pick(exact)).abs().max() / scale
        assert scale > 0, name
        assert fused_error < max(4 * fp32_error, 1e-6), f"{name}: {fused_error:.2e} against fp32's {fp32_error:.2e}"


@requires_kernel
@pytest.mark.parametrize("write_rule", ["paper", "convex"])
def test_the_probes_see_the_same_gates(single_process, write_rule):
    """With the convex rule the input-gate probe sees the weight of tanh(u), 1 - g_f, on both paths."""
    cfg = tiny_config(row_length=40, memory_fields=dict(bptt_segments=2, write_rule=write_rule))
    module = memory_module(cfg)
    xn = torch.randn(2, 40, cfg.hidden_size)
    seen = {}
    for fused in (True, False):
        gates = seen[fused] = []
        hooks = [
            probe.register_forward_hook(lambda m, a, out, g=gates: g.append(out.clone()))
            for probe in (module.in_gate_probe, module.forget_gate_probe, module.out_gate_probe)
        ]
        with torch.no_grad(), memory_backend.choose("auto" if fused else "pytorch"):
            module(xn, cfg.segment_length)
        for hook in hooks:
            hook.remove()
    assert len(seen[True]) == len(seen[False]) == 2 * 4 + 1  # input and forget gate of the 4 writes, output gate
    if write_rule == "convex":
        torch.testing.assert_close(seen[True][0], 1 - seen[True][1], rtol=0, atol=0)
    for fused_gate, gate in zip(seen[True], seen[False]):
        torch.testing.assert_close(fused_gate, gate, rtol=0, atol=1e-5)


@requires_kernel
def test_the_kernels_give_the_same_bits_at_any_thread_count(single_process):
    """The kernels alone (the module's torch GEMMs may round differently with the thread count)."""
    cfg = tiny_config(row_length=96, memory_fields=dict(slots=16, bptt_segments=8))
    module = memory_module(cfg)
    heads, dh, segment = module.local_heads, module.head_dim, cfg.segment_length
    generator = torch.Generator().manual_seed(3)
    keys, values, q = (torch.randn(4, 96, heads * dh, generator=generator) for _ in range(3))
    runs = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            inputs = [t.clone().requires_grad_() for t in (keys[:, :-segment], values[:, :-segment], q)]
            states, _ = memory_kernels.fused_write_scan(
                module.initial_state(4), *inputs[:2], module.write_weights(), segment
            )
            out, _ = memory_kernels.fused_read(
                inputs[2], states, module._read_kv_weight(), module.out_gate, module.out_gate_bias, segment
            )
            out.square().sum().backward()
            runs.append(
                [
                    states.detach(),
                    out.detach(),
                    *(t.grad for t in inputs),
                    *(p.grad.clone() for p in module.parameters() if p.grad is not None),
                ]
            )
            module.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    assert len(runs[0]) == 5 + 10  # every memory parameter but the four token projections has a gradient
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_without_a_c_compiler_the_memory_runs_its_pytorch_operations(single_process, monkeypatch, tmp_path):
    """A PATH with no cc: one warning naming the fix, and the memory still computes on CPU, with its PyTorch
    operations."""
    cfg = tiny_config()
    module = memory_module(cfg)
    xn = torch.randn(2, cfg.row_length, cfg.hidden_size, requires_grad=True)
    monkeypatch.setenv("PATH", str(tmp_path))
    memory_kernels._library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no C compiler.*Install gcc") as caught:
            assert memory_backend.fused_kernels(xn) is None
            module(xn, cfg.segment_length).sum().backward()
    finally:
        memory_kernels._library.cache_clear()  # the next caller finds the real PATH's compiler again
    assert len([w for w in caught if "C compiler" in str(w.message)]) == 1
    assert module.write_k.weight.grad.abs().sum() > 0


@pytest.fixture
def fresh_kernel_cache(monkeypatch, tmp_path):
    """A home and a temporary folder of the test's own; the kernels are looked up again before and after."""
    from lm2.model import kernel_cache

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(kernel_cache, "_temporary", None)
    memory_kernels._library.cache_clear()
    yield tmp_path
    memory_kernels._library.cache_clear()  # later tests load the real cache's library again


@requires_kernel
def test_kernels_are_built_in_the_users_private_cache(fresh_kernel_cache):
    from lm2.model import kernel_cache

    assert memory_kernels.available()
    (library,) = (fresh_kernel_cache / "home" / ".cache" / "lm2").glob("memory_kernels-*.so")
    assert kernel_cache.is_private(library) and kernel_cache.is_private(library.parent)
    assert not list((fresh_kernel_cache / "tmp").iterdir())


@requires_kernel
def test_a_cache_others_can_write_is_never_used_a_private_temporary_folder_is(fresh_kernel_cache):
    cache = fresh_kernel_cache / "home" / ".cache" / "lm2"
    cache.mkdir(parents=True)
    cache.chmod(0o777)  # anyone could plant a library here
    planted = cache / "memory_kernels-0000000000000000.so"
    planted.write_bytes(b"not loaded")
    assert memory_kernels.available()
    assert sorted(p.name for p in cache.iterdir()) == [planted.name]  # nothing built or read there
    (private,) = (fresh_kernel_cache / "tmp").iterdir()
    assert private.name.startswith("lm2-kernels-") and oct(private.stat().st_mode & 0o777) == "0o700"
    assert list(private.glob("memory_kernels-*.so"))


def test_without_a_private_folder_the_memory_runs_its_pytorch_operations_with_one_warning(
    single_process, fresh_kernel_cache, monkeypatch
):
    cfg = tiny_config()
    module = memory_module(cfg)
    xn = torch.randn(2, cfg.row_length, cfg.hidden_size, requires_grad=True)
    (fresh_kernel_cache / "home").write_text("a file, not a folder: no cache below it")
    monkeypatch.setattr(tempfile, "tempdir", str(fresh_kernel_cache / "missing"))  # mkdtemp fails
    with pytest.warns(UserWarning, match="no folder only you can write") as caught:
        assert memory_backend.fused_kernels(xn) is None
        module(xn, cfg.segment_length).sum().backward()
    assert len([w for w in caught if "only you can write" in str(w.message)]) == 1
    assert module.write_k.weight.grad.abs().sum() > 0


def test_the_build_key_holds_the_cpu_features_on_x86_and_on_aarch64():
    from lm2.model.kernel_cache import cpu_key

    x86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 avx512f\n"
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve sve2\nCPU implementer\t: 0x41\n"
    assert cpu_key(x86) == "flags\t\t: fpu sse2 avx2 avx512f"
    assert cpu_key(arm) == "Features\t: fp asimd sve sve2"
    assert cpu_key(arm.replace("sve2", "")) != cpu_key(arm) and cpu_key("processor\t: 0\n") == ""
