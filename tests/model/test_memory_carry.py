"""Carried memory (model/memory.py LaneStates; pipeline/train/carry.py drives it in training): a row that continues
its lane reads the memory the lane's previous row ended with, exactly as one forward over both rows would; a fresh
row is exactly a row from M_0; no gradient crosses rows; TP=2 carries what TP=1 carries."""

import pytest
import torch
from megatron.core import parallel_state

from lm2.model import memory_backend
from lm2.model.lm import LM2Model, token_losses
from lm2.model.memory import LaneStates
from lm2.pipeline.parallel.init import init_distributed
from lm2.pipeline.parallel.mpu import tensor_parallel
from lm2.pipeline.parallel.tp_shards import gather_full_state, load_full_state
from lm2.pipeline.train.memory_monitor import MemoryMonitor
from tests.distributed import run_distributed
from tests.model.test_tensor_parallel import _full_logits
from tests.model.tiny import tiny_config

BACKENDS = ["auto", "pytorch"]  # the fused CPU kernels where they apply, and the module's PyTorch operations


def attach_lanes(model: LM2Model, lanes: int) -> list[LaneStates]:
    states = []
    for layer in model.layers:
        memory = layer.memory
        memory.lane_states = LaneStates(
            lanes, memory.local_heads, memory.slots, memory.head_dim, torch.float32, torch.device("cpu")
        )
        states.append(memory.lane_states)
    return states


def commit(states: list[LaneStates]) -> None:
    for lane_states in states:
        lane_states.commit()


def carry(lanes: list[int], fresh: list[int]) -> torch.Tensor:
    return torch.tensor(list(zip(lanes, fresh)), dtype=torch.int64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_continued_row_reads_what_one_forward_over_both_rows_reads(single_process, backend):
    """Attention stays inside a segment, so rows of whole segments carried one after the other are one long row:
    the logits of the second row equal those of the second half of a forward over both."""
    cfg = tiny_config(memory_fields=dict(bptt_segments=2))
    model = LM2Model(cfg, tensor_parallel(), seed=0).eval()
    tokens = torch.randint(0, cfg.vocab_size, (3, 2 * cfg.row_length), generator=torch.Generator().manual_seed(1))
    first, second = tokens[:, : cfg.row_length], tokens[:, cfg.row_length :]
    states = attach_lanes(model, 3)
    with torch.no_grad(), memory_backend.choose(backend):
        whole = model(tokens)
        model(first, carry([2, 0, 1], [1, 1, 1]))
        commit(states)
        continued = model(second, carry([2, 0, 1], [0, 0, 0]))
    torch.testing.assert_close(continued, whole[:, cfg.row_length :], rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_fresh_row_gives_the_bits_of_a_row_from_m0(single_process, backend):
    """Rows of one micro-batch continue their lanes except the one marked fresh (a new document): its logits are
    bit-identical to a forward without carried memory."""
    cfg = tiny_config()
    model = LM2Model(cfg, tensor_parallel(), seed=0).eval()
    generator = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, cfg.vocab_size, (2, cfg.row_length), generator=generator) for _ in range(2)]
    states = attach_lanes(model, 2)
    with torch.no_grad(), memory_backend.choose(backend):
        model(rows[0], carry([0, 1], [1, 1]))
        commit(states)
        mixed = model(rows[1], carry([0, 1], [0, 1]))
        fresh = model(rows[1])
    assert torch.equal(mixed[1], fresh[1])
    assert not torch.equal(mixed[0], fresh[0])  # lane 0 did carry its memory


def test_no_gradient_crosses_a_row(single_process):
    """The carried state is detached: the second row's loss has no gradient on the first row's inputs, while
    within a row the memory's gradient reaches every segment's inputs."""
    cfg = tiny_config(memory_fields=dict(bptt_segments=4))
    model = LM2Model(cfg, tensor_parallel(), seed=0)
    memory = model.layers[0].memory
    states = attach_lanes(model, 1)
    xn = [torch.randn(1, cfg.row_length, cfg.hidden_size, requires_grad=True) for _ in range(2)]
    memory(xn[0], cfg.segment_length, carry([0], [1]))
    commit(states)
    assert not states[0].current.requires_grad
    memory(xn[1], cfg.segment_length, carry([0], [0])).square().sum().backward()
    assert xn[0].grad is None
    assert xn[1].grad[:, : cfg.segment_length].abs().sum() > 0  # the first segment's write reaches later reads


def _carry_tp2_matches_tp1() -> None:
    cfg = tiny_config()
    generator = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, cfg.vocab_size, (2, cfg.row_length), generator=generator) for _ in range(3)]
    flags = [carry([0, 1], [1, 1]), carry([0, 1], [0, 1]), carry([0, 1], [0, 0])]

    def run(model: LM2Model) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        states, out = attach_lanes(model, 2), []
        monitor = MemoryMonitor(model, cfg.num_layers, torch.device("cpu"))
        for row, flag in zip(rows, flags):
            model.zero_grad()
            with monitor.recording():
                logits = model(row, flag)
            full = _full_logits(logits.detach(), cfg.vocab_size)
            token_losses(logits, torch.roll(row, -1, dims=1)).mean().backward()
            grad = model.layers[1].memory.write_k.weight.grad.clone()
            commit(states)
            out.append((full, grad, monitor.summary()))
        return out

    init_distributed(tp=1)
    reference = LM2Model(cfg, tensor_parallel(), seed=0)
    weights, expected = gather_full_state(reference), run(reference)
    parallel_state.destroy_model_parallel()
    init_distributed(tp=2)
    model = LM2Model(cfg, tensor_parallel(), seed=1)
    load_full_state(model, weights)
    rank, half = parallel_state.get_tensor_model_parallel_rank(), cfg.memory_dim // 2
    for (logits, grad, memory), (ref_logits, ref_grad, ref_memory) in zip(run(model), expected):
        torch.testing.assert_close(logits, ref_logits, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad[rank * half : (rank + 1) * half], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(memory, ref_memory, rtol=1e-5, atol=1e-6)  # gate means and slot norms
    parallel_state.destroy_model_parallel()


def test_tp2_carries_what_tp1_carries():
    """Three rows through two lanes (one fresh midway) at TP=2 on two gloo ranks: the logits of every row (<= 1e-6),
    a sharded memory projection's gradient and the memory metrics (slot norms over both ranks' heads) equal TP=1's."""
    run_distributed(_carry_tp2_matches_tp1, world_size=2)
