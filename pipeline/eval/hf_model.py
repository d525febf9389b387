"""An exported Hugging Face folder ready for evaluation: the model (eval mode, fp32), its tokenizer, and how
many tokens it can hold (None for LM2, which runs any length segment by segment)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lm2.pipeline.eval import EvalError


@dataclass
class EvalModel:
    model: torch.nn.Module
    tokenizer: object
    kind: str  # "LM2" or "vanilla"
    max_tokens: int | None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids


def load_model(folder: str | Path) -> EvalModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(folder) / "config.json").is_file():
        raise EvalError(f"{folder} holds no config.json: give --model a folder written by `lm2 export hf`")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if getattr(model.config, "model_type", "") == "lm2":
        return EvalModel(model, tokenizer, "LM2", None)
    return EvalModel(model, tokenizer, "vanilla", int(model.config.max_position_embeddings))
