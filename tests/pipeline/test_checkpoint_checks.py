"""What resume refuses or skips: another model shape or TP/PP layout, other data or math, incomplete or corrupt
checkpoints, none that verifies, a file that would run code; what pruning keeps; how verification splits its work;
and what the trainer refuses before it starts: data that does not fit the model."""

import dataclasses
import json
import os
import shlex
import shutil
import time
from pathlib import Path

import pytest
import torch

from lm2.model.errors import CheckpointError
from lm2.pipeline.checkpoint import safe_load
from lm2.pipeline.checkpoint.format import MANIFEST, Layout, Manifest, read_manifest, tag_for, write_manifest
from lm2.pipeline.checkpoint.resume import check_config, find_resume, resume_route
from lm2.pipeline.checkpoint.save import Retention
from lm2.pipeline.checkpoint.verify import default_threads, shares_by_bytes
from lm2.pipeline.config import load_config
from lm2.pipeline.files import sha256_file
from tests.distributed import lm2_cli, run_distributed

CONFIG = Path(__file__).parent / "tiny_train.yaml"
LAYOUT = Layout(tp=1, pp=1, dp=2, zero_stage=1)


def manifest_for(run, **layout):
    return Manifest(step=1, layout=dataclasses.replace(LAYOUT, **layout), config=run.to_dict())


def test_resume_refuses_another_model_shape_naming_the_field():
    saved, current = load_config(CONFIG), load_config(CONFIG, ["model.memory.slots=12"])
    with pytest.raises(CheckpointError, match=r"model.memory.slots=6 but the config says 12"):
        resume_route(manifest_for(saved), current.model, LAYOUT, Path("ckpt"))


@pytest.mark.parametrize(
    "old,route",
    [
        ({}, "native"),
        ({"dp": 1}, "universal"),
        ({"tp": 2, "zero_stage": 2}, "universal"),
    ],
)
def test_resume_route_follows_the_layout(old, route):
    run = load_config(CONFIG)
    assert resume_route(manifest_for(run, **old), run.model, LAYOUT, Path("ckpt")) == route


@pytest.mark.parametrize(
    "old,new",
    [
        ({"zero_stage": 0, "tp": 2}, {"zero_stage": 0}),
        ({"zero_stage": 3, "dp": 4}, {"zero_stage": 3}),
    ],
)
def test_resume_refuses_layout_changes_it_cannot_do(old, new):
    run = load_config(CONFIG)
    with pytest.raises(CheckpointError, match="a layout can change on resume only between ZeRO stages"):
        resume_route(manifest_for(run, **old), run.model, dataclasses.replace(LAYOUT, **new), Path("ckpt"))


def fake_checkpoint(root: Path, step: int, files: dict[str, int] | None = None) -> Path:
    """A complete checkpoint of `files` (name -> size; default one small model file) of random bytes, with a
    manifest of their sizes and checksums as save() writes it."""
    run = load_config(CONFIG)
    folder = root / tag_for(step)
    folder.mkdir(parents=True)
    for name, size in (files or {"mp_rank_00_model_states.pt": 0}).items():
        if size:
            (folder / name).write_bytes(os.urandom(size))
        else:
            torch.save({"w": torch.full((4,), float(step))}, folder / name)
    table = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(folder.iterdir())}
    write_manifest(folder, dataclasses.replace(manifest_for(run), step=step, files=table))
    return folder


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(data))


def test_auto_resume_skips_a_corrupt_or_incomplete_newest_checkpoint(single_process, tmp_path):
    for step in (1, 2):
        fake_checkpoint(tmp_path, step)
    flip_a_byte(tmp_path / "step_00000002" / "mp_rank_00_model_states.pt")
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_00000002.*does not match its checksum"):
        assert find_resume(tmp_path, "auto")[0] == tmp_path / "step_00000001"
    (tmp_path / "step_00000003").mkdir()  # a save that never finished: no manifest
    with pytest.warns(UserWarning, match="step_00000003.*incomplete"):
        folder, verification = find_resume(tmp_path, "auto")
    assert folder == tmp_path / "step_00000001" and verification.manifest.step == 1
    assert verification.describe(folder).startswith("verified step_00000001: 0.00 GB in 1 files in ")
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        find_resume(tmp_path, str(tmp_path / "step_00000002"))
    assert find_resume(tmp_path / "nothing", "auto") is None


