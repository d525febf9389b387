"""`lm2 eval ppl` against an independent computation: the Hugging Face model's own loss, row by row (prepared
shards) or window by window (text files tokenized with sentencepiece directly)."""

import math

import pytest
import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM

from lm2.model.errors import EvalError
from lm2.pipeline.cli import main
from lm2.pipeline.eval.perplexity import perplexity
from tests.pipeline.eval_fixtures import lm2_folder
from tests.pipeline.test_data_prepare import read_rows


def hf_loss_sum(model, row: torch.Tensor, pad: int | None) -> tuple[float, int]:
    """The model's own mean loss over a row (labels = the row, PAD ignored) times the tokens it scored."""
    labels = row.clone()
    if pad is not None:
        labels[labels == pad] = -100
    count = int((labels[1:] != -100).sum())
    with torch.no_grad():
        loss = model(row[None], labels=labels[None], use_cache=False).loss
    return float(loss) * count, count


@pytest.mark.parametrize("kind", ["lm2", "vanilla"])
def test_perplexity_of_prepared_val_rows_equals_the_models_own_loss(kind, hf_lm2, hf_vanilla, prepared):
    folder = hf_lm2 if kind == "lm2" else hf_vanilla
    result, scored = perplexity(str(folder), [str(prepared)], progress=False, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    rows = [torch.from_numpy(row.astype("int64")) for row in read_rows(prepared / "val")[0]]
    sums = [hf_loss_sum(model, row, pad=3) for row in rows]
    assert result.tokens == sum(c for _, c in sums) and result.tokens > 100
    assert result.perplexity == pytest.approx(math.exp(sum(s for s, _ in sums) / result.tokens), rel=1e-5)
    assert "val split" in scored


def test_perplexity_of_text_files_equals_the_models_own_loss(hf_lm2, text_inputs, tokenizer_path, capsys):
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    text = (text_inputs / "macbeth.txt").read_text()
    stream = processor.encode(text) + [processor.eos_id()]
    model = AutoModelForCausalLM.from_pretrained(hf_lm2, trust_remote_code=True).eval()
    sums = [hf_loss_sum(model, torch.tensor(stream[i : i + 100]), pad=None) for i in range(0, len(stream), 100)]
    expected = math.exp(sum(s for s, _ in sums) / sum(c for _, c in sums))
    assert (
        main(
            [
                "eval",
                "ppl",
                "--model",
                str(hf_lm2),
                str(text_inputs / "macbeth.txt"),
                "--context",
                "100",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"over {sum(c for _, c in sums):,} tokens of 1 text file(s), windows of 100 tokens" in out
    assert float(out.split()[1]) == pytest.approx(expected, rel=1e-3)  # printed with 3 decimals


def test_carried_perplexity_equals_one_pass_over_each_document(hf_lm2, text_inputs, tokenizer_path):
    """--carry: documents in pieces of 100 tokens (segments of 16: pieces end mid-segment), the memory carried,
    against one call of the model over each whole document (<= 1e-5)."""
    from lm2.pipeline.data.sources import find_input_files, read_all

    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    model = AutoModelForCausalLM.from_pretrained(hf_lm2, trust_remote_code=True).eval()
    files = [str(text_inputs / "macbeth.txt"), str(text_inputs / "scenes.jsonl")]
    total, count = 0.0, 0
    for document in read_all(find_input_files(files)):
        ids = torch.tensor(processor.encode(document) + [processor.eos_id()])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[None, :-1], use_cache=False).logits.double(), dim=-1)[0]
        total -= float(logp.gather(-1, ids[1:, None]).sum())
        count += len(ids) - 1
    result, scored = perplexity(str(hf_lm2), files, context=100, progress=False, device="cpu", carry=True)
    assert result.tokens == count > 1000 and "memory carried" in scored
    assert result.loss == pytest.approx(total / count, rel=1e-5)


def test_carry_needs_an_lm2_model_and_text(hf_vanilla, hf_lm2, prepared, text_inputs):
    with pytest.raises(EvalError, match="--carry"):
        perplexity(str(hf_vanilla), [str(text_inputs / "macbeth.txt")], progress=False, device="cpu", carry=True)
    with pytest.raises(EvalError, match="--carry"):
        perplexity(str(hf_lm2), [str(prepared)], progress=False, device="cpu", carry=True)


def test_data_of_another_tokenizer_is_refused(prepared, tmp_path, text_inputs):
    from lm2.pipeline.data.sources import find_input_files, read_all
    from lm2.pipeline.data.tokenizer import train_tokenizer

    other = tmp_path / "other.model"
    train_tokenizer(read_all(find_input_files([text_inputs])), other, vocab_size=400)
    with pytest.raises(EvalError, match="another tokenizer"):
        perplexity(str(lm2_folder(other, tmp_path / "hf")), [str(prepared)], progress=False)


def test_only_an_lm2_export_runs_its_folders_code(hf_vanilla, tmp_path):
    """A Llama folder whose config.json points AutoModel at code in the folder (as a received folder could): the
    evaluation loads transformers' own Llama and never imports that code."""
    import json
    import shutil

    from lm2.pipeline.eval.hf_model import is_lm2_export, load_model

    folder = tmp_path / "llama"
    shutil.copytree(hf_vanilla, folder)
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom transformers import LlamaForCausalLM as Evil\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Evil"}
    (folder / "config.json").write_text(json.dumps(config))
    assert not is_lm2_export(folder / "config.json")
    model = load_model(folder, "cpu")
    assert model.kind == "vanilla" and type(model.model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()
