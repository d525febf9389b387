"""Bad configs fail up front with a message that names the field and the fix."""

import pytest

from lm2.model.config import MemoryConfig
from lm2.model.errors import ConfigError
from lm2.pipeline.config import load_config
from tests.model.tiny import tiny_config


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(hidden_size=65), "hidden_size=65 must be divisible by num_heads=4"),
        (dict(num_kv_heads=3), "num_heads=4 must be a multiple of num_kv_heads=3"),
        (dict(row_length=36), "row_length=36 must be a multiple of segment_length=8"),
        (dict(num_layers=0), "num_layers must be a positive integer"),
        (dict(vocab_size=-5), "vocab_size must be a positive integer"),
        (
            dict(memory=MemoryConfig(heads=3)),
            r"memory.dim \(defaults to hidden_size=64\) = 64 must be divisible by memory.heads=3",
        ),
        (dict(memory=MemoryConfig(layers=[0, 2])), "memory.layers contains 2"),
        (dict(hidden_size=20, num_heads=4, num_kv_heads=2), "head dim hidden_size/num_heads=5 must be even for RoPE"),
    ],
)
def test_model_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(slots=0), "memory.slots must be a positive integer"),
        (dict(bptt_segments=0), "memory.bptt_segments must be an integer >= 2"),
        (dict(bptt_segments=1), "memory.bptt_segments must be an integer >= 2, got 1: with 1 every segment"),
        (dict(dim=30, heads=4), "memory.dim=30 must be divisible by memory.heads=4"),
    ],
)
def test_memory_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MemoryConfig(**kwargs)


def test_vanilla_does_not_need_whole_segments():
    assert tiny_config(with_memory=False, row_length=36).num_segments == 1


@pytest.mark.parametrize(
    "tp,message",
    [
        (4, "num_kv_heads=2 must be divisible by the tensor-parallel size 4"),
        (3, "num_kv_heads=2 must be divisible by the tensor-parallel size 3"),
    ],
)
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


@pytest.mark.parametrize(
    "text,overrides,message",
    [
        ("model:\n  vocab_size: 10\n", [], "model is missing required key"),
        ("model: {}\nmodle: {}\n", [], "unknown key.s. modle in RunConfig; known keys: model"),
        (None, ["model.hidden_size=big"], "model.hidden_size must be an integer, got 'big'"),
        (None, ["model.memory.slotz=3"], "unknown key.s. slotz in model.memory"),
        (None, ["model.memory.enabled=1"], "model.memory.enabled must be true or false"),
        (None, ["model.hidden_size"], "must look like section.key=value"),
        (None, ["optim.decay=cosin"], "optim.decay must be cosine or linear, got 'cosin'"),
        (None, ["parallel.zero_stage=true"], "parallel.zero_stage must be 0, 1, 2 or 3, got True"),
    ],
)
def test_load_config_errors(tmp_path, text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(text if text is not None else open("configs/tiny.yaml").read())
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


def test_missing_config_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        "configs/tiny.yaml", ["model.memory.slots=32", "model.rope_theta=1e4", "model.memory.layers=[0, 2]"]
    )
    assert cfg.model.memory.slots == 32 and cfg.model.rope_theta == 10000.0 and cfg.model.memory.layers == [0, 2]


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.norm_eps=0", "norm_eps must be positive"),
        ("model.norm_eps=-1e-5", "norm_eps must be positive"),
        ("model.init_std=0", "init_std must be positive"),
        ("model.rope_theta=.inf", "model.rope_theta must be a finite number"),
        ("optim.lr=.nan", "optim.lr must be a finite number"),
        ("optim.eps=0", "optim.eps must be positive"),
        ("optim.beta2=1.0", "optim.beta1 and optim.beta2 must lie in"),
        ("optim.min_lr=1.0", "optim.min_lr=1.0 must lie between 0 and optim.lr"),
        ("optim.grad_clip=-1", "optim.grad_clip must be >= 0"),
        ("parallel.tp=0", "parallel.tp must be a positive integer, got 0"),
        ("parallel.pp=-2", "parallel.pp must be a positive integer, got -2"),
        ("train.seed=-1", r"train.seed must lie in \[0, 2\*\*32\)"),
        ("train.micro_batch=0", "train.micro_batch must be positive"),
        ("train.peak_tflops=-1", "train.peak_tflops must be >= 0"),
        ("checkpoint.keep=0", "checkpoint.keep must be >= 1"),
        ("data.num_workers=-1", "data.num_workers must be >= 0"),
        ("logging.run_dir=''", "logging.run_dir is empty"),
    ],
)
def test_numeric_fields_are_range_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", [override])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  vocab_size: 400\n  hidden_size: [64\n  num_layers: 2\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}:4:") and "YAML syntax error" in message and "\n" not in message