def test_auto_resume_refuses_when_checkpoints_exist_but_none_verifies(single_process, tmp_path):
    """Starting from step 0 beside them would prune them at the first save; only unfinished saves may be passed."""
    (tmp_path / "step_00000003").mkdir()  # a save that never finished: starting afresh loses nothing
    with pytest.warns(UserWarning, match="step_00000003.*incomplete"):
        assert find_resume(tmp_path, "auto") is None
    for step in (1, 2):
        flip_a_byte(fake_checkpoint(tmp_path, step) / "mp_rank_00_model_states.pt")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError) as refused:
        find_resume(tmp_path, "auto")
    assert "no checkpoint in" in str(refused.value) and "(step_00000002, step_00000001: see the warnings" in str(
        refused.value
    )
    assert "\n" not in str(refused.value)


def test_resume_from_a_folder_that_does_not_exist_says_not_found(single_process, tmp_path):
    with pytest.raises(CheckpointError, match="step_00000007 .--resume. not found"):
        find_resume(tmp_path, str(tmp_path / "step_00000007"))


def test_pruning_counts_only_checkpoints_this_job_verified_and_still_complete(tmp_path):
    for step in (1, 2, 3, 4, 5):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "step_00000000").mkdir()  # an unfinished save, older than every verified checkpoint
    (tmp_path / "step_00000001_universal").mkdir()
    retention = Retention(keep=2, verified=["step_00000003"])  # resumed from step 3, which was hashed
    retention.prune(tmp_path)  # one verified checkpoint: none older may go, the unfinished save may
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"step_0000000{s}" for s in (1, 2, 3, 4, 5)] + ["step_00000001_universal"]
    )
    # Step 5 (newer, not verified by this job) does not count; the job writes step 4 again and counts it.
    (tmp_path / "step_00000004" / "mp_rank_00_model_states.pt").write_bytes(b"cut short")
    retention.verified.append("step_00000004")
    retention.prune(tmp_path)  # step 4's files no longer have their sizes: still one counted
    assert len(list(tmp_path.glob("step_0000000?"))) == 5
    shutil.rmtree(tmp_path / "step_00000004")
    fake_checkpoint(tmp_path, 4)
    retention.prune(tmp_path)  # steps 4 and 3 counted: 1, 2 and the conversion of 1 go; 5 stays (newer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004", "step_00000005"]


def test_verification_shares_are_balanced_by_bytes_not_by_file_count():
    sizes = {"model": 800, **{f"optim_{i}": 100 for i in range(8)}}
    shares = shares_by_bytes(sizes, 2)
    assert [sum(sizes[n] for n in share) for share in shares] == [800, 800]  # by count: 4 + 5 files, 1200 vs 400
    assert shares[0] == ["model"] and shares_by_bytes(sizes, 2) == shares  # the same split on every rank


class Payload:
    """What a malicious checkpoint pickles: unpickling it runs a shell command (here: creates a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def rewrite_manifest(folder: Path) -> None:
    """The manifest updated to the folder's files as they are now (what an attacker would do)."""
    manifest = read_manifest(folder)
    table = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in folder.iterdir() if p.name != MANIFEST
    }
    write_manifest(folder, dataclasses.replace(manifest, files=table))


def rank_share(folder: Path, rank: int) -> list[str]:
    """The files rank `rank` of two on this machine verifies (as verify() splits them; LOCAL_WORLD_SIZE=2)."""
    sizes = {name: entry["bytes"] for name, entry in read_manifest(folder).files.items()}
    threads = default_threads()
    return [
        name for share in shares_by_bytes(sizes, 2 * threads)[rank * threads : (rank + 1) * threads] for name in share
    ]


def _verify_on_two_ranks(root: str, out: str) -> None:
    import torch.distributed as dist

    from lm2.pipeline.parallel.init import init_distributed

    init_distributed()
    try:
        found = find_resume(Path(root), "auto")
        outcome = [found[0].name, found[1].bytes, found[1].team.size]
    except CheckpointError as error:
        outcome = [type(error).__name__, str(error)]
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(outcome))


