"""`lm2_data.json`: what a prepared dataset holds, and the checks that it fits a model and a tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lm2.model.config import ModelConfig
from lm2.model.errors import DataError

METADATA_FILE = "lm2_data.json"
DOCUMENTS_FILE = "documents.npy"
"""With packing "document", in every split folder (and part folder): each document's row count, in row order."""
FORMAT = "lm2-packed-rows-v1"
VAL_ID_OFFSET = 1 << 40
"""Row ids: train rows are 0..n-1, val rows VAL_ID_OFFSET + 0..m-1, so ids are unique within a dataset."""


def check_vocab_fits(vocab_size: int, model: ModelConfig, where: str) -> None:
    if vocab_size > model.vocab_size:
        raise DataError(
            f"{where} has {vocab_size} pieces but model.vocab_size is {model.vocab_size}: ids up to "
            f"{vocab_size - 1} would index past the embedding; set model.vocab_size >= {vocab_size} "
            "or train a smaller tokenizer"
        )


def check_data_compatible(
    metadata: dict[str, Any], model: ModelConfig, tokenizer_checksum: str | None = None, where: str = "the dataset"
) -> None:
    """Refuses data the model cannot train on: another row length, a larger vocabulary or another tokenizer.

    Args:
        metadata: a dataset's lm2_data.json (read_metadata).
        model: the model config of the run.
        tokenizer_checksum: sha256 of the run's tokenizer .model, or None to skip that check.
        where: how to name the dataset in errors.
    """
    if metadata.get("format") != FORMAT:
        raise DataError(
            f"{where} is not an lm2 dataset of format {FORMAT} (found {metadata.get('format')!r}): "
            "write it with `lm2 data prepare`"
        )
    if metadata["row_length"] != model.row_length:
        raise DataError(
            f"{where} holds rows of {metadata['row_length']} tokens but model.row_length is "
            f"{model.row_length}: re-run `lm2 data prepare --row-length {model.row_length}` or train "
            f"with model.row_length={metadata['row_length']}"
        )
    tokenizer = metadata["tokenizer"]
    check_vocab_fits(tokenizer["vocab_size"], model, f"the tokenizer of {where}")
    if tokenizer_checksum is not None and tokenizer["sha256"] != tokenizer_checksum:
        raise DataError(
            f"{where} was tokenized with {tokenizer['file']} (sha256 {tokenizer['sha256'][:12]}...), "
            f"not with the run's tokenizer (sha256 {tokenizer_checksum[:12]}...): re-run "
            "`lm2 data prepare` with the run's tokenizer or point data.tokenizer at the one used"
        )


def read_metadata(path: str, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Reads `<path>/lm2_data.json`; a remote path (s3://, gs://, ...) is downloaded into `cache_dir` first."""
    if "://" in path:
        from streaming.base.storage import CloudDownloader

        local = Path(cache_dir or ".") / METADATA_FILE
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            CloudDownloader.direct_download(f"{path.rstrip('/')}/{METADATA_FILE}", str(local), 60)
        except Exception as error:  # every storage backend raises its own types
            raise DataError(f"cannot fetch {path}/{METADATA_FILE} ({error}); check the URL and credentials") from None
    else:
        local = Path(path) / METADATA_FILE
        if not local.is_file():
            raise DataError(
                f"{local} does not exist: {path} is not a folder written by `lm2 data prepare` "
                "(or that run did not finish)"
            )
    try:
        return json.loads(local.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{local} is corrupt ({error}); re-run `lm2 data prepare`") from None


def check_local_shards(split_folder: Path) -> None:
    """Cheap startup check of a local split: its index lists shards that exist with the recorded sizes, and the
    decompressed copies streaming left beside compressed shards have theirs.
    Content is checked per shard by its xxh64 when streaming decompresses it (DataConfig.validate_hash)."""
    index_file = split_folder / "index.json"
    if not index_file.is_file():
        raise DataError(f"{index_file} does not exist: this split was not written; re-run `lm2 data prepare`")
    try:
        shards = json.loads(index_file.read_text())["shards"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as error:
        raise DataError(f"{index_file} is corrupt ({error}); re-run `lm2 data prepare`") from None
    for shard in shards:
        info = shard.get("zip_data") or shard["raw_data"]
        file = split_folder / info["basename"]
        size = file.stat().st_size if file.is_file() else None
        if size != info["bytes"]:
            found = "missing" if size is None else f"{size} bytes"
            raise DataError(
                f"shard {file} is corrupt: index.json records {info['bytes']} bytes, found {found}; "
                "re-run `lm2 data prepare` or restore the folder"
            )
        raw = split_folder / shard["raw_data"]["basename"]
        if shard.get("zip_data") and raw.is_file() and raw.stat().st_size != shard["raw_data"]["bytes"]:
            raise DataError(
                f"shard {raw} is corrupt: index.json records {shard['raw_data']['bytes']} bytes, found "
                f"{raw.stat().st_size}; delete it (streaming decompresses {file.name} again)"
            )
