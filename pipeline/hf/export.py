"""`lm2 export hf`: a checkpoint of any layout -> a verified Hugging Face folder."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from lm2.model.errors import ExportError
from lm2.pipeline.checkpoint.format import Manifest, read_manifest
from lm2.pipeline.checkpoint.reader import local_hashes, model_config, read_full_state, resolve, verified_manifest
from lm2.pipeline.hf.folder import hf_model, special_token_ids, write_folder, write_tokenizer
from lm2.pipeline.hf.verify import verify_export


@dataclass
class ExportResult:
    folder: Path
    checkpoint: Path
    step: int
    architecture: str
    parameters: int
    weight_files: list[str]
    max_logit_difference: float | None

    def summary(self) -> str:
        verified = (
            ""
            if self.max_logit_difference is None
            else f", verified (max logit difference {self.max_logit_difference:.2g})"
        )
        return (
            f"wrote {self.folder}: {self.architecture}, {self.parameters:,} parameters in "
            f"{len(self.weight_files)} safetensors file(s), tokenizer, from {self.checkpoint} (step {self.step})"
            f"{verified}"
        )


def _tokenizer_path(manifest: Manifest, given: str | None) -> Path:
    path = Path(given or manifest.config["data"]["tokenizer"])
    if not path.is_file():
        raise ExportError(
            f"the tokenizer {path} does not exist (the run's data.tokenizer, relative to where it "
            "trained): pass --tokenizer PATH to the run's sentencepiece .model"
        )
    return path


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ExportError(f"{out} exists: choose another output folder or pass --force to overwrite it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder: choose another output folder")


def _write(tmp: Path, model, cfg, state, sentencepiece: Path, verify: bool, max_shard_size: str, tick):
    """Weights, configs and tokenizer into tmp, then the check; returns (weight files, max logit difference)."""
    weight_files = write_folder(model, tmp, max_shard_size)
    tick("wrote weights")
    write_tokenizer(sentencepiece, tmp)
    tick("wrote tokenizer")
    if not verify:
        return weight_files, None
    difference = verify_export(tmp, cfg, state)
    tick("verified")
    return weight_files, difference


def export_hf(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    force: bool = False,
    verify: bool = False,
    tokenizer: str | None = None,
    max_shard_size: str = "5GB",
    progress: bool = True,
) -> ExportResult:
    """Reads, merges and writes into a temp folder renamed into place: the folder appears only complete (and
    verified, when asked)."""
    folder, out = resolve(checkpoint), Path(out)
    _check_output(out, force)
    listed = read_manifest(folder)
    steps = len(listed.files) + listed.layout.tp + 2 + int(verify)  # files, TP ranks, writes
    with tqdm(total=steps, desc=f"export {folder.name}", unit="step", disable=not progress) as bar:

        def tick(what: str) -> None:
            bar.set_postfix_str(what, refresh=False)
            bar.update()

        manifest = verified_manifest(folder, lambda at, files: local_hashes(at, files, tick))
        cfg = model_config(manifest)
        sentencepiece = _tokenizer_path(manifest, tokenizer)
        state = read_full_state(folder, manifest, tick)
        model = hf_model(cfg, state, special_token_ids(sentencepiece))
        # A stable name: transformers keeps a copy of remote code per folder name (verify loads it from here).
        tmp = out.parent / f".{out.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            weight_files, difference = _write(tmp, model, cfg, state, sentencepiece, verify, max_shard_size, tick)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return ExportResult(
        out,
        folder,
        manifest.step,
        type(model).__name__,
        sum(t.numel() for t in state.values()),
        weight_files,
        difference,
    )