def outcomes_on_two_ranks(root: Path, out: Path) -> list:
    run_distributed(_verify_on_two_ranks, 2, (str(root), str(out)))
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_ranks_verify_their_shares_and_reach_one_decision(tmp_path, monkeypatch):
    """Two real ranks each hash a byte-balanced share; a corrupt file in rank 1's share makes both skip the
    checkpoint, and a file that could run code in rank 1's share stops both with the same refusal, before any
    rank loads it."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # the ranks' threads, for rank_share
    root, files = tmp_path / "ckpt", {"big.pt": 30000, **{f"part_{i}.pt": 1000 for i in range(20)}}
    for step in (1, 2):
        fake_checkpoint(root, step, files)
    second = rank_share(root / "step_00000002", 1)
    assert second and "big.pt" not in second  # the large file is rank 0's alone
    flip_a_byte(root / "step_00000002" / second[0])
    assert outcomes_on_two_ranks(root, tmp_path) == [["step_00000001", 50000, 2]] * 2  # both skipped step 2
    third = fake_checkpoint(root, 3, files)
    victim = rank_share(third, 1)[0]
    torch.save({"state": Payload(tmp_path / "ran")}, third / victim)
    rewrite_manifest(third)
    assert victim in rank_share(third, 1)
    outcomes = outcomes_on_two_ranks(root, tmp_path)
    assert outcomes[0] == outcomes[1] and outcomes[0][0] == "UnsafeCheckpointError", outcomes
    assert f"{victim} holds pickled posix.system" in outcomes[0][1]
    assert not (tmp_path / "ran").exists()


def test_a_config_change_that_alters_the_data_or_the_math_is_refused_naming_each_field():
    saved = load_config(CONFIG)
    manifest = dataclasses.replace(manifest_for(saved), tokenizer_sha256="a" * 64)
    free = load_config(CONFIG, ["logging.run_dir=elsewhere", "train.log_every=7", "checkpoint.keep=9"])
    check_config(manifest, free.to_dict(), "a" * 64, Path("ckpt"), accept=False)
    changed = load_config(CONFIG, ["data.shuffle_seed=3", "optim.beta2=0.9", "train.precision=fp32"])
    with pytest.raises(CheckpointError) as refused:
        check_config(manifest, changed.to_dict(), "b" * 64, Path("ckpt"), accept=False)
    message = str(refused.value)
    assert "data.shuffle_seed: 1234 -> 3" in message and "optim.beta2: 0.95 -> 0.9" in message
    assert "train.precision: 'auto' -> 'fp32'" in message and "tokenizer sha256: aaaaaaaaaaaa... -> bbbb" in message
    assert "--accept-config-changes" in message
    check_config(manifest, changed.to_dict(), "b" * 64, Path("ckpt"), accept=True)
    check_config(dataclasses.replace(manifest, step=0), changed.to_dict(), None, Path("ckpt"), accept=False)


def test_trainer_refuses_data_of_another_row_length(train_data, tmp_path):
    result = lm2_cli(
        [
            "train",
            "--config",
            str(CONFIG),
            *train_data,
            "model.row_length=64",
            "model.segment_length=16",
            f"logging.run_dir={tmp_path}",
            "logging.wandb=disabled",
        ]
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "holds rows of 32 tokens but model.row_length is 64" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def kept_one(train_data, tmp_path_factory):
    """A real run of 2 steps that saved every step and keeps 1 checkpoint: only step_00000002 is left."""
    run_dir = tmp_path_factory.mktemp("kept_one") / "run"
    result = lm2_cli(["train", "--config", str(CONFIG), *train_data, *KEPT_ONE, f"logging.run_dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000002"]
    return run_dir


KEPT_ONE = ["train.steps=2", "checkpoint.every=1", "checkpoint.keep=1", "logging.wandb=disabled"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder and its bytes, but the lock's holder line (each job writes its own)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def lm2_errors(result) -> list[str]:
    """The lines lm2 itself printed to stderr (not libraries' notices)."""
    return [line for line in result.stderr.splitlines() if line.startswith("lm2 ")]


def test_keep_1_with_its_checkpoint_corrupt_resume_auto_is_refused_and_nothing_is_deleted(
    kept_one, train_data, tmp_path
):
    run_dir = tmp_path / "run"
    shutil.copytree(kept_one, run_dir)
    flip_a_byte(run_dir / "checkpoints" / "step_00000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    before = snapshot(run_dir)
    args = ["train", "--config", str(CONFIG), *train_data, *KEPT_ONE, f"logging.run_dir={run_dir}", "train.steps=3"]
    result = lm2_cli([*args, "--resume", "auto"])
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = lm2_errors(result)
    assert "--resume auto: no checkpoint in" in line and "(step_00000002: see the warnings above)" in line
    assert snapshot(run_dir) == before  # no step 0 run started in its folder, nothing pruned


def test_a_checkpoint_that_would_run_code_is_refused_by_export_and_resume(kept_one, train_data, tmp_path):
    """A model-states file holding an object whose unpickling calls os.system, with the manifest updated to match:
    export and resume refuse it with one line, and the command never runs; so do lm2's loader itself and DeepSpeed's
    direct torch.load calls routed through it."""
    run_dir, marker = tmp_path / "run", tmp_path / "ran"
    shutil.copytree(kept_one, run_dir)
    folder = run_dir / "checkpoints" / "step_00000002"
    model_states = folder / "mp_rank_00_model_states.pt"
    state = torch.load(model_states, weights_only=False)  # our own file, before it is tampered with
    state["module"]["evil"] = Payload(marker)
    torch.save(state, model_states)
    rewrite_manifest(folder)

    exported = lm2_cli(["export", "hf", str(run_dir / "checkpoints"), str(tmp_path / "hf")])
    resumed = lm2_cli(
        ["train", "--config", str(CONFIG), *train_data, *KEPT_ONE, f"logging.run_dir={run_dir}", "--resume", "auto"]
    )
    for result, command in ((exported, "export"), (resumed, "train")):
        assert result.returncode == 2, result.stderr[-3000:]
        (line,) = lm2_errors(result)
        assert line.startswith(f"lm2 {command}: checkpoint error: {model_states} holds pickled posix.system"), line
    with pytest.raises(safe_load.UnsafeCheckpointError, match="posix.system"):
        safe_load.load(model_states)
    with safe_load.torch_loads_checked(), pytest.raises(safe_load.UnsafeCheckpointError):
        torch.load(model_states, weights_only=False)
    assert torch.load is safe_load._torch_load  # restored
    from lm2.pipeline.checkpoint.engine_io import CheckedCheckpointEngine

    with pytest.raises(safe_load.UnsafeCheckpointError):  # what DeepSpeed's own loads of a resume go through
        CheckedCheckpointEngine().load(str(model_states), map_location="cpu")
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_writing_a_checkpoint_again_moves_latest_off_it_and_drops_its_universal_conversion(tmp_path):
    from lm2.pipeline.checkpoint.save import _clear

    for step in (1, 2):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "latest").write_text("step_00000002\n")  # a resume skipped step 2 (corrupt) and saves it again
    (tmp_path / "step_00000002_universal").mkdir()
    _clear(tmp_path / "step_00000002", Retention(keep=2, verified=["step_00000001"]))
    assert (tmp_path / "latest").read_text() == "step_00000001\n"  # never a folder that is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]


SHORT_TIMEOUT_S = 1


def _convert_under_a_short_timeout(checkpoints: str, out: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from lm2.pipeline.checkpoint.universal import convert_to_universal_on_rank0

    dist.init_process_group("gloo")
    dist.barrier()  # both ranks are up before the short timeout applies
    dist.set_timeout(timedelta(seconds=SHORT_TIMEOUT_S))  # far shorter than the conversion
    started = time.perf_counter()
    tag = convert_to_universal_on_rank0(checkpoints, "step_00000001")
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps([tag, time.perf_counter() - started]))


def test_universal_conversion_in_a_job_outlasts_the_process_groups_timeout(train_data, tmp_path):
    """Rank 0 converts (seconds, for a model of 6 x 384) while rank 1 waits longer than the default group's timeout:
    in a group of its own. A killed conversion's temp folders are removed; a conversion is made again once step_N
    is no longer the one it was made from."""
    from lm2.pipeline.checkpoint.universal import SOURCE_FILE, convert_to_universal

    larger = ["model.hidden_size=384", "model.ffn_hidden_size=1024", "model.num_layers=6", "train.steps=1"]
    run = lm2_cli(["train", "--config", str(CONFIG), *train_data, *larger, f"logging.run_dir={tmp_path / 'run'}"])
    assert run.returncode == 0, run.stderr[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    for leftover in (".step_00000001_universal.tmp-999", ".step_00000001_universal.src-999"):
        (checkpoints / leftover).mkdir()
    run_distributed(_convert_under_a_short_timeout, 2, (str(checkpoints), str(tmp_path)))
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [tag for tag, _ in results] == ["step_00000001_universal"] * 2
    assert min(seconds for _, seconds in results) > SHORT_TIMEOUT_S  # rank 1 waited past the default group's timeout
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(".")) == []
    universal = checkpoints / "step_00000001_universal"
    made = (universal / SOURCE_FILE).stat().st_mtime_ns
    convert_to_universal(str(checkpoints), "step_00000001")
    assert (universal / SOURCE_FILE).stat().st_mtime_ns == made  # reused: made from these very files
    rng = checkpoints / "step_00000001" / "rng_rank_00000.pt"
    rng.write_bytes(rng.read_bytes())  # step 1 written again
    convert_to_universal(str(checkpoints), "step_00000001")
    assert (universal / SOURCE_FILE).stat().st_mtime_ns != made  # converted again from the new files


def test_async_save_is_a_validated_boolean_off_by_default():
    from lm2.model.errors import ConfigError

    assert load_config(CONFIG).checkpoint.async_save is False
    assert load_config(CONFIG, ["checkpoint.async_save=true"]).checkpoint.async_save is True
    for value in ("maybe", "1"):
        with pytest.raises(ConfigError, match="checkpoint.async_save must be true or false"):
            load_config(CONFIG, [f"checkpoint.async_save={value}"])


def test_staged_copies_are_made_at_once_and_their_buffers_serve_the_next_checkpoint():
    from lm2.pipeline.checkpoint.engine_io import HostBuffers, stage

    def address(tensor: torch.Tensor) -> int:
        return tensor.untyped_storage().data_ptr()

    weights = torch.arange(6.0)
    state = {"weights": weights, "tail": weights[2:], "step": 3}
    buffers = HostBuffers()
    first = stage(state, buffers)
    buffers.keep_used()
    weights.add_(1)  # training goes on
    assert torch.equal(first["weights"], torch.arange(6.0)) and first["step"] == 3
    assert address(first["tail"]) == address(first["weights"]) and torch.equal(first["tail"], first["weights"][2:])
    second = stage(state, buffers)
    buffers.keep_used()
    assert address(second["weights"]) == address(first["weights"])  # the same host pages, copied into again
    assert torch.equal(second["weights"], weights) and address(weights) != address(second["weights"])
    grown = stage({"weights": torch.zeros(7)}, buffers)
    assert address(grown["weights"]) != address(second["weights"])  # another size: a buffer of its own


def test_checkpoint_files_skip_the_zip_crc_without_changing_torch_save_elsewhere(tmp_path):
    """The manifest's sha256 is a checkpoint file's checksum: write_file leaves out torch.save's CRC-32 (half of its
    CPU time), for its own call only. The file loads as written."""
    import zipfile

    from torch.utils.serialization import config as torch_serialization

    from lm2.pipeline.checkpoint.engine_io import write_file

    state = {"weights": torch.randn(64, generator=torch.Generator().manual_seed(0)), "step": 3}
    write_file(state, tmp_path / "checkpoint.pt")
    assert {entry.CRC for entry in zipfile.ZipFile(tmp_path / "checkpoint.pt").infolist()} == {0}
    loaded = safe_load.load(tmp_path / "checkpoint.pt")
    assert torch.equal(loaded["weights"], state["weights"]) and loaded["step"] == 3
    assert torch_serialization.save.compute_crc32
    torch.save(state, tmp_path / "plain.pt")
    assert all(entry.CRC for entry in zipfile.ZipFile(tmp_path / "plain.pt").infolist() if entry.file_size)


def cached_pages(path: Path) -> int:
    """How many of a file's pages are in the page cache (mincore on a read-only mapping of it)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    handle = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, handle, 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            assert libc.mincore(address, size, pages) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(address, size)
    finally:
        os.close(handle)
    return sum(page & 1 for page in pages)


def keeps_a_page_cache(folder: Path) -> bool:
    """Whether the file system of `folder` caches a file's pages apart from the file (not tmpfs): a written file's
    pages are cached, and leave the cache when dropped."""
    probe = folder / "probe"
    probe.write_bytes(os.urandom(1 << 20))
    cached = cached_pages(probe)
    handle = os.open(probe, os.O_RDONLY)
    try:
        os.fsync(handle)
        os.posix_fadvise(handle, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(handle)
    dropped = cached_pages(probe) == 0
    probe.unlink()
    return cached > 0 and dropped


@pytest.mark.parametrize("size", [0, 1, 4096, (8 << 20) + 12345, 2 * (8 << 20)])
def test_hashed_writes_return_the_sha256_of_the_file_and_bypass_the_page_cache(size, tmp_path):
    """write_hashed's direct writes: whole blocks, and a last one padded then cut to the file's size."""
    from lm2.pipeline.files import DIRECT_BLOCK, write_hashed

    if not keeps_a_page_cache(tmp_path):
        pytest.skip(f"the file system of {tmp_path} keeps its files in memory (tmpfs): no direct writes")
    data = os.urandom(size)
    pieces = [data[:100], memoryview(data)[100 : DIRECT_BLOCK + 7], bytearray(data[DIRECT_BLOCK + 7 :])]
    path = tmp_path / "file"
    sha256 = write_hashed(path, lambda handle: [handle.write(piece) for piece in pieces])
    assert path.stat().st_size == size
    assert size == 0 or cached_pages(path) == 0
    assert path.read_bytes() == data and sha256 == sha256_file(path)


def _write_hashed_on_ramfs(folder: str) -> None:
    """In a mount namespace with a ramfs (which refuses O_DIRECT) on `folder`: write_hashed writes there all the
    same, and returns the file's sha256."""
    import errno

    from lm2.pipeline.files import write_hashed

    path = Path(folder) / "file"
    try:
        os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
        raise AssertionError("ramfs accepted O_DIRECT")
    except OSError as error:
        assert error.errno == errno.EINVAL, error
    data = os.urandom((1 << 20) + 3)
    sha256 = write_hashed(path, lambda handle: [handle.write(data[:5]), handle.write(data[5:])])
    assert path.read_bytes() == data and sha256 == sha256_file(path)
    print("written through the page cache")


def test_hashed_writes_go_through_the_page_cache_where_o_direct_is_refused(tmp_path):
    import subprocess
    import sys

    namespace = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"mount -t ramfs ramfs {tmp_path}"]
    probe = subprocess.run(namespace, capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a ramfs in a mount namespace here: {probe.stderr.strip()}")
    script = f"from tests.pipeline.test_checkpoint_checks import _write_hashed_on_ramfs as w; w({str(tmp_path)!r})"
    namespace[-1] += f" && {sys.executable} -c {shlex.quote(script)}"
    result = subprocess.run(namespace, capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert result.returncode == 0 and "written through the page cache" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("async_save", ["false", "true"])
def test_checkpoint_files_bypass_the_page_cache_and_the_manifest_has_their_sha256(async_save, train_data, tmp_path):
    """Every file a checkpoint lists was written direct (files.write_hashed), and the sha256 the manifest records,
    computed as the bytes passed, is the file's."""
    if not keeps_a_page_cache(tmp_path):
        pytest.skip(f"the file system of {tmp_path} keeps its files in memory (tmpfs): no direct writes")
    run_dir = tmp_path / "run"
    args = [*train_data, *KEPT_ONE, "checkpoint.keep=2", f"checkpoint.async_save={async_save}"]
    result = lm2_cli(["train", "--config", str(CONFIG), *args, f"logging.run_dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    for step in (1, 2):
        folder = run_dir / "checkpoints" / tag_for(step)
        files = read_manifest(folder).files
        assert files and all(entry["bytes"] for entry in files.values())
        assert {name: cached_pages(folder / name) for name in files} == dict.fromkeys(files, 0)
        assert {name: sha256_file(folder / name) for name in files} == {n: e["sha256"] for n, e in files.items()}
