"""The training loader: prepared datasets -> mosaicml-streaming -> micro-batches for one data-parallel replica.

This is the ONLY module that maps lm2's ranks onto streaming's view of the world.

Ranks. Every TP rank and every pipeline stage of a data-parallel replica must read the same rows, and
replicas must read disjoint ones. streaming partitions samples by the World it detects from RANK /
WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE, and its `replication=k` gives k *consecutive* ranks the same
samples. Under lm2's rank order (TP fastest, then DP, then PP; parallel/dims.py) that covers TP but not PP:
the stages of one replica are dp*tp ranks apart. Remapping RANK in the environment is not safe either:
streaming also uses that World to coordinate the processes of one node (the local leader creates the shared
memory, the node-local barrier counts its processes, the cache directory is per node), and a remapped rank
can land on another node's block, so two processes would lead one node and none another.

streaming keeps two Worlds for exactly this reason: `_unique_rank_world` (who a process really is, used for
coordination) and `_parallel_rank_world` (who it is for partitioning; `replication` only replaces this one).
`_ReplicaDataset` keeps the detected unique World and replaces the parallel one with a world of `dp` ranks on
one node in which this process is rank `dp_rank`. Every process of a node still builds the whole epoch's
partition on its local leader and then picks row [node, rank_of_node, worker], so any mapping of processes onto
parallel ranks is consistent.

Order and resume. With one parallel node, replica r reads positions r, r + dp, r + 2 dp, ... of the epoch's
global order, which depends only on (num_canonical_nodes, shuffle_seed, epoch). After k micro-batches of B rows
the replicas together consumed exactly positions [0, k*dp*B); a checkpoint records that count and streaming
resumes by dropping it (drop_first), so the remaining positions are read exactly once, by however many replicas
the resumed run has. Each epoch stops after the last full global micro-batch: streaming pads a rank's tail with
repeated rows when the epoch is not a multiple of dp, and those are never read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from math import ceil
from pathlib import Path
from time import sleep
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from streaming import Stream, StreamingDataset
from streaming.base.constant import TICK
from streaming.base.dataset import _ShardState
from streaming.base.format import get_index_basename
from streaming.base.world import World
from torch.utils.data import DataLoader

from lm2.model.config import ModelConfig
from lm2.model.errors import DataError
from lm2.model.lm import IGNORE_INDEX
from lm2.pipeline.data import remote_cache
from lm2.pipeline.data.config import DataConfig, StreamConfig
from lm2.pipeline.data.lanes import LaneLoader
from lm2.pipeline.data.metadata import DOCUMENTS_FILE, check_data_compatible, check_local_shards, read_metadata
from lm2.pipeline.data.shared_memory import clean_stale_shared_memory, registration_lock
from lm2.pipeline.data.storage import Location
from lm2.pipeline.files import sha256_file
from lm2.pipeline.parallel.dims import ParallelDims

_STATE_KEYS = ("epoch", "sample_in_epoch", "num_canonical_nodes", "shuffle_seed", "initial_physical_nodes")


class _ReplicaDataset(StreamingDataset):
    """A StreamingDataset that partitions rows by data-parallel replica instead of by global rank."""

    def __init__(self, *, dp_rank: int, dp_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._parallel_rank_world = World(num_nodes=1, ranks_per_node=dp_size, workers_per_rank=1, worker=dp_rank)
        self.length = ceil(self.epoch_size / dp_size)

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        """streaming's reader raises IndexError on a decompressed shard shorter than, or other than, its index
        says (a disk that filled up while decompressing, a copy cut short): name the file instead."""
        try:
            return super().get_item(sample_id, retry)
        except IndexError as error:
            shard = self.shards[self.spanner[sample_id][0]]
            path = Path(shard.dirname) / shard.split / shard.raw_data.basename
            fix = (
                f"delete it (streaming decompresses {shard.zip_data.basename} again)"
                if shard.zip_data
                else "re-run `lm2 data prepare`"
            )
            raise DataError(f"shard {path} is corrupt ({error}): {fix}") from None

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """streaming's own blocking wait for a shard its download thread is preparing never ends if that thread
        dies on the shard (a checksum failure leaves it PREPARING): wait here instead, watching the thread's
        failure flag, which then surfaces as streaming's "Background thread failed" (a DataError in RowLoader)."""
        if not blocking:
            super().prepare_shard(shard_id, blocking=False)
        elif not self._fetch(shard_id):
            raise RuntimeError("Background thread failed. Check other traceback.")

    def _fetch(self, shard_id: int) -> bool:
        """Requests the shard until nobody is preparing it: again each time it is found evicted. False if a
        background thread failed meanwhile."""
        while True:
            super().prepare_shard(shard_id, blocking=False)
            if self._shard_states[shard_id] != _ShardState.PREPARING:
                return True
            failed = getattr(self, "_event", None)
            if failed is not None and failed.is_set():
                return False
            sleep(TICK)

    def _ready_thread(self, it: Any) -> None:
        """streaming's ready thread (0.13: it moves it.ready_index over rows whose shards are local), with one
        change. streaming requests a missing shard only when this thread reaches it; a shard that another rank of
        the node evicts between its download and this thread's next look (one TICK later) stays missing, and the
        rank waits forever. It did with a small data.cache_limit on a loaded machine; here the wait is _fetch's,
        which requests the shard again (tests/pipeline/test_data_remote.py reproduces the hang by slowing that
        look). A shard evicted after all is fetched again by get_item, as streaming's own reads do."""
        while not (it.should_exit() or it.ready_index == it.total or self._event.is_set()):
            if self.predownload is not None and self.predownload < it.ready_index - it.yield_index:
                sleep(TICK)
                continue
            sample_id = it.sample_ids[it.ready_index]
            if sample_id != -1 and not self._fetch(self.spanner[sample_id][0]):  # -1: streaming's padding
                break
            it.ready_index += 1
        it.on_exit()


