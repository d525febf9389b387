"""`lm2 eval ppl`: perplexity of a model on a prepared dataset's split (MDS shards from `lm2 data prepare`,
scored row by row exactly like the trainer's validation loss: PAD labels ignored) or on text files
(.txt/.jsonl, optionally .gz: documents end with EOS as in training, the token stream is cut into windows of
`context` tokens, and every token but a window's first is scored). With `carry` (LM2 models), each document is
scored in pieces of `context` tokens with the memory (the model's cache) carried from piece to piece and reset
where a new document starts: every token but the document's first is scored, as one pass over the document
would score it."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lm2.model.errors import EvalError
from lm2.model.lm import IGNORE_INDEX
from lm2.pipeline.eval.hf_model import EvalModel

TEXT_CONTEXT = 1024  # tokens per window on text files (capped at what a vanilla model holds)


@dataclass
class Perplexity:
    nll_sum: float
    tokens: int

    @property
    def loss(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def token_nll(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood of labels [B, T] (IGNORE_INDEX skipped) given inputs [B, T], and their count."""
    inputs, labels = inputs.to(model.device), labels.to(model.device)
    with torch.no_grad():
        logp = torch.log_softmax(model(inputs, use_cache=False).logits.float(), dim=-1)
    keep = labels != IGNORE_INDEX
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return float(-(picked * keep).sum()), int(keep.sum())


def shard_rows(split: Path) -> Iterator[torch.Tensor]:
    """Rows of a split's MDS shards in write order (each zstd shard unpacked into a temporary folder)."""
    import json
    import tempfile

    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    with tempfile.TemporaryDirectory() as raw:
        for info in json.loads((split / "index.json").read_text())["shards"]:
            if info.get("zip_data"):
                packed = (split / info["zip_data"]["basename"]).read_bytes()
                (Path(raw) / info["raw_data"]["basename"]).write_bytes(decompress(info["compression"], packed))
            shard = reader_from_json(raw if info.get("zip_data") else str(split), None, info)
            for i in range(shard.samples):
                yield torch.from_numpy(shard[i]["tokens"].astype("int64"))


def mds_rows(folder: Path, split: str, model_dir: Path) -> list[torch.Tensor]:
    """Rows [row_length + 1] of a prepared split; the dataset must be tokenized with the model's tokenizer."""
    from lm2.pipeline.data.metadata import read_metadata
    from lm2.pipeline.files import sha256_file

    metadata = read_metadata(str(folder))
    if not (folder / split / "index.json").is_file():
        raise EvalError(f"{folder} has no {split!r} split: prepare it with --val-fraction, or pass --split train")
    ours = model_dir / "tokenizer.model"
    if ours.is_file() and sha256_file(ours) != metadata["tokenizer"]["sha256"]:
        raise EvalError(
            f"{folder} was tokenized with another tokenizer than {model_dir}'s: evaluate on data "
            "prepared with the model's tokenizer, or on text files"
        )
    return list(shard_rows(folder / split))


def mds_perplexity(
    model: EvalModel, folder: Path, split: str, model_dir: Path, batch: int = 8, progress: bool = True
) -> Perplexity:
    pad = model.tokenizer.pad_token_id
    total, rows = Perplexity(0.0, 0), mds_rows(folder, split, model_dir)
    for start in tqdm(range(0, len(rows), batch), desc="ppl", unit="batch", disable=not progress):
        block = torch.stack(rows[start : start + batch])
        labels = block[:, 1:].clone()
        labels[labels == pad] = IGNORE_INDEX
        nll, count = token_nll(model.model, block[:, :-1], labels)
        total = Perplexity(total.nll_sum + nll, total.tokens + count)
    return total


def text_windows(model: EvalModel, files: list[Path], context: int) -> list[torch.Tensor]:
    from lm2.pipeline.data.sources import read_documents

    stream: list[int] = []
    for document in read_documents(files):
        stream += model.encode(document) + [model.tokenizer.eos_token_id]
    return [torch.tensor(stream[i : i + context]) for i in range(0, len(stream), context) if len(stream) - i > 1]


def text_perplexity(model: EvalModel, files: list[Path], context: int, progress: bool = True) -> Perplexity:
    total = Perplexity(0.0, 0)
    for window in tqdm(text_windows(model, files, context), desc="ppl", unit="window", disable=not progress):
        nll, count = token_nll(model.model, window[None, :-1], window[None, 1:])
        total = Perplexity(total.nll_sum + nll, total.tokens + count)
    return total


def carried_perplexity(model: EvalModel, files: list[Path], context: int, progress: bool = True) -> Perplexity:
    """Each document in pieces of `context` tokens, the cache (memory, and the open segment's keys) carried."""
    from lm2.pipeline.data.sources import read_documents

    total = Perplexity(0.0, 0)
    for document in tqdm(list(read_documents(files)), desc="ppl", unit="document", disable=not progress):
        ids = torch.tensor(model.encode(document) + [model.tokenizer.eos_token_id])
        cache = None
        for start in range(0, len(ids) - 1, context):
            piece = ids[start : start + context + 1]
            nll, count, cache = token_nll_cached(model.model, piece[None, :-1], piece[None, 1:], cache)
            total = Perplexity(total.nll_sum + nll, total.tokens + count)
    return total


def token_nll_cached(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, cache):
    """token_nll of inputs that continue the stream in `cache` (None: a new one); returns the cache too."""
    inputs, labels = inputs.to(model.device), labels.to(model.device)
    with torch.no_grad():
        out = model(inputs, past_key_values=cache, use_cache=True)
    logp = torch.log_softmax(out.logits.float(), dim=-1)
    picked = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return float(-picked.sum()), labels.numel(), out.past_key_values


def perplexity(
    model_dir: str,
    data: list[str],
    split: str = "val",
    context: int | None = None,
    progress: bool = True,
    device: str | None = None,
    carry: bool = False,
) -> tuple[Perplexity, str]:
    """(perplexity, what was scored) of the model in model_dir on one prepared dataset or on text files.
    device: a torch device name, None for the GPU when there is one. carry: score text files document by document
    with the memory carried between pieces (LM2 models)."""
    from lm2.pipeline.data.metadata import METADATA_FILE
    from lm2.pipeline.data.sources import find_input_files
    from lm2.pipeline.eval.hf_model import load_model

    model = load_model(model_dir, device)
    prepared = len(data) == 1 and (Path(data[0]) / METADATA_FILE).is_file()
    if carry and (model.kind != "LM2" or prepared):
        raise EvalError(
            "--carry scores text files with an LM2 model's memory carried between pieces: give an LM2 "
            "export and .txt/.jsonl files"
        )
    if prepared:
        result = mds_perplexity(model, Path(data[0]), split, Path(model_dir), progress=progress)
        return result, f"{data[0]} ({split} split)"
    context = context or TEXT_CONTEXT
    if model.max_tokens is not None:
        context = min(context, model.max_tokens)
    files = find_input_files(data)
    if carry:
        result = carried_perplexity(model, files, context, progress)
        return result, f"{len(files)} text file(s), documents in pieces of {context} tokens, memory carried"
    return text_perplexity(model, files, context, progress), f"{len(files)} text file(s), windows of {context} tokens"
