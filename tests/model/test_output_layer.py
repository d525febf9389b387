"""The output layer: vocabulary padding columns take no probability and no gradient, real columns are the plain
projection, and each TP rank knows which of its columns are real."""

import pytest
import torch

from lm2.model.layers import TensorParallel
from lm2.model.lm import LM2Model, mean_loss, real_vocab_columns
from lm2.pipeline.parallel.mpu import tensor_parallel
from tests.model.tiny import tiny_config


@pytest.mark.parametrize("vocab_size,tp", [(300, 1), (300, 2), (300, 4), (384, 1), (1000, 4)])
def test_real_columns_of_every_rank_are_the_columns_below_the_vocabulary_size(vocab_size, tp):
    cfg = tiny_config(vocab_size=vocab_size)
    local = cfg.padded_vocab_size(tp) // tp
    for rank in range(tp):
        context = TensorParallel(config=None, group=None, rank=rank, size=tp)  # the count needs rank and size only
        real = [rank * local + column < vocab_size for column in range(local)]
        assert real_vocab_columns(cfg, context) == sum(real)
        assert real == sorted(real, reverse=True)  # real columns first, so a prefix describes them


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("vocab_size", [300, 384])  # padded to 384: 84 padding columns, then none
def test_padding_columns_sit_at_the_minimum_and_get_no_gradient(single_process, vocab_size, tied):
    cfg = tiny_config(vocab_size=vocab_size, tie_embeddings=tied)
    model = LM2Model(cfg, tensor_parallel(), seed=0)
    tokens = torch.randint(0, vocab_size, (2, cfg.row_length), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    assert logits.shape[-1] == 384

    h = model.embed_tokens(tokens)
    for layer in model.layers:
        h = layer(h)
    output_weight = model.embed_tokens.weight if tied else model.lm_head.weight
    projection = model.norm(h) @ output_weight.T
    torch.testing.assert_close(logits[..., :vocab_size], projection[..., :vocab_size], rtol=1e-5, atol=1e-6)
    assert (logits[..., vocab_size:] == torch.finfo(logits.dtype).min).all()

    mean_loss(logits, torch.roll(tokens, -1, dims=1)).backward()
    assert output_weight.grad[vocab_size:].abs().sum() == 0  # padding rows: no output (nor input) gradient
    assert output_weight.grad[:vocab_size].abs().sum() > 0
