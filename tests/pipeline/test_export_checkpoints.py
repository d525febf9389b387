"""`lm2 export hf` on checkpoints trained by real ranks at TP=2, PP=2, ZeRO-3 DP=2 and one process: merged weights,
verified logits, the folder's files, the tokenizer's ids, loading without lm2, generation, and clear refusals."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from lm2.model.errors import CheckpointError, ExportError
from lm2.pipeline.checkpoint.reader import model_config, read_full_state, resolve
from lm2.pipeline.checkpoint.verify import verify
from lm2.pipeline.hf.export import export_hf
from lm2.pipeline.hf.names import parameter_splits
from lm2.pipeline.hf.verify import lm2_logits, verification_tokens, verify_export
from tests.distributed import lm2_cli

# The module stays on one pytest-xdist worker: its tests share the trained runs.
pytestmark = pytest.mark.xdist_group("export-runs")
CONFIG = Path(__file__).parent / "tiny_train.yaml"
LAYOUTS = {  # name -> (processes, overrides)
    "single": (1, []),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "zero3-dp2": (2, ["parallel.zero_stage=3"]),
    "vanilla-tp2-untied": (2, ["parallel.tp=2", "model.memory.enabled=false", "model.tie_embeddings=false"]),
}
TEXT = "  Macbeth said:\n\nThe  thane of Cawdor lives; ünïcode 😀 </s> and <s>, tabs\tend \n"


@pytest.fixture(scope="module")
def checkpoints(train_data, tmp_path_factory):
    """Layout name -> its run's checkpoints folder; each run trains once, on first use."""
    root, done = tmp_path_factory.mktemp("export_runs"), {}

    def trained(name: str) -> Path:
        if name not in done:
            processes, layout = LAYOUTS[name]
            run_dir = root / name
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc_per_node={processes}",
                "--standalone",
                "-m",
                "lm2.pipeline.cli",
                "train",
                "--config",
                str(CONFIG),
                f"logging.run_dir={run_dir}",
                "logging.wandb=disabled",
                "train.steps=2",
                *train_data,
                *layout,
            ]
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            done[name] = run_dir / "checkpoints"
        return done[name]

    return trained


def merged(checkpoints_folder: Path) -> dict[str, torch.Tensor]:
    folder = resolve(checkpoints_folder)
    return read_full_state(folder, verify(folder).manifest)


@pytest.mark.parametrize(
    "layout", [pytest.param("tp2", marks=pytest.mark.slow), "pp2", pytest.param("zero3-dp2", marks=pytest.mark.slow)]
)
def test_export_of_a_parallel_checkpoint_is_verified(checkpoints, tmp_path, layout):
    """The shards merge into the weights one process trains (same seed and data: equal up to float reduction
    order; a wrong split would be off by the weights' scale), and the exported model gives lm2's logits."""
    ours, single = merged(checkpoints(layout)), merged(checkpoints("single"))
    assert ours.keys() == single.keys()
    assert ours["embed_tokens.weight"].shape[0] == 400  # vocabulary padding cut off
    for name, tensor in single.items():
        assert (ours[name] - tensor).abs().max() < 5e-5, name  # measured: up to 3.3e-6
    result = export_hf(checkpoints(layout), tmp_path / "hf", verify=True, max_shard_size="200KB", progress=False)
    assert result.max_logit_difference <= 1e-4
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "configuration_lm2.py",
        "modeling_lm2.py",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    } <= files
    assert len(result.weight_files) > 1  # above the size limit: shards plus index
    assert_files_share_the_mode_of_config_json(tmp_path / "hf")


def assert_files_share_the_mode_of_config_json(folder: Path) -> None:
    """Every file as readable as config.json, which an ordinary open() wrote under the umask: the weights too (the
    safetensors writer creates them 0600), or a shared cluster's other users could not load the model."""
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in folder.iterdir()}
    assert set(modes.values()) == {modes["config.json"]}, modes


def test_export_command_writes_a_loadable_lm2_folder(checkpoints, tmp_path):
    out = tmp_path / "hf"
    result = lm2_cli(["export", "hf", str(checkpoints("single")), str(out), "--verify"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = [line for line in result.stdout.splitlines() if line.startswith("wrote")]  # DeepSpeed prints too
    assert len(summary) == 1 and summary[0].startswith(f"wrote {out}: LM2ForCausalLM") and "verified" in summary[0]
    assert "export step_00000002" in result.stderr and "100%" in result.stderr  # the progress bar
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lm2" and config["segment_length"] == 8 and config["memory_slots"] == 6
    assert config["auto_map"] == {
        "AutoConfig": "configuration_lm2.LM2Config",
        "AutoModelForCausalLM": "modeling_lm2.LM2ForCausalLM",
    }
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 3)
    assert_files_share_the_mode_of_config_json(out)


def test_modeling_file_imports_only_torch_and_transformers():
    from lm2.pipeline.hf import modeling_lm2

    for node in ast.walk(ast.parse(Path(modeling_lm2.__file__).read_text())):
        if isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] in ("torch", "transformers") for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            assert node.module.split(".")[0] in ("__future__", "torch", "transformers"), node.module


