"""The memory semantics of docs/memory.md: causality, the parallel scan, resets and initial values."""

import pytest
import torch

import lm2.model.memory as memory_module
from lm2.model import memory_backend
from lm2.model.lm import LM2Model, token_losses
from lm2.pipeline.parallel.mpu import tensor_parallel
from tests.model.tiny import tiny_config


def build(cfg, seed=0):
    return LM2Model(cfg, tensor_parallel(), seed=seed)


def tokens(cfg, batch=2, seed=1):
    return torch.randint(0, cfg.vocab_size, (batch, cfg.row_length), generator=torch.Generator().manual_seed(seed))


STABILITY_OPTIONS = {
    "convex": dict(write_rule="convex"),
    "read-norm": dict(read_norm=True),
    "both": dict(write_rule="convex", read_norm=True, input_bias_init=-0.5),
}


@pytest.mark.parametrize("memory,options", [(True, {}), (False, {}), (True, STABILITY_OPTIONS["both"])])
@pytest.mark.parametrize("where", ["inside a segment", "first token of a segment", "last token of a segment"])
def test_perturbing_token_j_leaves_earlier_logits_bit_identical(single_process, memory, options, where):
    cfg = tiny_config(with_memory=memory, memory_fields=options)
    model = build(cfg).eval()
    j = {"inside a segment": 13, "first token of a segment": 16, "last token of a segment": 23}[where]
    x = tokens(cfg)
    y = x.clone()
    y[:, j] = (y[:, j] + 7) % cfg.vocab_size
    with torch.no_grad():
        before, after = model(x), model(y)
    assert torch.equal(before[:, :j], after[:, :j])
    assert not torch.equal(before[:, j], after[:, j])  # the perturbation does reach position j


@pytest.mark.parametrize("memory_layers,reaches", [(None, True), ([1], True), ([], False)])
def test_information_crosses_segments_only_through_memory(single_process, memory_layers, reaches):
    """Perturbing segment 0 changes segment 2 when some block carries memory; with no bank, segments are
    independent (attention stays inside its segment)."""
    cfg = tiny_config(memory_fields=dict(layers=memory_layers))
    model = build(cfg).eval()
    x = tokens(cfg)
    y = x.clone()
    y[:, 3] = (y[:, 3] + 5) % cfg.vocab_size
    with torch.no_grad():
        changed = not torch.equal(model(x)[:, 16:24], model(y)[:, 16:24])
    assert changed == reaches


