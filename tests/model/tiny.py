"""Small model configs for the model tests (fp32, CPU, seconds)."""

from lm2.model.config import MemoryConfig, ModelConfig


def tiny_config(with_memory: bool = True, memory_fields: dict | None = None, **overrides) -> ModelConfig:
    """memory_fields: MemoryConfig fields over the tiny defaults (configs are frozen: build them, never mutate)."""
    memory = MemoryConfig(**{**dict(enabled=with_memory, slots=6, heads=2, bptt_segments=2), **(memory_fields or {})})
    fields = dict(
        vocab_size=300,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden_size=96,
        row_length=32,
        segment_length=8,
        rope_theta=10000.0,
        memory=memory,
    )
    fields.update(overrides)
    return ModelConfig(**fields)
