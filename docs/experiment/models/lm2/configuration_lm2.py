"""Hugging Face configuration of LM2 (Large Memory Models, arXiv 2502.06049), written by lm2's exporter.

Standalone: imports only transformers. Copied into every exported LM2 folder next to modeling_lm2.py.
"""

from transformers import PretrainedConfig


class LM2Config(PretrainedConfig):
    """A Llama-style decoder whose blocks carry a gated memory bank, processed in segments.

    Args beyond Llama's:
        segment_length: S. Attention is causal inside a segment of S tokens (RoPE positions restart at 0 in each);
            across segments only the memory carries information.
        memory_slots: N, memory slots per block.
        memory_dim: d_m, the width of a slot (default hidden_size).
        memory_heads: H_m memory heads of width d_m / H_m.
        memory_layers: indices of the blocks that carry memory (None: every block).
        memory_write_rule: "paper", M' = g_in * tanh(u) + g_f * M, or "convex", M' = g_f * M + (1 - g_f) * tanh(u)
            (the input gate is then unused).
        memory_read_norm: RMS-normalise the memory before the read, per memory head, without a gain.
    """

    model_type = "lm2"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        segment_length=2048,
        memory_slots=2048,
        memory_dim=None,
        memory_heads=16,
        memory_layers=None,
        memory_write_rule="paper",
        memory_read_norm=False,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        initializer_range=0.02,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads
        self.segment_length = segment_length
        self.memory_slots = memory_slots
        self.memory_dim = memory_dim or hidden_size
        self.memory_heads = memory_heads
        self.memory_layers = memory_layers
        self.memory_write_rule = memory_write_rule
        self.memory_read_norm = memory_read_norm
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )

    def has_memory(self, layer: int) -> bool:
        return self.memory_layers is None or layer in self.memory_layers