def reference_loop(model, x):
    """The straightforward semantics: one segment at a time through every block, memory carried between them.
    Returns logits [B, L, V/tp]."""
    cfg = model.cfg
    memory = model.initial_memory(x.shape[0])
    outputs = []
    for s in range(cfg.num_segments):
        logits, memory = model.forward_segment(x[:, s * cfg.segment_length : (s + 1) * cfg.segment_length], memory, s)
        outputs.append(logits)
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("bptt", [2, 3, 4])
def test_parallel_segments_equal_segment_by_segment_loop(single_process, bptt):
    cfg = tiny_config(memory_fields=dict(bptt_segments=bptt))
    model = build(cfg)
    x = tokens(cfg)
    labels = torch.roll(x, -1, dims=1)

    def logits_and_grads(forward):
        model.zero_grad()
        logits = forward(x)
        kept = logits.detach().clone()
        token_losses(logits, labels).mean().backward()
        return kept, {n: p.grad.clone() for n, p in model.named_parameters()}

    parallel_logits, parallel_grads = logits_and_grads(model)
    loop_logits, loop_grads = logits_and_grads(lambda t: reference_loop(model, t))
    real = slice(0, cfg.vocab_size)
    torch.testing.assert_close(parallel_logits[..., real], loop_logits[..., real], rtol=1e-6, atol=1e-6)
    for name in parallel_grads:
        torch.testing.assert_close(parallel_grads[name], loop_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert parallel_grads["layers.0.memory.init_bank"].abs().sum() > 0  # gradients do reach the bank


def explicit_read(memory, xn, mem, read_norm_eps=None):
    """The read of docs/memory.md written out with plain tensor ops from the module's weights (TP=1).
    xn [B, S, d], mem [B, N, d_m] -> [B, S, d]. read_norm_eps: memory.read_norm's RMSNorm of each head's slice."""
    b, s, _ = xn.shape
    heads, dh = memory.local_heads, memory.head_dim
    m = mem.view(b, -1, heads, dh)
    if read_norm_eps is not None:
        m = m / torch.sqrt((m * m).mean(-1, keepdim=True) + read_norm_eps)
    q = (xn @ memory.read_q.weight.T).view(b, s, heads, dh)
    k = torch.einsum("bnhi,hij->bnhj", m, memory.read_k)
    v = torch.einsum("bnhi,hij->bnhj", m, memory.read_v)
    weights = torch.softmax(torch.einsum("bshd,bnhd->bhsn", q, k) / dh**0.5, dim=-1)
    r = torch.einsum("bhsn,bnhd->bshd", weights, v)
    gate = torch.sigmoid(torch.einsum("bshi,hij->bshj", r, memory.out_gate) + memory.out_gate_bias)
    return (gate * r).flatten(-2) @ memory.out_proj.weight.T


def explicit_write(memory, xn, mem, write_rule="paper"):
    """The write of docs/memory.md with plain tensor ops: xn [B, S, d], M_s [B, N, d_m] -> M_{s+1}, by the paper's
    rule or the convex one (memory.write_rule)."""
    b, s, _ = xn.shape
    heads, dh = memory.local_heads, memory.head_dim
    m = mem.view(b, -1, heads, dh)
    q = torch.einsum("bnhi,hij->bnhj", m, memory.write_q)
    k = (xn @ memory.write_k.weight.T).view(b, s, heads, dh)
    v = (xn @ memory.write_v.weight.T).view(b, s, heads, dh)
    u = torch.einsum("bhns,bshd->bnhd", torch.softmax(torch.einsum("bnhd,bshd->bhns", q, k) / dh**0.5, -1), v)
    both = torch.cat((u, m), dim=-1)
    g_in = torch.sigmoid(torch.einsum("bnhi,hij->bnhj", both, memory.in_gate) + memory.in_gate_bias)
    g_forget = torch.sigmoid(torch.einsum("bnhi,hij->bnhj", both, memory.forget_gate) + memory.forget_gate_bias)
    if write_rule == "convex":
        return (g_forget * m + (1 - g_forget) * torch.tanh(u)).flatten(-2)
    return (g_in * torch.tanh(u) + g_forget * m).flatten(-2)


def windowed_bptt_reference(model, x):
    """Logits of rows x [B, L] computed segment by segment with the memory math written out, and the BPTT rule
    applied literally: at the start of every window of bptt_segments segments, every block's memory is detached
    (for its reads and its write alike)."""
    cfg = model.cfg
    seg, bptt = cfg.segment_length, cfg.memory.bptt_segments
    read_norm_eps = cfg.norm_eps if cfg.memory.read_norm else None
    memory = [layer.memory.init_bank.expand(x.shape[0], -1, -1) for layer in model.layers]
    outputs = []
    for s in range(cfg.num_segments):
        if s > 0 and s % bptt == 0:
            memory = [mem.detach() for mem in memory]
        h = model.embed_tokens(x[:, s * seg : (s + 1) * seg])
        for i, layer in enumerate(model.layers):
            xn = layer.input_layernorm(h)
            h = h + layer._attention(xn) + explicit_read(layer.memory, xn, memory[i], read_norm_eps)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            memory[i] = explicit_write(layer.memory, xn, memory[i], cfg.memory.write_rule)
        outputs.append(model.logits(h))
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("attention", ["explicit", "fused"])
@pytest.mark.parametrize("bptt", [2, 3, 8])
def test_truncated_bptt_gradients_equal_explicit_windowed_reference(single_process, bptt, attention, monkeypatch):
    """Three blocks, five segments: every parameter's gradient equals the literal windowed computation (bptt=3
    leaves a short last window, bptt=8 is full BPTT). The memory attends with the CPU's explicit softmax, or with
    the GPU's path (SDPA, the scale folded in, keys made contiguous) run here on CPU."""
    monkeypatch.setattr(memory_module, "_attend", getattr(memory_module, f"_attend_{attention}"))
    cfg = tiny_config(num_layers=3, row_length=40, memory_fields=dict(bptt_segments=bptt))
    model = build(cfg)
    x = tokens(cfg)
    labels = torch.roll(x, -1, dims=1)
    grads = []
    for forward in (model, lambda t: windowed_bptt_reference(model, t)):
        model.zero_grad()
        token_losses(forward(x), labels).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("options", list(STABILITY_OPTIONS), ids=list(STABILITY_OPTIONS))
@pytest.mark.parametrize("backend", ["auto", "pytorch"])
def test_stability_options_equal_their_explicit_formulas(single_process, options, backend):
    """The convex write and the read norm, on the fused CPU kernels and on the PyTorch operations: logits and every
    gradient equal the formulas of MemoryConfig written out, segment by segment (weights moved off their initial
    values, so the gates and the norm matter)."""
    cfg = tiny_config(num_layers=2, row_length=40, memory_fields=dict(bptt_segments=3, **STABILITY_OPTIONS[options]))
    model = build(cfg)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(4)))
    x = tokens(cfg)
    labels = torch.roll(x, -1, dims=1)
    results = []
    for forward in (model, lambda t: windowed_bptt_reference(model, t)):
        model.zero_grad()
        with memory_backend.choose(backend):
            logits = forward(x)
        results.append(logits[..., : cfg.vocab_size].detach().clone())
        token_losses(logits, labels).mean().backward()
        # The written-out convex rule never touches the input gate (no gradient); the model's gives it zeros.
        results.append(
            {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        )
    torch.testing.assert_close(results[0], results[2], rtol=1e-5, atol=1e-5)
    for name, grad in results[1].items():
        torch.testing.assert_close(grad, results[3][name], rtol=1e-4, atol=1e-6, msg=name)


def memory_magnitudes(write_rule: str, segments: int = 48) -> list[float]:
    """max |M_s| of one block's memory over many segments of random inputs, its weights made large (strong,
    unbalanced gates) but its bank M_0 the identity."""
    cfg = tiny_config(memory_fields=dict(write_rule=write_rule))
    module = build(cfg).layers[0].memory
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name != "init_bank":
                parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(5)))
        module.forget_gate_bias.fill_(4.0)  # remember nearly all of M ...
        module.in_gate_bias.fill_(4.0)  # ... and add nearly all of tanh(u): the paper's rule accumulates
        mem, magnitudes = module.initial_state(2), []
        generator = torch.Generator().manual_seed(6)
        for segment in range(segments):
            xn = torch.randn(2, cfg.segment_length, cfg.hidden_size, generator=generator)
            mem = module.step(xn, mem, segment)[1]
            magnitudes.append(mem.abs().max().item())
    return magnitudes


