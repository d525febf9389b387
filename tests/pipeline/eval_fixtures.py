"""Tiny Hugging Face folders for the evaluation tests: a random LM2 (remote code, segments of 16 tokens) and a
random vanilla Llama holding 64 tokens, both with the sentencepiece tokenizer of tests/pipeline/conftest.py."""

from pathlib import Path

import torch

VOCAB = 512
VANILLA_TOKENS = 64


def lm2_folder(tokenizer_path: Path, out: Path) -> Path:
    from lm2.pipeline.hf.folder import special_token_ids, write_tokenizer
    from lm2.pipeline.hf.modeling_lm2 import LM2Config, LM2ForCausalLM

    torch.manual_seed(0)
    config = LM2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        segment_length=16,
        memory_slots=4,
        memory_heads=2,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        **special_token_ids(tokenizer_path),
    )
    LM2ForCausalLM(config).save_pretrained(out)  # hf.folder registered the class: the folder gets its code
    write_tokenizer(tokenizer_path, out)
    return out


def vanilla_folder(tokenizer_path: Path, out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lm2.pipeline.hf.folder import special_token_ids, write_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=VANILLA_TOKENS,
        tie_word_embeddings=True,
        **special_token_ids(tokenizer_path),
    )
    LlamaForCausalLM(config).save_pretrained(out)
    write_tokenizer(tokenizer_path, out)
    return out
