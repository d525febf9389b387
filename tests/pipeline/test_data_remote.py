"""Remote datasets against a real S3 API (moto's server on localhost, reached through S3_ENDPOINT_URL as
streaming supports): parts prepared into s3:// and merged there, then read by 2 ranks through a bounded cache,
stopped and resumed with every row read exactly once; a 2-rank `lm2 train` job on it, killed and resumed, ends
exactly as a run on a local copy does."""

import json
import os
import shutil
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from lm2.model.errors import DataError
from lm2.pipeline.data.config import DataConfig, StreamConfig
from lm2.pipeline.data.metadata import METADATA_FILE
from lm2.pipeline.data.parts import Part, merge
from lm2.pipeline.data.prepare import prepare
from tests.distributed import free_port, run_distributed
from tests.pipeline.data_fixtures import tiny_model_config, write_mixed_inputs
from tests.pipeline.test_checkpoint_resume import (
    STEPS,
    _shared_memory_of,
    assert_ends_like,
    finish,
    kill_job,
    wait_for_kill_point,
)
from tests.pipeline.test_launch_local import start_local

# The module stays on one pytest-xdist worker: its tests share one S3 server and dataset.
pytestmark = pytest.mark.xdist_group("s3")

BUCKET = "lm2-data"
# bytes: streaming counts index.json (~26 KB for these 55 shards) and needs room for at least one shard's zip and
# raw forms (~1.7 KB); 4 x that is its minimum. This leaves room for ~8 shards of 55.
CACHE_LIMIT = 40_000
# streaming evicts before a shard's download until its committed cache usage plus that shard's full size
# (zip + raw) fits data.cache_limit, but a download counts only once it completes: downloads running at the same
# time on one node do not see each other. Each rank has three threads that can start one (its download thread,
# its ready thread and its main thread, the last two for a shard evicted under them), so with 2 ranks the cache
# can exceed the limit by up to 2 x 3 - 1 shards; it did by 3 (with 4 in flight) when this was measured.
CONCURRENT_DOWNLOADS = 2 * 3
# seconds: a rank reading longer has hung (the reads take seconds, with streaming's TICK at 100 ms about a minute)
HANG_S = 300


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint on localhost with one bucket; a boto3 client on it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the spawned ranks inherit it
    client = boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"])
    client.create_bucket(Bucket=BUCKET)
    yield client
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


def keys(client, prefix: str) -> dict[str, bytes]:
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"][len(prefix) :]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listed}


@pytest.fixture(scope="module")
def remote_dataset(s3, tokenizer_path, tmp_path_factory):
    """The mixed inputs prepared as 2 parts into S3 and merged there, and the same locally."""
    folder = tmp_path_factory.mktemp("remote")
    write_mixed_inputs(folder / "in")
    url = f"s3://{BUCKET}/mixed"
    for output in (url, folder / "local"):
        for index in range(2):
            prepare(
                [folder / "in"],
                output,
                tokenizer_path,
                row_length=16,
                part=Part(index, 2),
                shard_size_limit=1 << 10,
                progress=False,
            )
        merge(output)
    return url, folder / "local"


