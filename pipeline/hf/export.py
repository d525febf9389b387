"""`lm2 export hf`: a checkpoint of any layout -> a verified Hugging Face folder, made with the tokenizer the run
trained with; `--force` replaces only an earlier export."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from lm2.model.errors import ExportError
from lm2.pipeline.checkpoint.format import LATEST, Manifest, read_manifest
from lm2.pipeline.checkpoint.reader import model_config, read_full_state, resolve
from lm2.pipeline.checkpoint.verify import Team
from lm2.pipeline.checkpoint.verify import verify as verify_checkpoint
from lm2.pipeline.files import sha256_file
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


MARKER = "lm2_export.json"
"""Written into every export: what it was made from and the files it holds. `--force` replaces only such a folder."""
RUN_FOLDER_FILES = ("checkpoints", LATEST, ".lock", "metrics.jsonl", "config.yaml", "wandb")


def _tokenizer_path(manifest: Manifest, given: str | None) -> Path:
    """The tokenizer to export with: --tokenizer, else the run's data.tokenizer; it must be the one the checkpoint
    records (Manifest.tokenizer_sha256), when it records one."""
    name = given or manifest.config["data"].get("tokenizer")
    if name is None:
        raise ExportError(
            "the run named no data.tokenizer (it took its streams' tokenizer): pass --tokenizer PATH to the "
            "sentencepiece .model its data was prepared with"
        )
    path = Path(name)
    if not path.is_file():
        raise ExportError(
            f"the tokenizer {path} does not exist (the run's data.tokenizer, relative to where it "
            "trained): pass --tokenizer PATH to the run's sentencepiece .model"
        )
    expected = manifest.tokenizer_sha256
    if expected is not None and sha256_file(path) != expected:
        raise ExportError(
            f"{path} is not the tokenizer the checkpoint was trained with (it records sha256 {expected[:12]}...): "
            "pass --tokenizer PATH to that one (the training data's lm2_data.json names its file)"
        )
    return path


def _not_replaceable(out: Path, source: Path) -> str | None:
    """Why --force must not delete folder `out`, or None for an earlier lm2 export holding nothing else."""
    where = out.resolve()
    if where == Path.cwd().resolve():
        return "is the current folder"
    if where == Path.home().resolve():
        return "is your home folder"
    found = [name for name in RUN_FOLDER_FILES if (out / name).exists()] + [p.name for p in out.glob("step_*")]
    if found:
        return f"holds a run or its checkpoints ({found[0]})"
    if where == source.resolve() or where in source.resolve().parents:
        return "holds the checkpoint being exported"
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return None
    if MARKER not in entries:
        return f"is not an lm2 export (no {MARKER}; it holds {entries[0]})"
    others = set(entries) - {MARKER, *json.loads((out / MARKER).read_text()).get("files", [])}
    return f"holds {sorted(others)[0]}, which the export did not write" if others else None


def _check_output(out: Path, force: bool, source: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder: choose another output folder")
    if not force:
        raise ExportError(f"{out} exists: choose another output folder or pass --force to replace an earlier export")
    problem = _not_replaceable(out, source)
    if problem:
        raise ExportError(
            f"--force replaces only a folder written by `lm2 export hf`, and {out} {problem}: choose another "
            "output folder"
        )


def _write_marker(folder: Path, checkpoint: Path, step: int, tokenizer: Path) -> None:
    files = sorted(p.name for p in folder.iterdir())
    record = {"checkpoint": str(checkpoint), "step": step, "tokenizer_sha256": sha256_file(tokenizer), "files": files}
    (folder / MARKER).write_text(json.dumps(record, indent=1) + "\n")


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
    _check_output(out, force, folder)
    listed, team = read_manifest(folder), Team()
    steps = team.threads + listed.layout.tp + 2 + int(verify)  # verifying threads, TP ranks, writes
    with tqdm(total=steps, desc=f"export {folder.name}", unit="step", disable=not progress) as bar:

        def tick(what: str) -> None:
            bar.set_postfix_str(what, refresh=False)
            bar.update()

        manifest = verify_checkpoint(folder, team, tick).manifest
        cfg = model_config(manifest)
        sentencepiece = _tokenizer_path(manifest, tokenizer)
        state = read_full_state(folder, manifest, tick)
        model = hf_model(cfg, state, special_token_ids(sentencepiece))
        # A stable name: transformers keeps a copy of remote code per folder name (verify loads it from here).
        tmp = out.parent / f".{out.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            weight_files, difference = _write(tmp, model, cfg, state, sentencepiece, verify, max_shard_size, tick)
            _write_marker(tmp, folder, manifest.step, sentencepiece)
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
