"""The training loader on real gloo ranks: rows split by data-parallel replica, exactly-once resume, refusals."""

import json
import shutil
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from lm2.model.errors import DataError
from lm2.pipeline.data.config import DataConfig, StreamConfig
from lm2.pipeline.data.metadata import check_data_compatible, read_metadata
from tests.distributed import run_distributed
from tests.pipeline.data_fixtures import tiny_model_config


def _read_rows(
    dataset: str, out: str, tag: str, tp: int, pp: int, micro_batch: int, batches: int | None, state_file: str | None
) -> None:
    """One rank: build the loader, optionally resume, read `batches` micro-batches (None: the epoch)."""
    import torch.distributed as dist

    from lm2.pipeline.data.streaming import build_train_loader
    from lm2.pipeline.parallel.init import init_distributed

    dims = init_distributed(tp=tp, pp=pp)
    rank = dist.get_rank()
    loader = build_train_loader(
        DataConfig(streams=[StreamConfig(dataset)]), dims, rank, micro_batch, tiny_model_config()
    )
    if state_file:
        loader.load_state_dict(json.loads(Path(state_file).read_text()))
    ids = [id_ for batch in islice(loader, batches) for id_ in batch["id"].tolist()]
    record = {"coords": dims.coords(rank), "ids": ids, "state": loader.state_dict()}
    Path(out, f"{tag}-{rank}.json").write_text(json.dumps(record))


def run(prepared, tmp_path, tag, world_size, tp=1, pp=1, micro_batch=2, batches=None, state=None) -> list[dict]:
    run_distributed(
        _read_rows, world_size, (str(prepared), str(tmp_path), tag, tp, pp, micro_batch, batches, state and str(state))
    )
    return [json.loads((tmp_path / f"{tag}-{rank}.json").read_text()) for rank in range(world_size)]


def replicas(records: list[dict]) -> dict[int, list[list[int]]]:
    """dp_rank -> the id lists of its ranks."""
    by_dp: dict[int, list[list[int]]] = {}
    for record in records:
        by_dp.setdefault(record["coords"][1], []).append(record["ids"])
    return by_dp


def train_rows(prepared) -> int:
    return json.loads((prepared / "lm2_data.json").read_text())["splits"]["train"]["rows"]


@pytest.mark.parametrize(
    "world_size, tp, pp", [(2, 2, 1), pytest.param(4, 1, 2, marks=pytest.mark.slow)], ids=["tp2-dp1", "pp2-dp2"]
)
def test_ranks_of_a_replica_read_the_same_rows_and_replicas_are_disjoint(prepared, tmp_path, world_size, tp, pp):
    by_dp = replicas(run(prepared, tmp_path, "epoch", world_size, tp=tp, pp=pp))
    dp = world_size // (tp * pp)
    assert sorted(by_dp) == list(range(dp))
    for ranks in by_dp.values():
        assert all(ids == ranks[0] for ids in ranks)  # every TP rank and PP stage: same rows, same order
    union = [id_ for ranks in by_dp.values() for id_ in ranks[0]]
    assert len(union) == len(set(union))  # replicas disjoint, no row twice
    total = train_rows(prepared)
    assert total - 2 * dp < len(union) <= total and set(union) <= set(range(total))


@pytest.mark.slow
def test_resume_reads_every_row_once_with_the_same_or_another_dp_size(prepared, tmp_path):
    whole = replicas(run(prepared, tmp_path, "whole", 2))
    assert whole[0][0] != whole[1][0]
    uninterrupted = Counter(id_ for ranks in whole.values() for id_ in ranks[0])

    first = run(prepared, tmp_path, "first", 2, batches=3)
    state = tmp_path / "state.json"
    state.write_text(json.dumps(first[0]["state"]))
    assert first[0]["state"] == first[1]["state"] and first[0]["state"]["sample_in_epoch"] == 3 * 2 * 2
    consumed = Counter(id_ for record in first for id_ in record["ids"])

    for tag, world_size, micro_batch in (("same-dp", 2, 2), ("dp1", 1, 4)):
        rest = run(prepared, tmp_path, tag, world_size, micro_batch=micro_batch, state=state)
        resumed = consumed + Counter(id_ for record in rest for id_ in record["ids"])
        assert resumed == uninterrupted, tag
        assert max(resumed.values()) == 1, tag


