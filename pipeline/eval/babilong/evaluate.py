"""`lm2 eval babilong`: a model's answers to BABILong samples, scored per task and length by greedy exact match
(the benchmark's metric) and by a forced choice among the task's answer words (continuations.py), and by the
distance between the last supporting fact and the question (distance.py). Each cell also says how often the forced
choice is the answer word the facts name last, beside how often that word is the target: a model near the second
figure that follows the first has learned the recency shortcut rather than the task.

A model that cannot hold a prompt plus the answer (a vanilla model beyond its training row length) reads the
prompt's tail only, which keeps the question; every such cell says how many samples were cut and to what, and a
supporting fact left outside the tail is counted as cut off."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from lm2.model.errors import EvalError
from lm2.pipeline.eval.babilong.answers import is_correct, last_mentioned
from lm2.pipeline.eval.babilong.babi import TASK_LABELS, BabiSample, task_samples
from lm2.pipeline.eval.babilong.continuations import candidate_ids, chosen, forced_choice, greedy, read_prompt
from lm2.pipeline.eval.babilong.distance import distance_rows, fact_place
from lm2.pipeline.eval.babilong.samples import Background, Haystack, haystack, parse_length, prompt, sample_rng
from lm2.pipeline.eval.hf_model import EvalModel

MAX_NEW_TOKENS = 16  # answers are one or three words; the metric reads the first sentence only


@dataclass
class Cell:
    task: str
    length: str
    samples: int = 0
    correct: int = 0
    forced_samples: int = 0  # samples whose target is one answer word (not qa8's lists)
    forced_correct: int = 0
    recency_samples: int = 0  # samples whose facts name an answer word, and whose target is one word
    recency_correct: int = 0  # of them, those whose target is the word named last (the recency shortcut's score)
    forced_recency: int = 0  # of them, those whose forced choice is the word named last
    truncated: int = 0  # samples whose prompt was cut to the model's last `kept_tokens`
    kept_tokens: int | None = None
    prompt_tokens: list[int] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / self.samples

    def add(self, record: dict, read: int) -> None:
        self.samples, self.correct = self.samples + 1, self.correct + record["correct"]
        if record["forced_correct"] is not None:
            self.forced_samples += 1
            self.forced_correct += record["forced_correct"]
        if record["last_mentioned"] is not None and record["forced_correct"] is not None:
            self.recency_samples += 1
            self.recency_correct += record["last_mentioned"].lower() == record["target"].lower()
            self.forced_recency += record["last_mentioned"].lower() == record["forced"].lower()
        self.prompt_tokens.append(record["prompt_tokens"])
        if read < record["prompt_tokens"]:
            self.truncated, self.kept_tokens = self.truncated + 1, read
        self.records.append(record)

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("prompt_tokens", "records")}
        out["accuracy"] = self.accuracy
        out["forced_accuracy"] = 100.0 * self.forced_correct / self.forced_samples if self.forced_samples else None
        recency = self.recency_samples
        out["recency_accuracy"] = 100.0 * self.recency_correct / recency if recency else None
        out["forced_is_last_mentioned"] = 100.0 * self.forced_recency / recency if recency else None
        out["mean_prompt_tokens"] = sum(self.prompt_tokens) / len(self.prompt_tokens)
        out["records"] = self.records
        return out


def stop_tokens(model: EvalModel) -> set[int]:
    """The tokens that end a generation (the generation config's EOS, one id or a list)."""
    eos = model.model.generation_config.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def answer_sample(model: EvalModel, task: str, sample: BabiSample, built: Haystack, max_new_tokens: int):
    """One sample: its record and the number of prompt tokens the model read."""
    text = prompt(sample, built.context)
    ids = model.encode(text)
    # The words' tokens after the question alone: tokenizers split at whitespace, so the context before it does not
    # change them (tests/pipeline/test_eval_babilong.py checks it on whole prompts), and a 16k-token prompt is not
    # tokenized once more per candidate.
    question = prompt(sample, "")
    candidates = candidate_ids(model.encode, question, model.encode(question), TASK_LABELS[task])
    read_ids = ids
    if model.max_tokens is not None:  # room for the answer: the greedy tokens, or the longest candidate
        room = max(max_new_tokens, max(map(len, candidates.values())) - 1)
        read_ids = ids[-(model.max_tokens - room) :]
    state = read_prompt(model.model, read_ids)
    output = model.tokenizer.decode(
        greedy(model.model, state, max_new_tokens, stop_tokens(model)), skip_special_tokens=True
    )
    scores = forced_choice(model.model, state, candidates)
    single = sample.answer.lower() in {word.lower() for word in candidates}  # qa8's lists have no single word
    place = fact_place(model.encode, text, len(built.context), built.fact_spans, sample.supporting)
    record = {
        "question": sample.question,
        "target": sample.answer,
        "output": output,
        "correct": is_correct(task, sample.answer, output, sample.question),
        "forced": chosen(scores),
        "forced_correct": chosen(scores).lower() == sample.answer.lower() if single else None,
        "scores": {word: round(score, 4) for word, score in scores.items()},
        "prompt_tokens": len(ids),
        "distance": None if place is None else place.distance,
        "facts_in_view": place is None or place.first_token >= len(ids) - len(read_ids),
        "last_mentioned": last_mentioned(task, sample.facts),
    }
    return record, len(read_ids)


def evaluate(
    model: EvalModel,
    tasks: list[str],
    lengths: list[str],
    samples: int,
    babi: Path,
    background: Path,
    seed: int = 0,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: bool = True,
) -> list[Cell]:
    if model.max_tokens is not None and model.max_tokens <= max_new_tokens:
        raise EvalError(f"the model holds {model.max_tokens} tokens, not more than --max-new-tokens {max_new_tokens}")
    data = {task: task_samples(babi, task) for task in tasks}
    for task, found in data.items():
        if len(found) < samples:
            raise EvalError(f"{task} has {len(found)} questions in {babi}, fewer than --samples {samples}")
    hay = Background([background], model.tokenizer)
    cells = [Cell(task, length) for task in tasks for length in lengths]
    bar = tqdm(total=len(cells) * samples, desc="babilong", unit="sample", disable=not progress, dynamic_ncols=True)
    for cell in cells:
        bar.set_postfix_str(f"{cell.task} {cell.length}")
        tokens = parse_length(cell.length)
        for index, sample in enumerate(data[cell.task][:samples]):
            built = haystack(sample, tokens, hay, sample_rng(seed, cell.task, tokens, index))
            record, read = answer_sample(model, cell.task, sample, built, max_new_tokens)
            cell.add({"index": index, **record}, read)
            bar.update(1)
    bar.close()
    return cells


def run(
    model_dir: str,
    tasks: list[str],
    lengths: list[str],
    samples: int,
    babi: Path,
    background: Path,
    output: Path,
    seed: int = 0,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: bool = True,
    device: str | None = None,
) -> dict:
    """Evaluates and writes results.json, results.md, heatmap.png and distance.png into `output`; returns the JSON.
    device: a torch device name, None for the GPU when there is one."""
    from lm2.pipeline.eval.babilong.report import write_reports
    from lm2.pipeline.eval.hf_model import load_model

    for length in lengths:
        parse_length(length)  # fail before loading anything
    if samples < 1:
        raise EvalError(f"--samples must be at least 1, got {samples}")
    model = load_model(model_dir, device)
    start = time.time()
    cells = evaluate(model, tasks, lengths, samples, babi, background, seed, max_new_tokens, progress)
    results = {
        "model": str(model_dir),
        "kind": model.kind,
        "max_tokens": model.max_tokens,
        "tasks": tasks,
        "lengths": lengths,
        "samples": samples,
        "seed": seed,
        "babi": str(babi),
        "background": str(background),
        "seconds": round(time.time() - start, 1),
        "cells": [cell.summary() for cell in cells],
        "distance": distance_rows(
            tasks, {task: [r for c in cells if c.task == task for r in c.records] for task in tasks}
        ),
    }
    write_reports(results, output)
    return results
