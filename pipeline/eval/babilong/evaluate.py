"""`lm2 eval babilong`: greedy answers of a model to BABILong samples, scored per task and length.

A model that cannot hold a prompt plus the answer (a vanilla model beyond its training row length) reads the
prompt's tail only, which keeps the question; every such cell says how many samples were cut and to what."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from lm2.model.errors import EvalError
from lm2.pipeline.eval.babilong.answers import is_correct
from lm2.pipeline.eval.babilong.babi import task_samples
from lm2.pipeline.eval.babilong.samples import Background, haystack, parse_length, prompt, sample_rng
from lm2.pipeline.eval.hf_model import EvalModel

MAX_NEW_TOKENS = 16  # answers are one or three words; the metric reads the first sentence only


@dataclass
class Cell:
    task: str
    length: str
    samples: int = 0
    correct: int = 0
    truncated: int = 0  # samples whose prompt was cut to the model's last `kept_tokens`
    kept_tokens: int | None = None
    prompt_tokens: list[int] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / self.samples

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("prompt_tokens", "records")}
        out["accuracy"] = self.accuracy
        out["mean_prompt_tokens"] = sum(self.prompt_tokens) / len(self.prompt_tokens)
        out["records"] = self.records
        return out


def greedy_answer(model: EvalModel, ids: list[int], max_new_tokens: int) -> tuple[str, int]:
    """The decoded greedy continuation and the number of prompt tokens the model read."""
    if model.max_tokens is not None:
        ids = ids[-(model.max_tokens - max_new_tokens) :]
    tokens = torch.tensor([ids], device=model.model.device)
    with torch.no_grad():
        out = model.model.generate(
            tokens,
            attention_mask=torch.ones_like(tokens),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id,
        )
    return model.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True), len(ids)


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
        for index, sample in enumerate(data[cell.task][:samples]):
            tokens = parse_length(cell.length)
            context = haystack(sample, tokens, hay, sample_rng(seed, cell.task, tokens, index)).context
            ids = model.encode(prompt(sample, context))
            output, read = greedy_answer(model, ids, max_new_tokens)
            correct = is_correct(cell.task, sample.answer, output, sample.question)
            cell.samples, cell.correct = cell.samples + 1, cell.correct + correct
            cell.prompt_tokens.append(len(ids))
            if read < len(ids):
                cell.truncated, cell.kept_tokens = cell.truncated + 1, read
            cell.records.append(
                {
                    "index": index,
                    "question": sample.question,
                    "target": sample.answer,
                    "output": output,
                    "correct": correct,
                    "prompt_tokens": len(ids),
                }
            )
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
    """Evaluates and writes results.json, results.md and heatmap.png into `output`; returns the JSON.
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
    }
    write_reports(results, output)
    return results