def test_loader_state_survives_a_second_resume_in_one_process(prepared, tmp_path):
    from lm2.pipeline.data.streaming import build_train_loader
    from lm2.pipeline.parallel.dims import ParallelDims

    state = {
        "epoch": 0,
        "sample_in_epoch": 8,
        "num_canonical_nodes": 1,
        "shuffle_seed": 1234,
        "initial_physical_nodes": 1,
    }
    loader = build_train_loader(
        DataConfig(streams=[StreamConfig(str(prepared))]), ParallelDims(1), 0, 4, tiny_model_config()
    )
    loader.load_state_dict(state)
    assert loader.state_dict() == state  # a checkpoint before the first step keeps the resume point
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 16) and batch["labels"].shape == (4, 16)
    assert loader.state_dict()["sample_in_epoch"] == 12
    with pytest.raises(DataError, match="lacks"):
        loader.load_state_dict({"epoch": 0})


def test_data_that_does_not_fit_the_model_is_refused(prepared, tokenizer_path, tmp_path):
    metadata = read_metadata(str(prepared))
    check_data_compatible(metadata, tiny_model_config(), metadata["tokenizer"]["sha256"])
    with pytest.raises(DataError, match="rows of 16 tokens but model.row_length is 32"):
        check_data_compatible(metadata, tiny_model_config(row_length=32))
    with pytest.raises(DataError, match="model.vocab_size is 300"):
        check_data_compatible(metadata, tiny_model_config(vocab_size=300))
    with pytest.raises(DataError, match="not with the run's tokenizer"):
        check_data_compatible(metadata, tiny_model_config(), "0" * 64)
    with pytest.raises(DataError, match="not a folder written by"):
        read_metadata(str(tmp_path))


def _copy(prepared, tmp_path, name: str = "copy") -> Path:
    """The prepared dataset's zipped shards and indexes. Not the shards an earlier test's loader decompressed, nor
    those its prefetch thread may still be decompressing (`*.tmp`, renamed away mid-copy)."""
    copy = tmp_path / name
    shutil.copytree(prepared, copy, ignore=shutil.ignore_patterns("*.mds", "*.tmp"))
    return copy


def _loader(dataset: Path, **data):
    from lm2.pipeline.data.streaming import build_train_loader
    from lm2.pipeline.parallel.dims import ParallelDims

    return build_train_loader(
        DataConfig(streams=[StreamConfig(str(dataset))], **data), ParallelDims(1), 0, 4, tiny_model_config()
    )


def test_a_truncated_shard_is_refused_when_the_loader_is_built(prepared, tmp_path):
    dataset = _copy(prepared, tmp_path)
    shard = sorted((dataset / "train").glob("*.zstd"))[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match="is corrupt: index.json records"):
        _loader(dataset)