def _streams(
    cfg: DataConfig, model: ModelConfig, tokenizer_checksum: str | None
) -> tuple[list[Stream], int, str | None]:
    """streaming Streams for cfg.streams after checking each dataset fits the model; returns the PAD id and the
    sha256 of the run's tokenizer too."""
    if not cfg.streams:
        raise DataError("data.streams is empty: list at least one folder written by `lm2 data prepare`")
    streams, pad_ids = [], set()
    for stream in cfg.streams:
        if stream.is_remote:
            local, metadata = remote_cache.cache_folder(cfg.cache_dir, stream.path, stream.split)
        else:
            local, metadata = stream.path, read_metadata(stream.path)
        # Without data.tokenizer, the first stream's tokenizer is the run's: every stream must share it.
        tokenizer_checksum = tokenizer_checksum or metadata.get("tokenizer", {}).get("sha256")
        check_data_compatible(metadata, model, tokenizer_checksum, where=stream.path)
        if stream.split not in metadata["splits"]:
            raise DataError(f"{stream.path} has no {stream.split} split (it has {', '.join(metadata['splits'])})")
        if not stream.is_remote:
            check_local_shards(Path(stream.path) / stream.split)
        pad_ids.add(metadata["tokenizer"]["pad_id"])
        streams.append(
            Stream(
                remote=stream.path if stream.is_remote else None,
                local=local,
                split=stream.split,
                proportion=stream.proportion,
            )
        )
    if len(pad_ids) > 1:
        raise DataError("data.streams were tokenized with different tokenizers; prepare them with one")
    return streams, pad_ids.pop(), tokenizer_checksum


