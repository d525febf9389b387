"""Analytic parameter counts equal the built model's; the shipped configs load and `lm2 info` reports them."""

import subprocess
import sys
from pathlib import Path

import pytest

from lm2.model.accounting import forward_flops_per_token, parameter_counts
from lm2.model.config import MemoryConfig
from lm2.model.lm import LM2Model
from lm2.pipeline.config import load_config
from lm2.pipeline.parallel.mpu import tensor_parallel
from tests.model.tiny import tiny_config

CONFIGS = sorted(Path("configs").glob("*.yaml"))


@pytest.mark.parametrize("cfg", [
    tiny_config(), tiny_config(with_memory=False), tiny_config(tie_embeddings=True),
    tiny_config(memory=MemoryConfig(slots=10, dim=32, heads=4, layers=[1])),
], ids=["lm2", "vanilla", "tied", "memory-subset"])
def test_parameter_count_matches_built_model(single_process, cfg):
    model = LM2Model(cfg, tensor_parallel())
    counts = parameter_counts(cfg, vocab_size=model.padded_vocab_size)
    assert counts.total == sum(p.numel() for p in model.parameters())
    memory = sum(p.numel() for n, p in model.named_parameters() if ".memory." in n)
    assert counts.memory == memory


def test_memory_costs_flops_and_vanilla_does_not_pay_for_it():
    lm2, vanilla = tiny_config(), tiny_config(with_memory=False)
    assert forward_flops_per_token(lm2) > forward_flops_per_token(vanilla)
    assert parameter_counts(vanilla).memory == 0


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path):
    load_config(path).model.validate_for_tp(1)


def test_lm2_1b_has_the_paper_shape():
    model = load_config("configs/lm2-1b.yaml").model
    counts = parameter_counts(model)
    assert (model.num_layers, model.hidden_size, model.num_heads, model.num_kv_heads) == (16, 2048, 32, 8)
    assert (model.memory.slots, model.memory_dim) == (2048, 2048)
    assert 1.1e9 < counts.embedding + counts.backbone < 1.3e9  # Llama-3.2-1B: 1.24B
    assert 0.3e9 < counts.memory < 0.6e9  # the paper: +0.54B (see README: head-local gates are smaller)


def test_info_command_prints_counts():
    out = subprocess.run([sys.executable, "-m", "lm2.pipeline.cli", "info", "--config", "configs/tiny.yaml",
                          "model.memory.slots=32"], capture_output=True, text=True, check=True).stdout
    counts = parameter_counts(load_config("configs/tiny.yaml", ["model.memory.slots=32"]).model)
    assert f"({counts.total:,})" in out and "32 slots" in out


def test_info_command_reports_config_errors_without_traceback():
    result = subprocess.run([sys.executable, "-m", "lm2.pipeline.cli", "info", "--config", "configs/tiny.yaml",
                             "model.hidden_size=130"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "hidden_size=130 must be divisible by num_heads=4" in result.stderr and "Traceback" not in result.stderr