def test_a_shard_with_flipped_bytes_fails_its_checksum(prepared, tmp_path):
    dataset = _copy(prepared, tmp_path)
    shard = sorted((dataset / "train").glob("*.zstd"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum did not match"):
        for _ in _loader(dataset):
            pass


def _decompressed(prepared, tmp_path) -> tuple[Path, Path]:
    """A copy of the dataset after a first epoch decompressed its shards, and its second train shard."""
    dataset = _copy(prepared, tmp_path)
    for _ in _loader(dataset):
        pass
    return dataset, sorted((dataset / "train").glob("*.mds"))[1]


def test_a_truncated_decompressed_shard_is_refused_naming_it(prepared, tmp_path):
    dataset, shard = _decompressed(prepared, tmp_path)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DataError, match=f"shard {shard} is corrupt: .* delete it .streaming decompresses"):
        _loader(dataset)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_decompressed_shard_is_a_data_error_naming_it(prepared, tmp_path, workers):
    dataset, shard = _decompressed(prepared, tmp_path)
    data = bytearray(shard.read_bytes())
    data[4:12] = b"\xff" * 8  # the offsets of its first sample: same size, wrong content
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"^shard {shard} is corrupt .*not present.*: delete it"):
        for _ in _loader(dataset, num_workers=workers, shuffle=False):
            pass
    (shard).unlink()  # the fix the message gives: streaming decompresses the shard again
    assert sum(len(batch["id"]) for batch in _loader(dataset, num_workers=workers, shuffle=False)) > 0


def test_a_shard_left_preparing_by_a_dead_download_thread_fails_instead_of_waiting_forever(prepared, tmp_path):
    """The race behind the test above: streaming's download thread died on the shard (checksum failure) and left
    it PREPARING; the reader waiting for it must see the failure, not wait forever."""
    import threading

    from streaming.base.dataset import _ShardState

    dataset = _loader(_copy(prepared, tmp_path)).dataset
    dataset._event = threading.Event()  # what streaming's download thread sets when it dies
    dataset._shard_states[1] = _ShardState.PREPARING
    dataset._event.set()
    with pytest.raises(RuntimeError, match="Background thread failed"):
        dataset.prepare_shard(1)


def test_the_run_tokenizer_must_be_the_one_the_shards_used(prepared, text_inputs, tmp_path):
    from lm2.pipeline.data.sources import find_input_files, read_all
    from lm2.pipeline.data.tokenizer import train_tokenizer

    other = train_tokenizer(read_all(find_input_files([text_inputs])), tmp_path / "other.model", 400)
    with pytest.raises(DataError, match="not with the run's tokenizer"):
        _loader(prepared, tokenizer=str(other.path))
    with pytest.raises(DataError, match="data.streams is empty"):
        from lm2.pipeline.data.streaming import build_train_loader
        from lm2.pipeline.parallel.dims import ParallelDims

        build_train_loader(DataConfig(), ParallelDims(1), 0, 4, tiny_model_config())


def _build_when_released(dataset: str, start, out: str) -> None:
    """A job of one process: builds its loader as soon as `start` is set, records what happened."""
    from lm2.pipeline.data.streaming import build_train_loader
    from lm2.pipeline.parallel.dims import ParallelDims

    start.wait()
    try:
        loader = build_train_loader(
            DataConfig(streams=[StreamConfig(dataset)]), ParallelDims(1), 0, 2, tiny_model_config()
        )
        Path(out).write_text(f"ok {len(next(iter(loader))['id'])}")
    except Exception as error:  # noqa: BLE001 (the test reports any failure)
        Path(out).write_text(f"{type(error).__name__}: {error}")


@pytest.mark.slow
def test_jobs_starting_on_one_node_at_once_all_get_their_loader(prepared, tmp_path):
    """streaming picks a free shared-memory prefix by listing /dev/shm, then registers it: without lm2's node lock
    (shared_memory.registration_lock), jobs starting together can pick the same prefix and fail with
    FileExistsError (it did here on the first try with the lock off). Six one-process jobs over copies of the
    dataset start at the same instant."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    copies = [_copy(prepared, tmp_path, f"copy{i}") for i in range(6)]
    start = context.Event()
    outs = [tmp_path / f"out-{i}" for i in range(len(copies))]
    jobs = [
        context.Process(target=_build_when_released, args=(str(copy), start, str(out)))
        for copy, out in zip(copies, outs)
    ]
    for job in jobs:
        job.start()
    start.set()
    for job in jobs:
        job.join(timeout=300)
    assert [out.read_text() for out in outs] == ["ok 2"] * len(copies)
