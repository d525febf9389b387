"""`lm2 import hf`: a tiny random Hugging Face Llama made here becomes a step-0 checkpoint at TP=2 whose backbone
exports back bit-identical, whose memory is a fresh run's, and which `lm2 train --resume` continues."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm2.model.errors import ExportError
from lm2.pipeline.hf.export import export_hf
from lm2.pipeline.hf.importer import import_hf

CONFIG = Path(__file__).parent / "tiny_train.yaml"
TINY_LR = ["optim.lr=1e-6", "optim.min_lr=0", "optim.warmup_steps=0"]  # one resumed step moves weights ~1e-6


def tiny_llama(folder: Path) -> dict[str, torch.Tensor]:
    """A random LlamaForCausalLM of tiny_train.yaml's backbone shape, saved to folder; returns its weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(11)
    config = LlamaConfig(
        vocab_size=400,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():  # norms too: a weight left at its init value would hide a mix-up
            param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    return load_file(folder / "model.safetensors")


def lm2_command(*args: str, processes: int = 2) -> str:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        "--standalone",
        "-m",
        "lm2.pipeline.cli",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def import_and_export(tmp_path: Path, run: list[str]) -> tuple[dict, dict, Path]:
    """A tiny Llama imported with `run` overrides and exported back: (Llama weights, exported weights, checkpoints)."""
    llama = tiny_llama(tmp_path / "llama")
    imported = tmp_path / "imported"
    out = lm2_command("import", "hf", str(tmp_path / "llama"), *run, "--config", str(CONFIG), "--output", str(imported))
    assert f"wrote {imported / 'step_00000000'}" in out
    export_hf(imported, tmp_path / "back", progress=False)
    return llama, load_file(tmp_path / "back" / "model.safetensors"), imported


def assert_backbone_equal_and_memory_fresh(llama: dict, back: dict, run: list[str]) -> None:
    assert set(llama) <= set(back)
    for name, tensor in llama.items():
        assert torch.equal(back[name], tensor), name
    fresh = fresh_memory(run)
    memory = {name: tensor for name, tensor in back.items() if ".memory." in name}
    assert memory.keys() == fresh.keys() and len(memory) == 4 * 14
    for name, tensor in fresh.items():
        assert torch.equal(memory[name], tensor), name


@pytest.mark.slow
def test_import_at_tp2_exports_back_equal_and_resumes(train_data, tmp_path):
    run = [*train_data, *TINY_LR, "parallel.tp=2", "logging.wandb=disabled"]
    llama, back, imported = import_and_export(tmp_path, run)
    assert_backbone_equal_and_memory_fresh(llama, back, run)

    resumed = tmp_path / "resumed"
    out = lm2_command(
        "train",
        "--config",
        str(CONFIG),
        *run,
        f"logging.run_dir={resumed}",
        "train.steps=1",
        "--resume",
        str(imported / "step_00000000"),
    )
    assert "resumed from" in out and "step 1/1" in out
    export_hf(resumed / "checkpoints", tmp_path / "trained", progress=False)
    trained = load_file(tmp_path / "trained" / "model.safetensors")
    moved = max((trained[name] - tensor).abs().max().item() for name, tensor in llama.items())
    assert 0 < moved < 1e-4  # trained one step from the Llama weights (DeepSpeed's fp32 master copy included)


def test_import_at_zero3_refreshes_the_partitioned_master_weights(train_data, tmp_path):
    """A ZeRO-3 checkpoint keeps weights only as the optimizer's fp32 partitions, which export reads."""
    run = [*train_data, "parallel.zero_stage=3", "logging.wandb=disabled"]
    llama, back, _ = import_and_export(tmp_path, run)
    assert_backbone_equal_and_memory_fresh(llama, back, run)


def fresh_memory(overrides: list[str]) -> dict[str, torch.Tensor]:
    """The memory tensors a new run of the config starts from (lm2 initialises them the same at any TP degree)."""
    from lm2.model.lm import LM2Model
    from lm2.pipeline.config import load_config
    from lm2.pipeline.hf.names import to_hf
    from lm2.pipeline.parallel.init import world_of_one
    from lm2.pipeline.parallel.mpu import tensor_parallel
    from lm2.pipeline.parallel.tp_shards import gather_full_state

    run = load_config(CONFIG, [o for o in overrides if not o.startswith("parallel.")])
    with world_of_one():
        state = gather_full_state(LM2Model(run.model, tensor_parallel(), seed=run.train.seed))
    return {name: tensor for name, tensor in to_hf(state).items() if ".memory." in name}


def test_import_refuses_a_shape_mismatch_naming_the_field(train_data, tmp_path):
    tiny_llama(tmp_path / "llama")
    with pytest.raises(
        ExportError,
        match=r"num_hidden_layers=4 but the config has model.num_layers=2: set "
        r"model.num_layers=4",
    ):
        import_hf(tmp_path / "llama", str(CONFIG), tmp_path / "out", [*train_data, "model.num_layers=2"])
    assert not (tmp_path / "out").exists()


def test_import_refuses_a_malformed_config_json_in_one_line(tmp_path):
    from tests.distributed import lm2_cli

    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')  # cut short
    result = lm2_cli(
        ["import", "hf", str(tmp_path / "llama"), "--config", str(CONFIG), "--output", str(tmp_path / "o")]
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("lm2 import:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert "config.json is not valid JSON" in errors[0] and "save_pretrained" in errors[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


def test_import_refuses_an_output_that_holds_checkpoints_unless_forced(tmp_path):
    from lm2.pipeline.hf.importer import check_output

    (tmp_path / "step_00000300").mkdir()
    with pytest.raises(ExportError, match=r"already holds checkpoints \(step_00000300\): .* --force"):
        check_output(tmp_path, force=False)
    check_output(tmp_path, force=True)
    check_output(tmp_path / "new", force=False)
    (tmp_path / "step_00000000").mkdir()
    with pytest.raises(ExportError, match="step_00000000 exists"):
        check_output(tmp_path, force=True)
