"""modeling_lm2.py (the standalone Hugging Face model) against lm2's model/ on random weights: the same logits
at several lengths, and generate() with its cache against greedy full forwards without cache."""

import dataclasses
import json

import pytest
import torch

from lm2.model.config import MemoryConfig, ModelConfig
from lm2.model.errors import ExportError
from lm2.model.lm import LM2Model
from lm2.pipeline.hf.folder import hf_model, write_folder
from lm2.pipeline.hf.verify import verify_export
from lm2.pipeline.parallel.mpu import tensor_parallel
from lm2.pipeline.parallel.tp_shards import gather_full_state

SPECIAL_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}


def lm2_model(tie: bool, memory_layers=None, **memory_fields) -> LM2Model:
    """A tiny LM2 whose every parameter is random (banks and gate biases too, so no initial value hides a bug);
    memory_fields: more MemoryConfig fields."""
    cfg = ModelConfig(
        vocab_size=300,
        hidden_size=48,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=80,
        row_length=24,
        segment_length=6,
        rope_theta=10000.0,
        tie_embeddings=tie,
        memory=MemoryConfig(slots=5, dim=32, heads=2, layers=memory_layers, **memory_fields),
    )
    model = LM2Model(cfg, tensor_parallel(), seed=3).eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(7)
        for param in model.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model


def reference_logits(model: LM2Model, tokens: torch.Tensor) -> torch.Tensor:
    """lm2's segment-by-segment path (forward_segment), which also takes a partial last segment."""
    S, vocab = model.cfg.segment_length, model.cfg.vocab_size
    memory, outputs = model.initial_memory(tokens.shape[0]), []
    for segment, start in enumerate(range(0, tokens.shape[1], S)):
        logits, memory = model.forward_segment(tokens[:, start : start + S], memory, segment)
        outputs.append(logits[..., :vocab])
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("tie,memory_layers", [(True, None), (False, [0, 2])], ids=["tied-all", "untied-some"])
def test_hf_model_matches_lm2_at_several_lengths(single_process, tie, memory_layers):
    model = lm2_model(tie, memory_layers)
    hf = hf_model(model.cfg, gather_full_state(model), SPECIAL_IDS).eval()
    S = model.cfg.segment_length
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 4 * S), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole_rows = model(tokens)[..., : model.cfg.vocab_size]  # the training forward: all segments batched
        assert (reference_logits(model, tokens) - whole_rows).abs().max() < 1e-5
        for length in (1, S - 1, S, S + 1, 3 * S - 2, 4 * S):
            ours = reference_logits(model, tokens[:, :length])
            theirs = hf(tokens[:, :length], use_cache=False).logits
            assert theirs.shape == ours.shape
            assert (theirs - ours).abs().max() < 1e-4, length
        # Memory matters: without the first segments the last segment's logits change.
        cut = hf(tokens[:, 3 * S :], use_cache=False).logits
        assert (cut - hf(tokens, use_cache=False).logits[:, 3 * S :]).abs().max() > 1e-3


def test_export_verifies_the_memory_stability_options(single_process, tmp_path):
    """With the convex write and the read norm, the folder `lm2 export hf --verify` writes gives lm2's logits; the
    options reach its config.json and change the logits (a folder of the same weights without them fails)."""
    model = lm2_model(tie=False, write_rule="convex", read_norm=True)
    state = gather_full_state(model)
    write_folder(hf_model(model.cfg, state, SPECIAL_IDS), tmp_path / "hf", "5GB")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["memory_write_rule"], config["memory_read_norm"]) == ("convex", True)
    assert verify_export(tmp_path / "hf", model.cfg, state) <= 1e-4
    for changed in (dict(write_rule="paper"), dict(read_norm=False)):
        other = dataclasses.replace(model.cfg, memory=dataclasses.replace(model.cfg.memory, **changed))
        with pytest.raises(ExportError, match="verification failed"):
            verify_export(tmp_path / "hf", other, state)


