"""The `data` section of a run config: which prepared datasets to stream and how to order them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lm2.model.config import require_choice
from lm2.model.errors import ConfigError

Split = Literal["train", "val"]


@dataclass(frozen=True)
class StreamConfig:
    path: str
    """A folder written by `lm2 data prepare`: a local path or a remote URL (s3://, gs://, oci://, ...)."""
    proportion: float | None = None
    """Share of each epoch drawn from this stream. None everywhere: every row once per epoch. Either all
    streams give a proportion or none does."""
    split: Split = "train"
    """Sub-folder of `path` to read: train or val."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("data.streams[].path is empty: give the folder written by `lm2 data prepare`")
        if self.proportion is not None and not self.proportion > 0:
            raise ConfigError(
                f"data.streams[].proportion must be > 0, got {self.proportion} "
                f"(stream {self.path}); drop the stream instead of giving it 0"
            )
        require_choice("data.streams[].split", self.split, Split)

    @property
    def is_remote(self) -> bool:
        return "://" in self.path


@dataclass(frozen=True)
class DataConfig:
    streams: list[StreamConfig] = field(default_factory=list)
    """Prepared datasets to mix. All must share one tokenizer and row length."""
    tokenizer: str | None = None
    """The sentencepiece .model the run uses; its sha256 must match the shards'. None skips that check."""
    cache_dir: str = "runs/cache/streaming"
    """Local cache for remote streams (one sub-folder per stream); local streams are read in place."""
    cache_limit: str | None = None
    """Most bytes of remote shards kept in cache_dir (e.g. "10gb"); streaming evicts the least recently used
    shards past it. None keeps every shard. It must hold a few shards per rank of a node."""
    shuffle: bool = True
    """Shuffle rows (seeded, so the order is reproducible)."""
    shuffle_seed: int = 1234
    """Seed of the row order; the order changes each epoch but is a function of (seed, epoch) only."""
    num_canonical_nodes: int = 1
    """streaming's canonical nodes. Fix it for the life of a run: the global row order depends only on it
    and the seed, which is what lets a resume use a different data-parallel size. Unless an epoch's row count
    is a multiple of it, streaming repeats rows to even the canonical nodes, so 1 (the default) never repeats."""
    num_workers: int = 0
    """DataLoader worker processes per rank. Rows are pre-tokenized, so 0 (read in the training process) is
    enough for small models; raise it when reading remote shards or feeding large batches."""
    validate_hash: bool = True
    """Check each shard's xxh64 (recorded by prepare) when it is decompressed, so a corrupt shard fails."""

    def __post_init__(self) -> None:
        if self.shuffle_seed < 0:
            raise ConfigError(f"data.shuffle_seed must be >= 0, got {self.shuffle_seed}")
        if self.num_canonical_nodes < 1:
            raise ConfigError(f"data.num_canonical_nodes must be >= 1, got {self.num_canonical_nodes}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        with_proportion = [s.proportion is not None for s in self.streams]
        if any(with_proportion) and not all(with_proportion):
            raise ConfigError("data.streams: give a proportion to every stream or to none of them")
        paths = [(s.path, s.split) for s in self.streams]
        if len(set(paths)) != len(paths):
            raise ConfigError(
                "data.streams lists the same path and split twice; list it once with a larger proportion instead"
            )
