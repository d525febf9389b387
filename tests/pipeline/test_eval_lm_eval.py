"""The exported LM2 folder runs under lm-eval-harness (`--model hf --model_args
pretrained=DIR,trust_remote_code=True`) on a multiple-choice task defined in a local YAML with a local data
file (no hub); its log-likelihoods and accuracy equal a plain computation with the model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lm2.pipeline.eval.babilong.babi import HELDOUT_FOLDER, TASK_LABELS, task_samples

LOCATIONS = list(TASK_LABELS["qa1"])
TASK_YAML = """task: lm2_babi_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}\\nQuestion: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.fixture
def local_task(tmp_path):
    """Eight qa1 questions as a multiple-choice task over the six locations."""
    data = tmp_path / "babi_choice.jsonl"
    with open(data, "w") as handle:
        for sample in task_samples(HELDOUT_FOLDER, "qa1")[:8]:
            handle.write(
                json.dumps(
                    {
                        "context": " ".join(sample.facts),
                        "question": sample.question,
                        "choices": LOCATIONS,
                        "answer": LOCATIONS.index(sample.answer),
                    }
                )
                + "\n"
            )
    (tmp_path / "lm2_babi_choice.yaml").write_text(TASK_YAML.format(data=data))
    return tmp_path, [json.loads(line) for line in data.read_text().splitlines()]


def choice_logliks(model, tokenizer, doc) -> list[float]:
    """Sum of log-probabilities of " choice" after the prompt, by one forward per choice."""
    context = f"{doc['context']}\nQuestion: {doc['question']}\nAnswer:"
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    result = []
    for choice in doc["choices"]:
        whole = tokenizer(context + " " + choice, add_special_tokens=False).input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole]), use_cache=False).logits[0].float(), -1)
        result.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(context_ids), len(whole))))
    return result


@pytest.mark.slow
def test_lm_eval_harness_runs_the_exported_lm2_model(hf_lm2, local_task, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    folder, docs = local_task
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={hf_lm2},trust_remote_code=True",
        tasks=["lm2_babi_choice"],
        task_manager=TaskManager(include_path=str(folder)),
        batch_size=1,
        device="cpu",
        log_samples=True,
    )
    samples = sorted(results["samples"]["lm2_babi_choice"], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs)
    model = AutoModelForCausalLM.from_pretrained(hf_lm2, trust_remote_code=True).eval()
    tokenizer, right = AutoTokenizer.from_pretrained(hf_lm2), 0
    for sample, doc in zip(samples, docs):
        ours = choice_logliks(model, tokenizer, doc)
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        assert theirs == pytest.approx(ours, abs=1e-4)
        right += max(range(len(ours)), key=ours.__getitem__) == doc["answer"]
    assert results["results"]["lm2_babi_choice"]["acc,none"] == pytest.approx(right / len(docs))
