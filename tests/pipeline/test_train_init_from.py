"""`train.init_from`: a run built from another run's checkpoint (written at TP=1, loaded at TP=2 or PP=2), from its
Hugging Face export, or from a Llama, holds exactly those weights with a fresh optimizer, schedule and data
position; a run that resumes its own checkpoint ignores it; a source of another shape is refused naming the field."""

import shutil
from pathlib import Path

import pytest
import torch

from lm2.model.errors import ConfigError
from lm2.pipeline.checkpoint.reader import read_full_state, resolve
from lm2.pipeline.checkpoint.verify import verify
from lm2.pipeline.config import load_config
from tests.distributed import lm2_cli, run_distributed

pytestmark = pytest.mark.xdist_group("init-from")  # the tests share one trained source run
CONFIG = Path(__file__).parent / "tiny_train.yaml"


@pytest.fixture(scope="module")
def source(train_data, tmp_path_factory) -> Path:
    """The checkpoints folder of a 2-step run in one process (TP=1)."""
    run_dir = tmp_path_factory.mktemp("init_source") / "run"
    result = lm2_cli(
        ["train", "--config", str(CONFIG), f"logging.run_dir={run_dir}", "logging.wandb=disabled", "train.steps=2"]
        + train_data
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "checkpoints"


def checkpoint_weights(checkpoints: Path) -> dict[str, torch.Tensor]:
    folder = resolve(checkpoints)
    return read_full_state(folder, verify(folder).manifest)


def _build_and_compare(overrides: list[str], expected: dict, fresh_memory: bool, expect_start: str | None) -> None:
    """Builds the run (every rank) and checks that it holds `expected` (the memory a new run's where fresh_memory),
    starts at step 0 with the warmup's first learning rate, and records where its weights came from."""
    from lm2.model.lm import LM2Model
    from lm2.pipeline.parallel.tp_shards import gather_full_state
    from lm2.pipeline.train.build import build
    from lm2.pipeline.train.engine import full_model_state, lr_factor

    run = load_config(CONFIG, overrides)
    parts = build(run)
    state = full_model_state(parts.engine, run.model.vocab_size, run.model.num_layers)
    if fresh_memory:  # one process: a TP=1 model of the run's seed holds the weights a new run starts with
        from lm2.pipeline.parallel.mpu import tensor_parallel

        new = gather_full_state(LM2Model(run.model, tensor_parallel(), seed=run.train.seed))
        expected = {**{n: t for n, t in new.items() if ".memory." in n}, **expected}
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor.float()), name
    assert parts.start.step == 0 and parts.start.resumed_from is None
    assert not parts.engine.deepspeed.optimizer.state  # no Adam moments yet
    assert str(parts.start.initialised_from) == expect_start
    lr = parts.engine.deepspeed.optimizer.param_groups[0]["lr"]
    assert lr == pytest.approx(run.optim.lr * lr_factor(0, run.optim, run.train.steps))


@pytest.mark.parametrize("layout", ["parallel.tp=2", pytest.param("parallel.pp=2", marks=pytest.mark.slow)])
def test_a_run_starts_with_the_weights_of_a_checkpoint_of_another_layout(source, train_data, tmp_path, layout):
    overrides = [*train_data, f"logging.run_dir={tmp_path}", f"train.init_from={source}", layout]
    folder = str(resolve(source))
    run_distributed(_build_and_compare, 2, (overrides, checkpoint_weights(source), False, folder))


def test_a_run_starts_from_a_hugging_face_export_and_from_a_llama(source, train_data, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lm2.pipeline.hf.export import export_hf
    from lm2.pipeline.hf.names import from_hf

    export_hf(source, tmp_path / "hf", progress=False)
    weights = checkpoint_weights(source)
    overrides = [*train_data, f"logging.run_dir={tmp_path / 'from-hf'}", f"train.init_from={tmp_path / 'hf'}"]
    run_distributed(_build_and_compare, 1, (overrides, weights, False, str(tmp_path / "hf")))
    # A Llama of the backbone's shape: its weights, and the memory of a new run.
    torch.manual_seed(0)
    model = load_config(CONFIG).model
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=model.vocab_size,
            hidden_size=model.hidden_size,
            intermediate_size=model.ffn_hidden_size,
            num_hidden_layers=model.num_layers,
            num_attention_heads=model.num_heads,
            num_key_value_heads=model.num_kv_heads,
            rope_theta=model.rope_theta,
            rms_norm_eps=model.norm_eps,
            tie_word_embeddings=model.tie_embeddings,
        )
    )
    llama.save_pretrained(tmp_path / "llama")
    backbone = {n: t for n, t in from_hf(llama.state_dict()).items() if n != "lm_head.weight"}
    overrides = [*train_data, f"logging.run_dir={tmp_path / 'from-llama'}", f"train.init_from={tmp_path / 'llama'}"]
    run_distributed(_build_and_compare, 1, (overrides, backbone, True, str(tmp_path / "llama")))


