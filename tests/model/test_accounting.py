"""Analytic parameter and FLOP counts equal the built model's and hand computations; the shipped configs load to
what their YAML says; `lm2 info` reports the counts and runs the trainer's validation."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lm2.model import memory_backend
from lm2.model.accounting import forward_flops_per_token, parameter_counts
from lm2.model.config import MemoryConfig
from lm2.model.lm import LM2Model
from lm2.pipeline.config import load_config
from lm2.pipeline.parallel.mpu import tensor_parallel
from tests.model.tiny import tiny_config

CONFIGS = sorted(Path("configs").glob("*.yaml"))


@pytest.mark.parametrize(
    "cfg",
    [
        tiny_config(),
        tiny_config(with_memory=False),
        tiny_config(tie_embeddings=True),
        tiny_config(memory=MemoryConfig(slots=10, dim=32, heads=4, layers=[1])),
        tiny_config(memory_fields=dict(write_rule="convex", read_norm=True)),
    ],
    ids=["lm2", "vanilla", "tied", "memory-subset", "stability-options"],
)
def test_parameter_count_matches_built_model(single_process, cfg):
    model = LM2Model(cfg, tensor_parallel())
    counts = parameter_counts(cfg, vocab_size=model.padded_vocab_size)
    assert counts.total == sum(p.numel() for p in model.parameters())
    memory = sum(p.numel() for n, p in model.named_parameters() if ".memory." in n)
    assert counts.memory == memory


@pytest.mark.parametrize(
    "cfg",
    [
        tiny_config(),
        tiny_config(with_memory=False),
        tiny_config(tie_embeddings=True),
        tiny_config(memory=MemoryConfig(slots=10, dim=32, heads=4, layers=[1])),
        tiny_config(memory_fields=dict(write_rule="convex", read_norm=True)),
    ],
    ids=["lm2", "vanilla", "tied", "memory-subset", "stability-options"],
)
def test_flops_equal_the_matmuls_of_a_forward(single_process, cfg):
    """torch's FLOP counter over one row, with attention decomposed into matmuls (SDPA's math kernel computes the
    whole S x S score matrix: the convention without causal discount). The output layer's vocabulary padding is
    real work but not model FLOPs, so it is taken out. The counter sees torch's operations only, so the memory runs
    its PyTorch operations, not the fused CPU kernels (the same math: tests/model/test_memory_kernels.py)."""
    model = LM2Model(cfg, tensor_parallel())
    with (
        FlopCounterMode(display=False) as counter,
        sdpa_kernel(SDPBackend.MATH),
        torch.no_grad(),
        memory_backend.choose("pytorch"),
    ):
        model(torch.randint(0, cfg.vocab_size, (1, cfg.row_length)))
    padding = 2 * (model.padded_vocab_size - cfg.vocab_size) * cfg.hidden_size * cfg.row_length
    assert forward_flops_per_token(cfg) * cfg.row_length == counter.get_total_flops() - padding


def test_tiny_flops_by_hand():
    """tiny_config: d=64, 2 layers, 4 heads of 16 (2 kv heads), FFN 96, vocabulary 300, rows of 32 = 4 segments of
    8; memory N=6 slots x d_m=64 in 2 heads of d_h=32. A multiply-add is 2 FLOPs."""
    projections = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64)  # q, k, v, o
    mlp = 2 * 3 * 64 * 96
    output_layer = 2 * 300 * 64
    vanilla_attention = 2 * 2 * 32 * 64  # QK^T and AV over the whole row of 32
    assert (
        forward_flops_per_token(tiny_config(with_memory=False))
        == 2 * (projections + mlp + vanilla_attention) + output_layer
        == 177_664
    )
    segment_attention = 2 * 2 * 8 * 64
    per_token = (
        2 * 2 * 64 * 64  # read query, memory output projection
        + 2 * 2 * 6 * 64  # read attention over 6 slots
        + 2 * 64 * 32
    )  # output gate (head-local)
    slot_keys_values = 2 * 2 * 6 * 64 * 32  # each of the 4 segments
    write = (
        2 * 2 * 8 * 64 * 64  # write keys and values of the segment's 8 tokens
        + 2 * 6 * 64 * 32  # write query of the slots
        + 2 * 2 * 6 * 8 * 64  # slots attend to the segment's 8 tokens
        + 2 * 2 * 6 * 2 * 64 * 32
    )  # input and forget gates over [u, M]
    memory_per_row = 32 * per_token + 4 * slot_keys_values + 3 * write  # no write after the last segment
    expected = 2 * (projections + mlp + segment_attention) + output_layer + 2 * memory_per_row // 32
    assert forward_flops_per_token(tiny_config()) == expected == 271_616


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load_to_what_their_yaml_says(path, tmp_path):
    """Every value written in the file reaches the config unchanged, the rest are defaults, the config survives a
    round trip through YAML, and its layout validates at tp * pp ranks."""
    run = load_config(path)

    def assert_contains(loaded, written, where):
        for key, value in written.items():
            if isinstance(value, dict):
                assert_contains(loaded[key], value, f"{where}{key}.")
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                for i, item in enumerate(value):
                    assert_contains(loaded[key][i], item, f"{where}{key}[{i}].")
            else:
                assert loaded[key] == value, f"{where}{key}"

    assert_contains(run.to_dict(), yaml.safe_load(path.read_text()), "")
    (tmp_path / "dumped.yaml").write_text(yaml.safe_dump(run.to_dict()))
    assert load_config(tmp_path / "dumped.yaml") == run
    run.validate(run.parallel.tp * run.parallel.pp)


def test_vanilla_has_no_memory_parameters():
    assert parameter_counts(tiny_config(with_memory=False)).memory == 0


def test_lm2_1b_has_the_paper_shape():
    model = load_config("configs/lm2-1b.yaml").model
    counts = parameter_counts(model)
    assert (model.num_layers, model.hidden_size, model.num_heads, model.num_kv_heads) == (16, 2048, 32, 8)
    assert (model.memory.slots, model.memory_dim) == (2048, 2048)
    assert counts.embedding + counts.backbone == 1_235_814_400  # Llama-3.2-1B's published count (tied embeddings)
    # Per block, with d = d_m = 2048, 16 memory heads of d_h = 128 and N = 2048 slots (docs/memory.md: head-local gates
    # are smaller than the paper's +0.54B):
    per_block = (
        4 * 2048 * 2048  # read query, write key and value (d -> d_m), output projection (d_m -> d)
        + 4 * 2048 * 128  # read key and value, output gate, write query: head-local d_h x d_h per head
        + 2 * 2 * 2048 * 128  # input and forget gates: [u, M] (2 d_h) -> d_h per head
        + 3 * 2048  # three gate biases
        + 2048 * 2048
    )  # the initial bank
    assert counts.memory == 16 * per_block == 369_197_056


def test_info_command_prints_counts():
    out = subprocess.run(
        [sys.executable, "-m", "lm2.pipeline.cli", "info", "--config", "configs/tiny.yaml", "model.memory.slots=32"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    counts = parameter_counts(load_config("configs/tiny.yaml", ["model.memory.slots=32"]).model)
    assert f"({counts.total:,})" in out and "32 slots" in out


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["parallel.tp=2", "model.num_kv_heads=1"], "num_kv_heads=1 must be divisible by the tensor-parallel size 2"),
        (
            ["--world-size", "3"],
            r"global_batch=16 must be a multiple of train.micro_batch \* data-parallel size = 4 \* 3",
        ),
    ],
)
def test_info_command_runs_the_trainers_validation(arguments, message):
    result = subprocess.run(
        [sys.executable, "-m", "lm2.pipeline.cli", "info", "--config", "configs/tiny.yaml", *arguments],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stdout
    assert re.fullmatch(f"lm2 info: configuration error: .*{message}.*\n", result.stderr), result.stderr


def test_info_command_reports_yaml_syntax_errors_in_one_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  vocab_size: 400\n hidden_size: 64\n")
    result = subprocess.run(
        [sys.executable, "-m", "lm2.pipeline.cli", "info", "--config", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert re.fullmatch(
        f"lm2 info: configuration error: {re.escape(str(path))}:3:\\d+: YAML syntax error: .*\n", result.stderr
    ), result.stderr


def test_info_command_reports_config_errors_without_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "lm2.pipeline.cli", "info", "--config", "configs/tiny.yaml", "model.hidden_size=130"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "hidden_size=130 must be divisible by num_heads=4" in result.stderr and "Traceback" not in result.stderr
