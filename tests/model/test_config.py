"""Bad configs fail up front with a message that names the field and the fix."""

import pytest

from lm2.model.config import MemoryConfig
from lm2.model.errors import ConfigError
from lm2.pipeline.config import load_config
from tests.model.tiny import tiny_config


@pytest.mark.parametrize("overrides,message", [
    (dict(hidden_size=65), "hidden_size=65 must be divisible by num_heads=4"),
    (dict(num_kv_heads=3), "num_heads=4 must be a multiple of num_kv_heads=3"),
    (dict(row_length=36), "row_length=36 must be a multiple of segment_length=8"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
    (dict(vocab_size=-5), "vocab_size must be a positive integer"),
    (dict(memory=MemoryConfig(heads=3)), r"memory.dim \(defaults to hidden_size=64\) = 64 must be divisible by memory.heads=3"),
    (dict(memory=MemoryConfig(layers=[0, 2])), "memory.layers contains 2"),
    (dict(hidden_size=20, num_heads=4, num_kv_heads=2), "head dim hidden_size/num_heads=5 must be even for RoPE"),
])
def test_model_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides)


@pytest.mark.parametrize("kwargs,message", [
    (dict(slots=0), "memory.slots must be a positive integer"),
    (dict(bptt_segments=0), "memory.bptt_segments must be an integer >= 2"),
    (dict(bptt_segments=1), "memory.bptt_segments must be an integer >= 2, got 1: with 1 every segment"),
    (dict(dim=30, heads=4), "memory.dim=30 must be divisible by memory.heads=4"),
])
def test_memory_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MemoryConfig(**kwargs)


def test_vanilla_does_not_need_whole_segments():
    assert tiny_config(with_memory=False, row_length=36).num_segments == 1


@pytest.mark.parametrize("tp,message", [
    (4, "num_kv_heads=2 must be divisible by the tensor-parallel size 4"),
    (3, "num_kv_heads=2 must be divisible by the tensor-parallel size 3"),
])
def test_tp_errors(tp, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config().validate_for_tp(tp)


def test_memory_heads_must_split_over_tp():
    cfg = tiny_config(num_heads=4, num_kv_heads=4, memory=MemoryConfig(heads=2))
    with pytest.raises(ConfigError, match="memory.heads=2 must be divisible by the tensor-parallel size 4"):
        cfg.validate_for_tp(4)


def test_padded_vocab_is_a_multiple_of_tp_times_128():
    cfg = tiny_config(vocab_size=300)
    assert [cfg.padded_vocab_size(tp) for tp in (1, 2, 4)] == [384, 512, 512]


@pytest.mark.parametrize("text,overrides,message", [
    ("model:\n  vocab_size: 10\n", [], "model is missing required key"),
    ("model: {}\nmodle: {}\n", [], "unknown key.s. modle in RunConfig; known keys: model"),
    (None, ["model.hidden_size=big"], "model.hidden_size must be an integer, got 'big'"),
    (None, ["model.memory.slotz=3"], "unknown key.s. slotz in model.memory"),
    (None, ["model.memory.enabled=1"], "model.memory.enabled must be true or false"),
    (None, ["model.hidden_size"], "must look like section.key=value"),
    (None, ["optim.decay=cosin"], "optim.decay must be cosine or linear, got 'cosin'"),
    (None, ["parallel.zero_stage=true"], "parallel.zero_stage must be 0, 1, 2 or 3, got True"),
])
def test_load_config_errors(tmp_path, text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(text if text is not None else open("configs/tiny.yaml").read())
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


def test_missing_config_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_typed_and_nested():
    cfg = load_config("configs/tiny.yaml", ["model.memory.slots=32", "model.rope_theta=1e4",
                                            "model.memory.layers=[0, 2]"])
    assert cfg.model.memory.slots == 32 and cfg.model.rope_theta == 10000.0 and cfg.model.memory.layers == [0, 2]