def _resumes(overrides: list[str], own: Path) -> None:
    from lm2.pipeline.train.build import build
    from lm2.pipeline.train.engine import full_model_state

    run = load_config(CONFIG, overrides)
    parts = build(run)
    assert parts.start.resumed_from == own and parts.start.initialised_from is None and parts.start.step == 2
    state = full_model_state(parts.engine, run.model.vocab_size, run.model.num_layers)
    for name, tensor in checkpoint_weights(own.parent).items():
        assert torch.equal(state[name], tensor), name


def test_a_run_resuming_its_own_checkpoint_ignores_init_from(source, train_data, tmp_path):
    """A requeued fine-tuning job (checkpoint.resume=auto) continues from its own checkpoint: init_from names
    other weights (the source's step 1 is not kept, so a Llama), which it must not load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = load_config(CONFIG).model
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=model.vocab_size,
            hidden_size=model.hidden_size,
            intermediate_size=model.ffn_hidden_size,
            num_hidden_layers=model.num_layers,
            num_attention_heads=model.num_heads,
            num_key_value_heads=model.num_kv_heads,
            rope_theta=model.rope_theta,
            rms_norm_eps=model.norm_eps,
            tie_word_embeddings=model.tie_embeddings,
        )
    ).save_pretrained(tmp_path / "llama")
    shutil.copytree(source.parent, tmp_path / "run")
    overrides = [*train_data, f"logging.run_dir={tmp_path / 'run'}", "train.steps=2", "checkpoint.resume=auto"]
    overrides.append(f"train.init_from={tmp_path / 'llama'}")
    run_distributed(_resumes, 1, (overrides, resolve(tmp_path / "run" / "checkpoints")))


def test_a_source_of_another_shape_is_refused_naming_the_field(source, train_data, tmp_path):
    args = ["train", "--config", str(CONFIG), f"logging.run_dir={tmp_path / 'run'}", "logging.wandb=disabled"]
    args += [*train_data, f"train.init_from={source}", "model.ffn_hidden_size=128"]
    result = lm2_cli(args)
    err = [line for line in result.stderr.splitlines() if line.startswith("lm2 train:")]
    assert result.returncode == 2 and len(err) == 1, result.stderr[-3000:]
    assert f"train.init_from {resolve(source)} has model.ffn_hidden_size=96 but the config says 128" in err[0]
    assert "set model.ffn_hidden_size=96" in err[0]
    missing = lm2_cli([*args[:-2], f"train.init_from={tmp_path / 'nothing'}"])
    assert missing.returncode == 2 and "train.init_from" in missing.stderr and "does not exist" in missing.stderr


def test_hugging_face_configs_are_compared_field_by_field():
    """An LM2 export's config.json is compared with the run's model, defaults resolved; a Llama gives the backbone
    only, so any memory settings accept it."""
    from lm2.pipeline.train.init_from import architecture, check_architecture, hf_architecture

    model = load_config(CONFIG).model
    lm2 = {
        "model_type": "lm2",
        "vocab_size": 400,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
        "tie_word_embeddings": True,
        "memory_slots": 6,
        "memory_dim": 64,
        "memory_heads": 2,
        "memory_layers": None,
    }
    assert hf_architecture(lm2) == architecture(model)
    with pytest.raises(ConfigError, match=r"has model.memory.slots=8 but the config says 6: set model.memory.slots=8"):
        check_architecture(Path("x"), hf_architecture({**lm2, "memory_slots": 8}), model)
    llama = {k: v for k, v in lm2.items() if not k.startswith("memory")} | {"model_type": "llama"}
    check_architecture(Path("x"), hf_architecture(llama), model)
    with pytest.raises(ConfigError, match="has model.memory.enabled=True but the config says False"):
        vanilla = load_config(CONFIG, ["model.memory.enabled=false"]).model
        check_architecture(Path("x"), hf_architecture(lm2), vanilla)