def test_the_convex_write_keeps_the_memory_bounded(single_process):
    """The convex rule keeps every element within max(1, |M_0|) = 1 (the identity bank); the paper's rule, under
    the same weights, grows several times past it (not monotonically: the gates see M)."""
    assert max(memory_magnitudes("convex")) <= 1.0
    assert max(memory_magnitudes("paper")) > 4.0


@pytest.mark.parametrize("bptt,loss_segment", [(2, 3), (2, 4), (3, 2), (3, 4), (5, 4)])
def test_no_gradient_leaves_a_bptt_window_in_any_block(single_process, bptt, loss_segment):
    """The loss of one segment gives gradient to the input of every block at exactly the segments of its own
    window up to itself: windows are [0, bptt), [bptt, 2 bptt), ... and every block cuts at the same
    boundaries, so no path through stacked memories leaves the window."""
    cfg = tiny_config(num_layers=3, row_length=40, memory_fields=dict(bptt_segments=bptt))
    model = build(cfg)
    inputs = []

    def keep_input(module, args):
        args[0].retain_grad()
        inputs.append(args[0])

    for layer in model.layers:
        layer.register_forward_pre_hook(keep_input)
    seg = cfg.segment_length
    model(tokens(cfg))[:, loss_segment * seg : (loss_segment + 1) * seg, : cfg.vocab_size].sum().backward()
    window_start = loss_segment - loss_segment % bptt
    expected = [window_start <= s <= loss_segment for s in range(cfg.num_segments)]
    for block, h in enumerate(inputs):
        reached = [bool(h.grad[:, s * seg : (s + 1) * seg].abs().sum() > 0) for s in range(cfg.num_segments)]
        assert reached == expected, f"block {block}"


def test_memory_is_reset_at_every_row(single_process):
    """No state survives a forward, and rows of a batch do not see each other."""
    model = build(tiny_config()).eval()
    x = tokens(model.cfg, batch=3)
    with torch.no_grad():
        first, again = model(x), model(x)
        alone = model(x[1:2])
        shuffled = model(x[[2, 1, 0]])
    assert torch.equal(first, again)
    torch.testing.assert_close(first[1:2], alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(first[[2, 1, 0]], shuffled, rtol=0, atol=1e-6)
    assert list(model.named_buffers()) == []  # memory is never a buffer


@pytest.mark.parametrize("slots,dim,biases", [(6, None, {}), (80, None, {}), (16, 32, (2.5, -1.0))])
def test_bank_starts_at_identity_and_gate_biases_at_their_init(single_process, slots, dim, biases):
    """Default biases: forget +1, input 0; memory.forget_bias_init and input_bias_init set them."""
    forget, input_gate = biases or (1.0, 0.0)
    fields = dict(forget_bias_init=forget, input_bias_init=input_gate) if biases else {}
    cfg = tiny_config(memory_fields=dict(slots=slots, dim=dim, **fields))
    model = build(cfg)
    d_m = cfg.memory_dim
    expected = torch.zeros(slots, d_m)
    expected[torch.arange(slots), torch.arange(slots) % d_m] = 1.0
    for layer in model.layers:
        assert torch.equal(layer.memory.init_bank, expected)
        assert torch.equal(layer.memory.forget_gate_bias, torch.full_like(layer.memory.forget_gate_bias, forget))
        assert torch.equal(layer.memory.in_gate_bias, torch.full_like(layer.memory.in_gate_bias, input_gate))


def test_memory_layers_subset_and_vanilla_have_no_memory_parameters(single_process):
    cfg = tiny_config(memory_fields=dict(layers=[1]))
    model = build(cfg)
    assert model.layers[0].memory is None and model.layers[1].memory is not None
    vanilla = build(tiny_config(with_memory=False))
    assert not [n for n, _ in vanilla.named_parameters() if "memory" in n]
