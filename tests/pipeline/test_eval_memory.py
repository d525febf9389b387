"""`lm2 eval memory` against an independent computation: the slot norms read from the model's own cache after
every segment, the loss of one pass over the text, and the loss of a copy whose memory reads are gated shut."""

import copy
import json

import pytest
import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM

from lm2.model.errors import EvalError
from lm2.pipeline.cli import main
from lm2.pipeline.eval.memory import evaluate_memory

SEGMENTS = 12


def loss(model, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(tokens[None, :-1], use_cache=False).logits[0]
    return float(torch.nn.functional.cross_entropy(logits, tokens[1:]))


def test_slot_norms_and_losses_with_the_read_on_and_off(hf_lm2, text_inputs, tokenizer_path, tmp_path, capsys):
    text = text_inputs / "macbeth.txt"
    assert (
        main(
            [
                "eval",
                "memory",
                "--model",
                str(hf_lm2),
                "--text",
                str(text),
                "--segments",
                str(SEGMENTS),
                "--output",
                str(tmp_path / "out"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "with the memory read on" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "memory.json").read_text())
    assert (tmp_path / "out" / "memory.png").stat().st_size > 1000

    model = AutoModelForCausalLM.from_pretrained(hf_lm2, trust_remote_code=True).eval()
    length = model.config.segment_length
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    tokens = torch.tensor(processor.encode(text.read_text())[: SEGMENTS * length + 1])
    cache, means, largest = None, [], []
    with torch.no_grad():
        for start in range(0, SEGMENTS * length, length):  # one segment per call: the cache holds M after each
            cache = model(tokens[None, start : start + length], past_key_values=cache, use_cache=True).past_key_values
            slots = torch.stack([m.flatten(-2).norm(dim=-1) for m in cache.memory if m is not None])
            means.append(slots.mean(dim=(1, 2)).tolist())
            largest.append(slots.amax(dim=(1, 2)).tolist())
    for block, (index, norms) in enumerate(results["slot_norms"].items()):
        assert norms["mean"] == pytest.approx([row[block] for row in means], rel=1e-5), index
        assert norms["max"] == pytest.approx([row[block] for row in largest], rel=1e-5), index
    assert results["loss_memory_on"] == pytest.approx(loss(model, tokens), rel=1e-5)
    shut = copy.deepcopy(model)
    with torch.no_grad():
        for layer in shut.model.layers:
            layer.memory.out_gate_bias.fill_(-1e4)  # sigmoid gives exactly 0: the read is gated shut
    assert results["loss_memory_off"] == pytest.approx(loss(shut, tokens), rel=1e-5)
    assert results["loss_memory_off"] != results["loss_memory_on"]  # the random model reads its memory a little


def test_a_vanilla_model_or_too_short_a_text_is_refused(hf_vanilla, hf_lm2, text_inputs, tmp_path):
    with pytest.raises(EvalError, match="no memory"):
        evaluate_memory(str(hf_vanilla), [str(text_inputs / "macbeth.txt")], 4, tmp_path, "cpu")
    with pytest.raises(EvalError, match="fewer than"):
        evaluate_memory(str(hf_lm2), [str(text_inputs / "macbeth.txt")], 100000, tmp_path, "cpu")