class RowLoader:
    """Micro-batches of packed rows for this process's data-parallel replica, resumable mid-epoch.

    Iterating yields one epoch (the rest of it after a resume) of dicts with `input_ids` and `labels`
    ([micro_batch, row_length] int64; PAD labels are IGNORE_INDEX) and `id` ([micro_batch] row ids). Every
    rank of a replica yields the same rows. `state_dict()` is a small JSON-able dict for checkpoints.
    """

    def __init__(
        self,
        dataset: _ReplicaDataset,
        dims: ParallelDims,
        micro_batch: int,
        num_workers: int,
        pad_id: int,
        tokenizer_sha256: str | None = None,
    ) -> None:
        self.dataset, self.dims, self.micro_batch, self.pad_id = dataset, dims, micro_batch, pad_id
        self.tokenizer_sha256 = tokenizer_sha256
        """The tokenizer the rows were made with (checkpoints record it)."""
        # Its own generator: a DataLoader iterator otherwise draws its base seed from the global torch RNG, and
        # the global RNG state is part of what an exact resume must reproduce.
        self._loader = DataLoader(
            dataset,
            batch_size=micro_batch,
            num_workers=num_workers,
            drop_last=True,
            collate_fn=self._collate,
            generator=torch.Generator().manual_seed(0),
        )
        self._epoch, self._offset, self._rows_read = 0, 0, 0
        self._resumed: dict[str, Any] | None = None
        self._started = False

    @property
    def rows_per_global_batch(self) -> int:
        return self.dims.dp * self.micro_batch

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))
        labels = tokens[:, 1:].clone()
        labels[labels == self.pad_id] = IGNORE_INDEX
        for i, sample in enumerate(samples):
            if "mask" in sample:  # a dataset prepared with --answer-field: the loss covers the answers only
                labels[i, torch.from_numpy(sample["mask"][1:] == 0)] = IGNORE_INDEX
        return {
            "input_ids": tokens[:, :-1],
            "labels": labels,
            "id": torch.tensor([int(s["id"]) for s in samples], dtype=torch.int64),
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batches = iter(self._loader)
        self._started = True
        first = self._next(batches, 0)
        # streaming fixes the epoch when iteration starts: it is next_epoch - 1 from then on.
        self._epoch = self.dataset.next_epoch - 1
        resumed = self._resumed if self._resumed and self._resumed["epoch"] == self._epoch else None
        self._offset, self._rows_read = (resumed["sample_in_epoch"] if resumed else 0), 0
        total = (self.dataset.epoch_size - self._offset) // self.rows_per_global_batch
        if total == 0 and not resumed:
            raise DataError(
                f"an epoch has {self.dataset.epoch_size} rows, fewer than one global micro-batch "
                f"({self.rows_per_global_batch} = dp {self.dims.dp} x micro batch "
                f"{self.micro_batch}): prepare more data or lower the batch"
            )
        for step in range(total):
            batch = first if step == 0 else self._next(batches, step)
            if batch is None:
                raise self._shard_error(f"the data ended after {step} of {total} micro-batches of epoch {self._epoch}")
            self._rows_read += len(batch["id"])
            yield batch

    @staticmethod
    def _shard_error(what: str) -> DataError:
        return DataError(
            f"{what}: a shard failed to download or its checksum did not match (see the log above); "
            "re-run `lm2 data prepare`, or delete data.cache_dir for remote streams"
        )

    def _next(self, batches: Iterator, step: int) -> dict[str, torch.Tensor] | None:
        # streaming reports a failed shard in one of three ways, depending on which thread reached it first:
        # its download thread ends the epoch early (caught by the caller) or sets a flag that surfaces here as
        # a RuntimeError; the main thread, preparing the shard itself, raises ValueError("Checksum failure").
        try:
            return next(batches, None)
        except RuntimeError as error:
            if "Background thread failed" not in str(error):
                raise
            raise self._shard_error(f"reading micro-batch {step}") from None
        except ValueError as error:
            if "Checksum failure" not in str(error):
                raise
            raise self._shard_error(f"reading micro-batch {step} ({error})") from None
        except DataError as error:  # from a DataLoader worker, the message carries the worker's traceback
            raise DataError(str(error).rstrip().splitlines()[-1].split("DataError: ", 1)[-1]) from None

    def state_dict(self) -> dict[str, Any]:
        """Where this run is in the data: rows consumed by all replicas so far in the current epoch."""
        if self._resumed is not None and not self._started:
            return dict(self._resumed)
        epoch_done = self._offset + self._rows_read * self.dims.dp
        return {
            "epoch": self._epoch,
            "sample_in_epoch": epoch_done,
            "num_canonical_nodes": self.dataset.num_canonical_nodes,
            "shuffle_seed": self.dataset.shuffle_seed,
            "initial_physical_nodes": 1,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resumes from `state_dict()` of an earlier run, with the same or another data-parallel size.
        Call it on every rank before iterating."""
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise DataError(f"data loader state lacks {', '.join(missing)}: it is not from RowLoader.state_dict()")
        self._resumed = dict(state)
        self.dataset.load_state_dict(self._resumed)


def _remove_abandoned_files(dataset: StreamingDataset) -> None:
    """Removes what killed jobs left in remote streams' cache folders (remote_cache.remove_abandoned)."""
    for stream, begin, count in zip(dataset.streams, dataset.shard_offset_per_stream, dataset.shards_per_stream):
        if stream.remote is None:  # the user's dataset folder, not a cache
            continue
        named = {get_index_basename()} | {
            info.basename
            for shard in dataset.shards[begin : begin + count]
            for pair in shard.file_pairs
            for info in pair
            if info
        }
        remote_cache.remove_abandoned(Path(stream.local, stream.split), named)


def _dataset(cfg: DataConfig, streams: list[Stream], dp_rank: int, dp_size: int, micro_batch: int) -> StreamingDataset:
    try:
        return _ReplicaDataset(
            dp_rank=dp_rank,
            dp_size=dp_size,
            streams=streams,
            batch_size=micro_batch,
            shuffle=cfg.shuffle,
            shuffle_seed=cfg.shuffle_seed,
            num_canonical_nodes=cfg.num_canonical_nodes,
            partition_algo="orig",
            cache_limit=cfg.cache_limit,
            validate_hash="xxh64" if cfg.validate_hash else None,
        )
    except ValueError as error:
        if "Cache limit" not in str(error):
            raise
        raise DataError(f"data.cache_limit {cfg.cache_limit}: {error}") from None


def build_train_loader(
    cfg: DataConfig, dims: ParallelDims, rank: int, micro_batch: int, model: ModelConfig
) -> RowLoader:
    """The loader of rank `rank`; every rank must call it (streaming synchronises them while building).

    Args:
        cfg: the run's data section.
        dims: the parallel layout; rows are split over dims.dp replicas.
        rank: this process's global rank.
        micro_batch: rows per micro-batch per replica (streaming's batch_size).
        model: the model config the rows must fit (row length, vocabulary).
    """
    dataset, pad_id, checksum = _replica_dataset(cfg, dims, rank, micro_batch, model)
    return RowLoader(dataset, dims, micro_batch, cfg.num_workers, pad_id, checksum)


def build_lane_loader(
    cfg: DataConfig, dims: ParallelDims, rank: int, micro_batch: int, grad_accum: int, model: ModelConfig
) -> LaneLoader:
    """The document-lane loader of rank `rank` (lanes.py), for train.carry.mode: document; every rank must call it.
    The streams must be prepared with --packing document; they are read in order, without proportions."""
    if any(stream.proportion is not None for stream in cfg.streams):
        raise DataError(
            "data.streams proportions are not supported with train.carry.mode: document (every document is read "
            "once per epoch): drop the proportions"
        )
    tables = [_documents_table(cfg, stream) for stream in cfg.streams]
    dataset, pad_id, checksum = _replica_dataset(cfg, dims, rank, micro_batch, model)
    offsets = [int(offset) for offset in dataset.sample_offset_per_stream]
    first_sample = np.concatenate([offset + np.cumsum(table) - table for offset, table in zip(offsets, tables)])
    return LaneLoader(
        dataset.get_item,
        np.concatenate(tables),
        first_sample,
        dims.dp,
        dims.coords(rank)[1],
        micro_batch,
        grad_accum,
        cfg.shuffle,
        cfg.shuffle_seed,
        pad_id,
        model.row_length + 1,
        checksum,
    )


def _replica_dataset(
    cfg: DataConfig, dims: ParallelDims, rank: int, micro_batch: int, model: ModelConfig
) -> tuple[_ReplicaDataset, int, str | None]:
    """The streams' dataset for this rank's replica, after checking they fit the model, its PAD id and the sha256
    of the run's tokenizer. Every rank must call it (streaming synchronises them while building)."""
    if micro_batch < 1:
        raise DataError(f"micro batch must be >= 1, got {micro_batch}")
    checksum = sha256_file(cfg.tokenizer) if cfg.tokenizer and Path(cfg.tokenizer).is_file() else None
    if cfg.tokenizer and checksum is None:
        raise DataError(f"data.tokenizer {cfg.tokenizer} does not exist")
    streams, pad_id, checksum = _streams(cfg, model, checksum)
    leader = int(os.environ.get("LOCAL_RANK", 0)) == 0  # one process per node
    with registration_lock(leader):
        if leader:  # before any rank builds its dataset
            clean_stale_shared_memory([os.path.join(stream.local, stream.split) for stream in streams])
        if dist.is_initialized():
            dist.barrier()
        dataset = _dataset(cfg, streams, dims.coords(rank)[1], dims.dp, micro_batch)
        if leader:
            _remove_abandoned_files(dataset)
        if dist.is_initialized():
            dist.barrier()  # every rank has registered; none downloads before the cleanup
    return dataset, pad_id, checksum


def _documents_table(cfg: DataConfig, stream: StreamConfig) -> np.ndarray:
    """The stream's rows per document (prepare.py's documents.npy); refuses a stream not packed by document."""
    if stream.is_remote:
        local, metadata = remote_cache.cache_folder(cfg.cache_dir, stream.path, stream.split)
    else:
        local, metadata = stream.path, read_metadata(stream.path)
    if metadata.get("packing") != "document":
        raise DataError(
            f"{stream.path} was prepared with --packing {metadata.get('packing')}: train.carry.mode: document "
            "reads documents in lanes; prepare it again with --packing document"
        )
    folder = Path(local) / stream.split
    folder.mkdir(parents=True, exist_ok=True)
    return np.load(Location(stream.path).fetch(f"{stream.split}/{DOCUMENTS_FILE}", folder))
