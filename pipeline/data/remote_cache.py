"""The local cache of a remote stream (s3://, gs://, ...): which folder holds it, and which of its files may go.

The folder is keyed by the dataset's identity: the URL and the sha256 of its lm2_data.json and of the split's
index.json. A dataset prepared again at the same URL has other ones, so it gets a folder of its own, fetched anew;
its shards never mix with the old dataset's, whose folder a job may still be reading.

Cleaning a cache folder (one shared by the jobs of several nodes, on a cluster file system) removes only files that
are provably abandoned: partial downloads that the file system has not modified for ABANDONED_AFTER, measured by its
own clock, so that nodes' clocks do not matter. A download in flight writes to its file continuously, and streaming
gives a shard's download at most its download_timeout (60 s) before it fails.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lm2.model.errors import DataError
from lm2.pipeline.data.metadata import METADATA_FILE, read_metadata

INDEX = "index.json"
ABANDONED_AFTER = 10 * 60
"""Seconds without a write after which a partial file in a cache folder counts as abandoned."""


def _download(url: str, local: Path) -> None:
    from streaming.base.storage import CloudDownloader

    try:
        CloudDownloader.direct_download(url, str(local), 60)
    except Exception as error:  # every storage backend raises its own types
        raise DataError(f"cannot fetch {url} ({error}); check the URL and credentials") from None


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_folder(cache_dir: str, url: str, split: str) -> tuple[str, dict[str, Any]]:
    """(the local folder of stream `url`'s split `split` under `cache_dir`, the dataset's lm2_data.json). The folder
    holds lm2_data.json and `<split>/index.json` as fetched now: streaming reads that index, not an older one."""
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=root))  # every process its own: several fetch at once
    try:
        metadata = read_metadata(url, staging)
        _download(f"{url.rstrip('/')}/{split}/{INDEX}", staging / INDEX)
        identity = hashlib.sha256(f"{_digest(staging / METADATA_FILE)} {_digest(staging / INDEX)}".encode())
        folder = root / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{identity.hexdigest()[:16]}"
        (folder / split).mkdir(parents=True, exist_ok=True)
        os.replace(staging / METADATA_FILE, folder / METADATA_FILE)  # the same bytes as any other process's copy
        os.replace(staging / INDEX, folder / split / INDEX)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(folder), metadata


def _file_system_now(folder: Path) -> float:
    """The current time as the file system holding `folder` stamps files."""
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".now-") as probe:
        return os.fstat(probe.fileno()).st_mtime


def remove_abandoned(folder: Path, named: Iterable[str]) -> None:
    """Removes the files under `folder` that `named` (the index's files, relative to `folder`) does not name and
    that are abandoned (see the module's docstring): downloads and decompressions a killed job cut short (boto3
    writes `<shard>.<8 hex digits>`, streaming `<shard>.tmp`, each renamed once complete), which streaming neither
    counts nor removes, so that every kill would grow the cache past data.cache_limit for good."""
    if not folder.is_dir():
        return
    named = set(named)
    now = _file_system_now(folder)
    for path in folder.rglob("*"):
        try:
            if path.is_file() and str(path.relative_to(folder)) not in named:
                if now - path.stat().st_mtime > ABANDONED_AFTER:
                    path.unlink()
        except FileNotFoundError:  # renamed into place or removed meanwhile by its writer
            continue
