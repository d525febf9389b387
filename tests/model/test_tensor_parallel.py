"""TP=2 on two real gloo ranks computes what TP=1 computes: logits, loss and full gradients, memory on and off, and
with the memory's stability options (the convex write, the per-head read norm)."""

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from lm2.model.errors import ConfigError
from lm2.model.lm import LM2Model, token_losses
from lm2.pipeline.parallel.init import init_distributed
from lm2.pipeline.parallel.mpu import tensor_parallel
from lm2.pipeline.parallel.tp_shards import gather_full_grads, gather_full_state, load_full_state
from tests.distributed import run_distributed
from tests.model.tiny import tiny_config


def _full_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    group = parallel_state.get_tensor_model_parallel_group()
    chunks = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(chunks, logits.contiguous(), group=group)
    return torch.cat(chunks, dim=-1)[..., :vocab_size]


def _run(model: LM2Model, x: torch.Tensor):
    """Full logits, loss and full gradients of one forward/backward."""
    model.zero_grad()
    logits = model(x)
    full_logits = _full_logits(logits.detach(), model.cfg.vocab_size)
    loss = token_losses(logits, torch.roll(x, -1, dims=1)).mean()
    loss.backward()
    return full_logits, loss.detach(), gather_full_grads(model)


def _tp2_matches_tp1(cases):
    for memory, tied, options in cases:
        cfg = tiny_config(with_memory=memory, tie_embeddings=tied, memory_fields=options)
        x = torch.randint(0, cfg.vocab_size, (2, cfg.row_length), generator=torch.Generator().manual_seed(5))

        init_distributed(tp=1)  # both ranks compute the TP=1 reference (as two data-parallel replicas)
        reference = LM2Model(cfg, tensor_parallel(), seed=0)
        weights = gather_full_state(reference)
        ref_logits, ref_loss, ref_grads = _run(reference, x)
        parallel_state.destroy_model_parallel()

        init_distributed(tp=2)
        model = LM2Model(cfg, tensor_parallel(), seed=1)  # different init: the weights must come from load_full_state
        assert model.layers[0].self_attn.local_heads == cfg.num_heads // 2
        load_full_state(model, weights)
        torch.testing.assert_close(gather_full_state(model), weights, rtol=0, atol=0)
        logits, loss, grads = _run(model, x)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(
                grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
            )
        parallel_state.destroy_model_parallel()


def test_tp2_logits_loss_and_gradients_equal_tp1():
    stability = dict(write_rule="convex", read_norm=True)
    cases = [(True, True, {}), (True, False, {}), (False, True, {}), (True, True, stability)]
    run_distributed(_tp2_matches_tp1, world_size=2, args=(cases,))


def _tp2_initialises_the_tp1_weights(vocab_size):
    """With CPU initialisation every weight is drawn whole and sliced: the same seed gives the same model at
    any TP degree, vocabulary padding included."""
    cfg = tiny_config(vocab_size=vocab_size)
    weights = {}
    for tp in (1, 2):
        init_distributed(tp=tp)
        torch.manual_seed(tp)  # the global RNG plays no part
        weights[tp] = gather_full_state(LM2Model(cfg, tensor_parallel(), seed=7))
        parallel_state.destroy_model_parallel()
    torch.testing.assert_close(weights[2], weights[1], rtol=0, atol=0)


def test_tp2_initialises_exactly_the_tp1_weights():
    run_distributed(_tp2_initialises_the_tp1_weights, world_size=2, args=(300,))


def _bad_tp(cfg_kwargs, match):
    init_distributed(tp=2)
    with pytest.raises(ConfigError, match=match):
        LM2Model(tiny_config(**cfg_kwargs), tensor_parallel())


def test_model_refuses_heads_that_do_not_split_over_tp():
    run_distributed(
        _bad_tp,
        world_size=2,
        args=(
            {"num_heads": 3, "num_kv_heads": 1, "hidden_size": 48},
            "num_kv_heads=1 must be divisible by the tensor-parallel size 2",
        ),
    )