LOAD_WITHOUT_LM2 = """
import sys
sys.modules["lm2"] = None  # any import of lm2 fails: the folder must stand alone
import torch
from transformers import AutoModelForCausalLM

folder, tokens_file, out_file = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tokens = torch.load(tokens_file)
with torch.no_grad():
    logits = model(tokens, use_cache=False).logits
    prompt = tokens[:, :5]
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=22, min_new_tokens=22,
                               do_sample=False)
    greedy = prompt
    for _ in range(22):
        step = model(greedy, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        greedy = torch.cat((greedy, step), dim=1)
torch.save({"logits": logits, "generated": generated, "greedy": greedy, "class": type(model).__name__}, out_file)
"""


def test_lm2_folder_loads_and_generates_without_lm2(checkpoints, tmp_path):
    """Loaded where lm2 cannot be imported: lm2's logits over 4 segments; generate() with its cache (prompt of 5,
    22 new tokens: 27 tokens, memory written 3 times) gives the greedy tokens of full forwards without cache."""
    out = tmp_path / "hf"
    export_hf(checkpoints("single"), out, progress=False)
    cfg = model_config(verify(resolve(checkpoints("single"))).manifest)
    tokens = verification_tokens(cfg, seed=5)
    torch.save(tokens, tmp_path / "tokens.pt")
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_LM2, str(out), str(tmp_path / "tokens.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(tmp_path / "out.pt")
    assert loaded["class"] == "LM2ForCausalLM"
    expected = lm2_logits(cfg, merged(checkpoints("single")), tokens)
    assert (loaded["logits"] - expected).abs().max() <= 1e-4
    assert loaded["generated"].shape[1] == 27 > 3 * cfg.segment_length
    assert torch.equal(loaded["generated"], loaded["greedy"])
    wrong = merged(checkpoints("single"))
    wrong["layers.2.memory.forget_gate_bias"] += 0.05  # the check notices a small error in one memory tensor
    with pytest.raises(ExportError, match="verification failed"):
        verify_export(out, cfg, wrong)


def test_vanilla_exports_as_transformers_llama(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    out = tmp_path / "hf"
    result = export_hf(checkpoints("vanilla-tp2-untied"), out, verify=True, progress=False)
    assert result.architecture == "LlamaForCausalLM" and result.max_logit_difference <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config and not list(out.glob("*.py"))
    assert config["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # no remote code: transformers' own Llama
    assert type(model) is LlamaForCausalLM
    cfg = model_config(verify(resolve(checkpoints("vanilla-tp2-untied"))).manifest)
    tokens = verification_tokens(cfg, seed=3)
    with torch.no_grad():
        theirs = model(tokens).logits
    assert (theirs - lm2_logits(cfg, merged(checkpoints("vanilla-tp2-untied")), tokens)).abs().max() <= 1e-4


def test_exported_tokenizer_gives_sentencepiece_ids(checkpoints, train_data, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "hf"
    export_hf(checkpoints("single"), out, progress=False)
    sentencepiece_model = next(o.split("=", 1)[1] for o in train_data if o.startswith("data.tokenizer="))
    processor = spm.SentencePieceProcessor(model_file=sentencepiece_model)
    for use_fast in (True, False):
        tokenizer = AutoTokenizer.from_pretrained(out, use_fast=use_fast)
        assert tokenizer(TEXT)["input_ids"] == processor.encode(TEXT)  # training rows: no BOS, text as is
        if use_fast:  # the slow tokenizer's decode drops one more leading space than sentencepiece's
            assert tokenizer.decode(processor.encode(TEXT)) == processor.decode(processor.encode(TEXT)) == TEXT
        assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
            processor.unk_id(),
            processor.bos_id(),
            processor.eos_id(),
            processor.pad_id(),
        )


def test_name_table_splits_match_the_model_tensor_parallel_attributes(single_process):
    from lm2.model.lm import LM2Model
    from lm2.pipeline.config import load_config
    from lm2.pipeline.parallel.mpu import tensor_parallel

    cfg = load_config(CONFIG, ["model.tie_embeddings=false", "model.memory.layers=[1, 3]"]).model
    model = LM2Model(cfg, tensor_parallel())
    actual = {
        name: (param.partition_dim if getattr(param, "tensor_model_parallel", False) else None)
        for name, param in model.named_parameters()
    }
    assert parameter_splits(cfg) == actual


def test_bad_inputs_fail_with_one_clear_line(checkpoints, tmp_path):
    source = resolve(checkpoints("single"))
    out = tmp_path / "exists"
    out.mkdir()
    result = lm2_cli(["export", "hf", str(source), str(out)])
    errors = [line for line in result.stderr.splitlines() if line.startswith("lm2 export:")]  # not import warnings
    assert result.returncode == 2 and len(errors) == 1 and "exists" in errors[0] and "--force" in errors[0]

    broken = tmp_path / "broken" / source.name
    shutil.copytree(source, broken)
    shard = broken / "mp_rank_00_model_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        export_hf(broken, tmp_path / "a", progress=False)
    shard.unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        export_hf(broken, tmp_path / "b", progress=False)
    shutil.copy(source / "mp_rank_00_model_states.pt", shard)
    manifest = json.loads((broken / "lm2_manifest.json").read_text())
    manifest["topology"]["tp"] = 2  # files of a TP=1 run described as TP=2
    (broken / "lm2_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="unknown layout"):
        export_hf(broken, tmp_path / "c", progress=False)
    (broken / "lm2_manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete|no lm2_manifest"):
        export_hf(broken, tmp_path / "d", progress=False)
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_checkpoint_argument_forms_name_the_same_checkpoint(checkpoints, tmp_path):
    root = checkpoints("single")
    step = root / "step_00000002"
    assert resolve(root) == resolve(root / "latest") == resolve(step) == step
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        resolve(tmp_path)


def test_the_manifest_lists_exactly_the_files_every_rank_wrote(checkpoints):
    """Built from each rank's report of what it saved (gathered to rank 0), not from a listing of the folder."""
    folder = resolve(checkpoints("pp2"))
    on_disk = {p.name for p in folder.iterdir() if p.name != "lm2_manifest.json"}
    listed = verify(folder).manifest.files
    assert set(listed) == on_disk and {"rng_rank_00000.pt", "rng_rank_00001.pt"} <= on_disk
    assert any(name.startswith("layer_") for name in listed)  # pipeline stages' own files, from rank 1 too


def test_force_replaces_only_an_earlier_export(checkpoints, tmp_path, monkeypatch):
    source = resolve(checkpoints("single"))
    out = tmp_path / "hf"
    export_hf(source, out, progress=False)
    marker = json.loads((out / "lm2_export.json").read_text())
    assert marker["step"] == 2 and "config.json" in marker["files"]
    export_hf(source, out, force=True, progress=False)  # an earlier export: replaced
    (out / "notes.txt").write_text("mine")
    refusals = {
        out: "holds notes.txt, which the export did not write",
        source.parent.parent: "holds a run or its checkpoints",  # the run folder
        source.parent: "holds a run or its checkpoints",
        source: "holds the checkpoint being exported",
        tmp_path / "other": "is not an lm2 export",
        tmp_path / "home": "is your home folder",
        tmp_path / "here": "is the current folder",
    }
    for folder in (tmp_path / "other", tmp_path / "home", tmp_path / "here"):
        folder.mkdir()
        (folder / "thesis.tex").write_text("years of work")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "here")
    for folder, problem in refusals.items():
        target = Path(".") if folder == tmp_path / "here" else folder
        with pytest.raises(
            ExportError, match=f"--force replaces only a folder written by `lm2 export hf`, and .*{problem}"
        ):
            export_hf(source, target, force=True, progress=False)
    assert (out / "notes.txt").exists() and all((f / "thesis.tex").exists() for f in list(refusals)[4:])
    assert (source / "lm2_manifest.json").exists()


def test_export_uses_the_tokenizer_the_run_trained_with(checkpoints, tokenizer_path, tmp_path):
    """The checkpoint records its tokenizer's sha256: another tokenizer is refused; a run whose config named none
    (it took its streams') needs --tokenizer, said in one line."""
    source = resolve(checkpoints("single"))
    assert verify(source).manifest.tokenizer_sha256 is not None
    with pytest.raises(ExportError, match="is not the tokenizer the checkpoint was trained with"):
        export_hf(source, tmp_path / "a", tokenizer=str(tokenizer_path), progress=False)
    copy = tmp_path / "copy" / source.name
    shutil.copytree(source, copy)
    manifest = json.loads((copy / "lm2_manifest.json").read_text())
    manifest["config"]["data"]["tokenizer"] = None
    (copy / "lm2_manifest.json").write_text(json.dumps(manifest))
    result = lm2_cli(["export", "hf", str(copy), str(tmp_path / "b")])
    errors = [line for line in result.stderr.splitlines() if line.startswith("lm2 export:")]
    assert result.returncode == 2 and len(errors) == 1 and "named no data.tokenizer" in errors[0], result.stderr
    assert "--tokenizer PATH" in errors[0] and not (tmp_path / "b").exists()