def test_an_override_that_is_not_yaml_is_a_config_error():
    with pytest.raises(ConfigError, match=r"override 'model.memory.layers=\[0,': the value is not valid YAML"):
        load_config("configs/tiny.yaml", ["model.memory.layers=[0,"])


@pytest.mark.parametrize(
    "overrides,world_size,message",
    [
        (
            ["parallel.tp=2", "model.num_kv_heads=1"],
            2,
            "num_kv_heads=1 must be divisible by the tensor-parallel size 2",
        ),
        (["parallel.tp=2"], 3, "world size 3 is not divisible by parallel.tp . parallel.pp = 2"),
        (["parallel.pp=8"], 8, "parallel.pp=8 exceeds num_layers=4"),
        ([], 3, r"train.global_batch=16 must be a multiple of train.micro_batch \* data-parallel size = 4 \* 3"),
    ],
)
def test_validate_checks_the_layout_against_the_world_size(overrides, world_size, message):
    run = load_config("configs/tiny.yaml", overrides)
    with pytest.raises(ConfigError, match=message):
        run.validate(world_size)


def test_validate_returns_the_degrees():
    dims = load_config("configs/tiny.yaml", ["parallel.tp=2", "parallel.pp=2"]).validate(8)
    assert (dims.tp, dims.pp, dims.dp) == (2, 2, 2)


def test_a_hash_in_an_override_is_part_of_the_value_never_a_comment():
    """`logging.run_dir='runs/exp #3'` reaches lm2 as `runs/exp #3` (the shell drops the quotes); YAML would read
    ` #3` as a comment and the run would write to runs/exp."""
    run = load_config("configs/tiny.yaml", ["logging.run_dir=runs/exp #3", "data.streams=[{path: data/a #1}]"])
    assert run.logging.run_dir == "runs/exp #3" and run.data.streams[0].path == "data/a #1"
    assert load_config("configs/tiny.yaml", ["logging.run_dir='runs/b #4'"]).logging.run_dir == "runs/b #4"
    with pytest.raises(ConfigError, match=r"train.steps must be an integer, got '5 #6'"):
        load_config("configs/tiny.yaml", ["train.steps=5 #6"])


def test_every_shipped_config_writes_to_a_run_folder_of_its_own():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    configs = sorted([*root.glob("configs/*.yaml"), *root.glob("experiments/*/*.yaml")])
    folders = {path.name: load_config(path).logging.run_dir for path in configs}
    assert len(configs) >= 6 and len(set(folders.values())) == len(folders), folders


def test_options_and_overrides_in_the_order_people_type_them():
    from lm2.pipeline.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(
        ["train", "--config", "C", "a.b=1", "--resume", "auto", "c.d=2", "--accept-config-changes"]
    )
    assert (args.config, args.resume, args.overrides, args.accept_config_changes) == (
        "C",
        "auto",
        ["a.b=1", "c.d=2"],
        True,
    )
    args = parser.parse_args(["import", "hf", "llama", "a=1", "--config", "C", "--output", "o", "b=2"])
    assert (args.hf_dir, args.overrides) == ("llama", ["a=1", "b=2"])
    args = parser.parse_args(["launch", "local", "--nproc", "2", "--", "--config", "C", "x=1", "--resume", "auto"])
    assert args.train_args == ["--", "--config", "C", "x=1", "--resume", "auto"]  # passed on as typed
