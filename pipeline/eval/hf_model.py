"""An exported Hugging Face folder ready for evaluation: the model (eval mode, fp32, on the chosen device), its
tokenizer, and how many tokens it can hold (None for LM2, which runs any length segment by segment)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lm2.model.errors import EvalError


@dataclass
class EvalModel:
    model: torch.nn.Module
    tokenizer: object
    kind: str  # "LM2" or "vanilla"
    max_tokens: int | None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids


def eval_device(name: str | None) -> torch.device:
    """--device: a torch device name; None picks the GPU when there is one, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EvalError(f"--device {name!r} is not a device: give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise EvalError(
            f"--device {name}: this machine has {torch.cuda.device_count()} usable GPU(s): run on a GPU "
            "node or pass --device cpu"
        )
    if device.type not in ("cpu", "cuda"):
        raise EvalError(f"--device {name}: lm2 evaluates on cpu or cuda")
    return device


def is_lm2_export(config: Path) -> bool:
    """Whether a folder's config.json describes an LM2 model, whose class comes from the folder's own
    modeling_lm2.py (remote code: it runs when loaded). A vanilla export is transformers' own Llama and runs no code
    of the folder, whatever its config.json's auto_map says."""
    try:
        return json.loads(config.read_text()).get("model_type") == "lm2"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise EvalError(
            f"{config} is not a model config ({error}): give --model a folder written by `lm2 export hf`"
        ) from None


def load_model(folder: str | Path, device: str | None) -> EvalModel:
    """The model in fp32 on `device` (a --device name, see eval_device), whatever dtype it was exported in: LM2 and
    vanilla are compared at full precision, and LM2's memory carries its state over every segment of a long prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = Path(folder) / "config.json"
    if not config.is_file():
        raise EvalError(f"{folder} holds no config.json: give --model a folder written by `lm2 export hf`")
    target = eval_device(device)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=is_lm2_export(config))
    model = model.float().eval().to(target)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if getattr(model.config, "model_type", "") == "lm2":
        return EvalModel(model, tokenizer, "LM2", None)
    return EvalModel(model, tokenizer, "vanilla", int(model.config.max_position_embeddings))