def test_parts_prepared_into_s3_and_merged_there_equal_a_local_prepare(s3, remote_dataset, tokenizer_path, tmp_path):
    url, local = remote_dataset
    remote_files = keys(s3, "mixed/")
    local_files = {str(p.relative_to(local)): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    assert sorted(remote_files) == sorted(local_files)
    assert len([name for name in remote_files if name.endswith(".mds.zstd")]) > 4
    for name, data in local_files.items():
        if name.endswith(".mds.zstd") or name == "lm2_data.json" or name.startswith("parts/"):
            assert remote_files[name] == data, name  # shards byte-identical, the same counts
        else:  # index.json: streaming writes the same shards, formatted differently for a merged upload
            assert json.loads(remote_files[name])["shards"] == json.loads(data)["shards"], name
    inputs = local.parent / "in"
    with pytest.raises(DataError, match="part-00000-of-00002 is already prepared"):
        prepare([inputs], url, tokenizer_path, row_length=16, part=Part(0, 2), progress=False)
    with pytest.raises(DataError, match=f"s3://{BUCKET}/mixed already exists"):
        prepare([inputs], url, tokenizer_path, row_length=16, progress=False)
    with pytest.raises(DataError, match="already a complete dataset"):
        merge(url)


def _read_remote(url: str, cache: str, out: str, tick: float | None = None) -> None:
    """One launch reads: the whole epoch; its first 5 micro-batches; the rest after resuming from their state.
    Each read has its own cache folder (a fresh node's) and records the most bytes its cache held. tick: streaming's
    polling interval in every thread instead of 7 ms; a rank still reading after HANG_S seconds then exits, printing
    every thread's stack."""
    import faulthandler

    import streaming.base.dataset
    import torch.distributed as dist

    from lm2.pipeline.data import streaming as lm2_streaming
    from lm2.pipeline.parallel.init import init_distributed

    if tick:
        streaming.base.dataset.TICK = lm2_streaming.TICK = tick
        faulthandler.dump_traceback_later(HANG_S, exit=True)
    dims = init_distributed()

    def read(tag: str, batches: int | None = None, state: dict | None = None) -> dict:
        folder = Path(cache, tag)
        cfg = DataConfig(streams=[StreamConfig(url)], cache_dir=str(folder), cache_limit=str(CACHE_LIMIT))
        loader = lm2_streaming.build_train_loader(cfg, dims, dist.get_rank(), 2, tiny_model_config())
        if state:
            loader.load_state_dict(state)
        ids, on_disk, usage = [], 0, 0
        for batch in islice(loader, batches):
            ids += batch["id"].tolist()
            on_disk = max(on_disk, _cached_bytes(folder))
            usage = max(usage, loader.dataset.cache_usage)  # streaming's own count: shards and index.json
        largest = max(shard.get_max_size() for shard in loader.dataset.shards)
        return {
            "ids": ids,
            "state": loader.state_dict(),
            "on_disk": on_disk,
            "usage": usage,
            "largest": largest,
            "index": loader.dataset.streams[0].get_index_size(),
        }

    first = read("first", batches=5)
    record = {"whole": read("whole"), "first": first, "rest": read("rest", state=first["state"])}
    Path(out, f"remote-{dist.get_rank()}.json").write_text(json.dumps(record))


def _cached_bytes(cache: Path) -> int:
    """Bytes of shards in the cache now; the other rank may evict a listed one before its size is read."""
    total = 0
    for path in cache.rglob("*.mds*"):
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            pass
    return total


def _run(url, tmp_path, tick: float | None = None) -> dict[str, list[dict]]:
    """{"whole" | "first" | "rest": [rank 0's record, rank 1's record]}."""
    run_distributed(_read_remote, 2, (url, str(tmp_path / "cache"), str(tmp_path), tick))
    ranks = [json.loads((tmp_path / f"remote-{rank}.json").read_text()) for rank in range(2)]
    return {part: [r[part] for r in ranks] for part in ranks[0]}


def test_two_ranks_stream_from_s3_within_the_cache_limit_and_resume_exactly_once(remote_dataset, tmp_path):
    url, local = remote_dataset
    _check_reads(local, _run(url, tmp_path))


@pytest.mark.slow
def test_a_shard_evicted_before_the_ready_thread_sees_it_is_fetched_again(remote_dataset, tmp_path):
    """streaming's ready thread looks at the shard it waits for every TICK (7 ms). Another rank that downloads as
    many shards as the cache holds in between evicts it, and streaming never fetched it again: both ranks waited
    forever (seen once in a loaded test run; with looks every 100 ms it hung every time). lm2's ready thread
    fetches it again, and the reads are exactly those of the normal test."""
    url, local = remote_dataset
    _check_reads(local, _run(url, tmp_path, tick=0.1))


def _check_reads(local, runs) -> None:
    whole, first, rest = runs["whole"], runs["first"], runs["rest"]
    uninterrupted = Counter(i for record in whole for i in record["ids"])
    rows = json.loads((local / "lm2_data.json").read_text())["splits"]["train"]["rows"]
    assert max(uninterrupted.values()) == 1 and rows - 4 < len(uninterrupted) <= rows
    assert first[0]["state"] == first[1]["state"] and first[0]["state"]["sample_in_epoch"] == 5 * 2 * 2
    resumed = Counter(i for record in first + rest for i in record["ids"])
    assert resumed == uninterrupted and max(resumed.values()) == 1
    shards = json.loads((local / "train" / "index.json").read_text())["shards"]
    largest = max(s["raw_data"]["bytes"] + s["zip_data"]["bytes"] for s in shards)
    bound = CACHE_LIMIT + (CONCURRENT_DOWNLOADS - 1) * largest  # streaming's usage: index.json and shards
    for record in whole + first + rest:
        assert record["largest"] == largest and record["usage"] <= bound, record
        shard_bound = bound - record["index"]
        assert 0 < record["on_disk"] <= shard_bound, record  # shard files, downloads in flight included
        assert shard_bound < sum(s["raw_data"]["bytes"] for s in shards) / 2  # far from caching every shard


@pytest.mark.slow
def test_lm2_train_from_s3_killed_and_resumed_ends_as_a_run_on_the_local_copy_ends(
    remote_dataset, tokenizer_path, tmp_path
):
    """Real `lm2 train` jobs (launch/local.sh, 2 gloo ranks, the tiny model on rows of 16): one reads a local copy of
    the dataset uninterrupted; one streams it from s3:// through data.cache_limit, is SIGKILLed (launcher and ranks)
    between its step-3 and step-6 checkpoints and resumed with --resume auto on the same cache. Every step's loss and
    the final checkpoint are identical. The cache ends within the bound above, though the rows read lie in more
    shards than it holds, and holds nothing a kill cut short: the test adds what a kill during a shard's download
    leaves (boto3's partial `<shard>.<8 hex digits>`), as a kill between two steps seldom hits these small downloads."""
    url, local = remote_dataset
    copy, cache = tmp_path / "local", tmp_path / "cache"
    shutil.copytree(local, copy)  # streaming decompresses a local dataset's shards beside them; the fixture's stays
    common = [
        f"data.tokenizer={tokenizer_path}",
        "model.row_length=16",
        "model.vocab_size=512",
        f"train.steps={STEPS}",
        "checkpoint.every=3",
    ]
    from_s3 = [
        *common,
        f"data.streams=[{{path: {url}}}]",
        f"data.cache_dir={cache}",
        f"data.cache_limit='{CACHE_LIMIT}'",
    ]
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    finish(start_local(reference, [*common, f"data.streams=[{{path: {copy}}}]"]), reference)
    job = start_local(interrupted, from_s3)
    killed_in = wait_for_kill_point(job, interrupted, during_save=False)
    kill_job(job)
    split = next(cache.iterdir()) / "train"  # <cache>/<hash of the URL>/train
    assert _shared_memory_of(split), "the killed run left no shared memory: nothing to clean"
    shards = json.loads((split / "index.json").read_text())["shards"]
    zipped = shards[0]["zip_data"]["basename"]
    partial = split / f"{zipped}.5eA7c0De"
    partial.write_bytes((copy / "train" / zipped).read_bytes()[:500])
    os.utime(partial, (partial.stat().st_mtime - 3600,) * 2)  # untouched for an hour: abandoned
    finish(start_local(interrupted, [*from_s3, "--resume", "auto"]), interrupted)

    assert "resumed from step 3" in (tmp_path / "interrupted.log").read_text()
    assert_ends_like(interrupted, reference, killed_in)

    assert not _shared_memory_of(split)
    cached = {str(p.relative_to(split)): p.stat().st_size for p in split.rglob("*") if p.is_file()}
    named = {"index.json"} | {s[form]["basename"] for s in shards for form in ("raw_data", "zip_data")}
    assert set(cached) <= named, f"left in the cache: {set(cached) - named}"
    outside = [p.name for p in cache.rglob("*") if p.is_file() and split not in p.parents]
    assert outside == [METADATA_FILE]  # read_metadata's copy, beside streaming's folder
    largest = max(s["raw_data"]["bytes"] + s["zip_data"]["bytes"] for s in shards)
    bound = CACHE_LIMIT + (CONCURRENT_DOWNLOADS - 1) * largest  # streaming's usage: index.json and shards
    assert sum(cached.values()) <= bound
    # The shards of the rows read and of those read ahead, decompressed beside the reference's local copy.
    read = sum(p.stat().st_size for p in (copy / "train").rglob("*.mds"))
    assert read > bound - cached["index.json"], "the run read fewer shards than the cache holds: nothing to bound"


def _loader_rows(cfg: DataConfig) -> dict[int, list[int]]:
    """Row id -> input tokens of one epoch read by a world of one."""
    from lm2.pipeline.data.streaming import build_train_loader
    from lm2.pipeline.parallel.dims import ParallelDims

    loader = build_train_loader(cfg, ParallelDims(world_size=1), 0, 2, tiny_model_config())
    return {int(i): row.tolist() for batch in loader for i, row in zip(batch["id"], batch["input_ids"], strict=True)}


def _local_rows(folder: Path) -> dict[int, list[int]]:
    from tests.pipeline.test_data_prepare import read_rows

    rows, ids = read_rows(folder / "train")
    return {int(i): row[:-1].tolist() for i, row in zip(ids, rows, strict=True)}


def test_a_dataset_prepared_again_at_the_same_url_is_fetched_again(s3, tokenizer_path, tmp_path):
    """The cache is keyed by the dataset's identity (its lm2_data.json and index.json): the second dataset at the
    URL is read whole from its own folder, never from the first one's shards."""
    url, cache = f"s3://{BUCKET}/again", tmp_path / "cache"
    write_mixed_inputs(tmp_path / "in")
    cfg = DataConfig(streams=[StreamConfig(url)], cache_dir=str(cache), shuffle=False)
    for version, options in enumerate(
        ({"shard_size_limit": 1 << 10}, {"shard_size_limit": 1 << 11, "packing": "whole"})
    ):
        for key in keys(s3, "again/"):
            s3.delete_object(Bucket=BUCKET, Key=f"again/{key}")
        local = tmp_path / f"local{version}"
        for output in (url, local):
            prepare([tmp_path / "in"], output, tokenizer_path, row_length=16, progress=False, **options)
        read, written = _loader_rows(cfg), _local_rows(local)
        assert read == {i: written[i] for i in read} and len(written) - len(read) < 2  # less a last short batch
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2


def test_the_cache_cleanup_removes_only_abandoned_partial_files(s3, remote_dataset, tmp_path):
    """A partial download the file system has not touched for an hour is a killed job's; one written a moment ago
    may be another job's download in flight on a shared cache folder, and stays."""
    url, _ = remote_dataset
    cfg = DataConfig(streams=[StreamConfig(url)], cache_dir=str(tmp_path / "cache"), shuffle=False)
    _loader_rows(cfg)
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    shard = next((folder / "train").rglob("*.mds"))  # merged parts: part-*/shard.*
    abandoned, in_flight = shard.with_name(f"{shard.name}.deadbeef"), shard.with_name(f"{shard.name}.5eA7c0De")
    for partial in (abandoned, in_flight):
        partial.write_bytes(shard.read_bytes()[:100])
    os.utime(abandoned, (abandoned.stat().st_mtime - 3600,) * 2)
    _loader_rows(cfg)
    assert not abandoned.exists() and in_flight.exists()