def test_generate_with_cache_equals_greedy_full_forwards(single_process):
    model = lm2_model(tie=True)
    hf = hf_model(model.cfg, gather_full_state(model), SPECIAL_IDS).eval()
    S = model.cfg.segment_length
    prompt = torch.randint(4, model.cfg.vocab_size, (2, S + 2), generator=torch.Generator().manual_seed(1))
    new_tokens = 2 * S + 3  # ends in the 4th segment: three memory writes happen while decoding or prefilling
    with torch.no_grad():
        generated = hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        tokens = prompt
        for _ in range(new_tokens):  # greedy decoding by full forwards from scratch, no cache
            logits = hf(tokens, use_cache=False).logits
            tokens = torch.cat((tokens, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert generated.shape[1] == prompt.shape[1] + new_tokens > 3 * S
    assert torch.equal(generated, tokens)
    # Prefill in uneven chunks through the cache gives the logits of one forward.
    with torch.no_grad():
        whole = hf(tokens, use_cache=False).logits
        cache, chunks = None, []
        for start, end in ((0, 4), (4, 5), (5, 17), (17, tokens.shape[1])):
            out = hf(tokens[:, start:end], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            chunks.append(out.logits)
    assert (torch.cat(chunks, dim=1) - whole).abs().max() < 1e-5


def test_a_long_document_chunk_by_chunk_through_the_cache_equals_one_call(single_process):
    """Over 64 segments, calls of chunk sizes that do not divide the segment length (and one that spans several
    segments), each continuing the cache the last returned, give the logits of one call over the document: in
    fp64 to rounding (the same function), in fp32 within export's verification tolerance (attention over cached
    keys rounds differently from one causal attention, and 64 memory writes carry that on)."""
    model = lm2_model(tie=False)
    hf = hf_model(model.cfg, gather_full_state(model), SPECIAL_IDS).eval()
    S = model.cfg.segment_length
    tokens = torch.randint(4, model.cfg.vocab_size, (1, 64 * S + 5), generator=torch.Generator().manual_seed(2))
    sizes = [3, S + 1, 2 * S - 3, 1, 5 * S + 7]
    for dtype, tolerance in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        hf = hf.to(dtype)
        with torch.no_grad():
            whole = hf(tokens, use_cache=False).logits
            cache, chunks, start, turn = None, [], 0, 0
            while start < tokens.shape[1]:
                end = min(start + sizes[turn % len(sizes)], tokens.shape[1])
                out = hf(tokens[:, start:end], past_key_values=cache, use_cache=True)
                cache, start, turn = out.past_key_values, end, turn + 1
                chunks.append(out.logits)
        assert cache.seen == tokens.shape[1] and turn > 20
        assert (torch.cat(chunks, dim=1) - whole).abs().max() < tolerance, dtype


def test_generate_computes_only_the_last_positions_logits(single_process):
    """generate() asks for logits_to_keep=1, as for transformers' Llama: a long prompt's forward projects one
    position onto the vocabulary, not all of them (at 128K tokens and a 128K vocabulary that would be 67 GB)."""
    model = lm2_model(tie=True)
    hf = hf_model(model.cfg, gather_full_state(model), SPECIAL_IDS).eval()
    S = model.cfg.segment_length
    prompt = torch.randint(4, model.cfg.vocab_size, (1, 3 * S + 2), generator=torch.Generator().manual_seed(2))
    projected = []  # positions the output layer saw, per forward
    hook = hf.lm_head.register_forward_hook(lambda module, args, output: projected.append(args[0].shape[1]))
    with torch.no_grad():
        generated = hf.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        hook.remove()
        whole = hf(prompt, use_cache=False).logits
        last = hf(prompt, use_cache=False, logits_to_keep=2).logits
    assert projected == [1, 1, 1, 1]  # the prompt's forward, then three decoding steps
    assert last.shape == (1, 2, model.cfg.vocab_size)
    assert (last - whole[:, -2:]).abs().max() < 1e-5
    assert generated[0, prompt.shape[1]] == whole[0, -1].argmax()
    with pytest.raises(ValueError, match="labels need the logits of every position"):
        hf(prompt, labels=prompt, logits_to_keep=1)
