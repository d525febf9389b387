"""`lm2 eval memory`: the health of an LM2 model's memory over a long text, and what the memory is worth.

The text's tokens (documents joined, each ending with EOS) run through the exported model segment by segment for
`segments` segments from one fresh memory, as a long evaluation prompt would. After every write, each block's slot
norms (a slot's norm over all its heads) are recorded: their mean and maximum against the segment index show
whether the memory stays in the range training produced or drifts. Then the same tokens are scored twice: with the
memory read on, and switched off in every block (the read returns zero, so each block is its plain backbone with
segment-local attention). Output: memory.json (the norms, both losses) and memory.png (the norms per block).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from lm2.model.errors import EvalError
from lm2.pipeline.eval.hf_model import EvalModel


def _tokens(model: EvalModel, files: list[Path], count: int) -> torch.Tensor:
    from lm2.pipeline.data.sources import read_documents

    ids: list[int] = []
    for document in read_documents(files):
        ids += model.encode(document) + [model.tokenizer.eos_token_id]
        if len(ids) >= count:
            return torch.tensor(ids[:count])
    raise EvalError(
        f"the text holds {len(ids)} tokens, fewer than the {count} asked for: give more text or fewer --segments"
    )


def _banks(model: EvalModel) -> list[tuple[int, torch.nn.Module]]:
    return [(i, layer.memory) for i, layer in enumerate(model.model.model.layers) if layer.memory is not None]


@contextlib.contextmanager
def recording_norms(model: EvalModel) -> Iterator[dict[int, list[tuple[float, float]]]]:
    """Block -> (mean, max) slot norm of its memory after every write, while open."""
    norms: dict[int, list[tuple[float, float]]] = {index: [] for index, _ in _banks(model)}
    for index, bank in _banks(model):

        def write(keys, values, mem, bank=bank, log=norms[index]):
            state = type(bank).write(bank, keys, values, mem)  # [B, N, H, dh]
            slot = state.flatten(-2).norm(dim=-1)
            log.append((float(slot.mean()), float(slot.max())))
            return state

        bank.write = write
    try:
        yield norms
    finally:
        for _, bank in _banks(model):
            del bank.write


@contextlib.contextmanager
def read_switched_off(model: EvalModel) -> Iterator[None]:
    """Every block's memory read returns zero while open: the model is its backbone alone."""
    for _, bank in _banks(model):
        bank.read = lambda xn, mem: torch.zeros_like(xn)
    try:
        yield
    finally:
        for _, bank in _banks(model):
            del bank.read


def _loss(model: EvalModel, tokens: torch.Tensor, piece: int) -> float:
    """Mean loss of tokens[1:], read in pieces of `piece` tokens through the cache (no [T, vocab] logits)."""
    from lm2.pipeline.eval.perplexity import token_nll_cached

    total, cache = 0.0, None
    for start in range(0, len(tokens) - 1, piece):
        chunk = tokens[start : start + piece + 1]
        nll, _, cache = token_nll_cached(model.model, chunk[None, :-1], chunk[None, 1:], cache)
        total += nll
    return total / (len(tokens) - 1)


def evaluate_memory(model_dir: str, text: list[str], segments: int, output: Path, device: str | None = None) -> dict:
    """Writes memory.json and memory.png into `output`; returns the JSON."""
    from lm2.pipeline.data.sources import find_input_files
    from lm2.pipeline.eval.hf_model import load_model

    if segments < 1:
        raise EvalError(f"--segments must be at least 1, got {segments}")
    model = load_model(model_dir, device)
    if model.kind != "LM2":
        raise EvalError(f"{model_dir} is a vanilla model: it has no memory to evaluate")
    length = model.model.config.segment_length
    tokens = _tokens(model, find_input_files(text), segments * length + 1)
    with recording_norms(model) as norms:
        loss_on = _loss(model, tokens, length)
    with read_switched_off(model):
        loss_off = _loss(model, tokens, length)
    results = {
        "model": str(model_dir),
        "segments": segments,
        "segment_length": length,
        "tokens": segments * length,
        "loss_memory_on": loss_on,
        "loss_memory_off": loss_off,
        "slot_norms": {
            str(block): {"mean": [m for m, _ in log], "max": [x for _, x in log]} for block, log in norms.items()
        },
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "memory.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, output / "memory.png")
    return results


def plot(results: dict, path: Path) -> None:
    """The mean (solid) and largest (dashed) slot norm of every block against the segment that was written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for block, norms in results["slot_norms"].items():
        writes = range(1, len(norms["mean"]) + 1)
        (line,) = axes.plot(writes, norms["mean"], label=f"block {block}")
        axes.plot(writes, norms["max"], linestyle="--", color=line.get_color(), alpha=0.6)
    axes.set(
        xlabel="segments written",
        ylabel="slot norm (solid: mean, dashed: max)",
        title=f"memory over {results['segments']} segments of {results['segment_length']} tokens; loss "
        f"{results['loss_memory_on']:.3f} (read off: {results['loss_memory_off']:.3f})",
    )
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
