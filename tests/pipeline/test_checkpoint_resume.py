"""Checkpoints: a run killed with SIGKILL at a random step between checkpoints, or in the middle of a save, and
resumed is bit-identical to an uninterrupted one (single process, TP=2, PP=2, DP=2 ZeRO-2, and with carried memory
in state and document mode); signals save and exit for requeue; broken checkpoints are skipped."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from lm2.pipeline.checkpoint.format import MANIFEST, read_manifest
from lm2.pipeline.checkpoint.reader import inspect
from lm2.pipeline.launch.exit_codes import EXIT_REQUEUE
from tests.distributed import lm2_cli

# The module stays on one pytest-xdist worker: its tests share the reference runs.
pytestmark = pytest.mark.xdist_group("kill-resume")
ROOT = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).parent / "tiny_train.yaml"
STEPS = 8


def launch(
    run_dir: Path, world_size: int, overrides: list[str], *extra: str, writes_held_back: float = 0
) -> subprocess.Popen:
    """`lm2 train` under torchrun; with `writes_held_back`, asynchronous saves start writing that many seconds late
    (tests/slow_saves.py)."""
    cli = ["tests.slow_saves", str(writes_held_back)] if writes_held_back else ["lm2.pipeline.cli"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={world_size}",
        "--standalone",
        "-m",
        *cli,
        "train",
        "--config",
        str(CONFIG),
        f"logging.run_dir={run_dir}",
        "logging.wandb=disabled",
        "train.log_every=1",
        f"train.steps={STEPS}",
        "checkpoint.every=1",
        "checkpoint.keep=3",
        *overrides,
        *extra,
    ]  # later overrides win
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def kill_job(process: subprocess.Popen) -> None:
    """SIGKILL to the launcher and every rank at once, like a node dying. torchrun starts each rank in a session
    of its own, so the ranks are found as descendants, not through the process group."""
    ranks = psutil.Process(process.pid).children(recursive=True)
    for victim in [psutil.Process(process.pid), *ranks]:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    process.wait()
    psutil.wait_procs(ranks, timeout=30)


def finish(process: subprocess.Popen, run_dir: Path, timeout: float = 600) -> None:
    code = process.wait(timeout=timeout)
    assert code == 0, (run_dir.parent / f"{run_dir.name}.log").read_text()[-3000:]


def logged_losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss; a step logged twice (before the kill and after the resume) keeps its last value."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {entry["step"]: entry["loss"] for entry in map(json.loads, lines)}


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every .pt file of a checkpoint (weights, optimizer state, RNG), by file and key path."""
    tensors = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            tensors[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(f"{prefix}/{i}", item)

    for path in sorted(folder.glob("*.pt")):
        walk(path.name, torch.load(path, map_location="cpu", weights_only=False))
    return tensors


def assert_ends_like(interrupted: Path, reference: Path, killed_in: str) -> None:
    """The resumed run logged every step's loss as the reference did and ends with a bit-identical checkpoint."""
    assert logged_losses(interrupted) == logged_losses(reference), f"killed in {killed_in}"
    final = f"checkpoints/step_{STEPS:08d}"
    ours, theirs = checkpoint_tensors(interrupted / final), checkpoint_tensors(reference / final)
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), f"{key} differs (killed in {killed_in})"


def wait_for_kill_point(process: subprocess.Popen, run_dir: Path, during_save: bool) -> str:
    """Between checkpoints (every 3 steps, so at steps 3 and 6): after a random step 4 or 5, one or two steps past
    the last save. During a save: as soon as step 6's folder exists without its manifest (the shards are being
    written). Returns what the kill interrupted."""
    if during_save:
        folder = run_dir / "checkpoints" / "step_00000006"
        while not folder.exists() or (folder / MANIFEST).exists():
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.002)
        return "the save of step 6"
    kill_after = random.randint(4, 5)
    metrics = run_dir / "metrics.jsonl"
    while not metrics.exists() or len(metrics.read_text().splitlines()) < kill_after:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    return f"step {kill_after + 1}"


PARALLEL = {
    "single": (1, []),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "dp2": (2, ["parallel.zero_stage=2"]),
}
LAYOUTS = {"dp2-zero2" if name == "dp2" else name: layout for name, layout in PARALLEL.items()}
LAYOUTS |= {
    f"state-{name}": (size, [*overrides, "train.carry.mode=state", "train.carry.reset=0.25"])
    for name, (size, overrides) in PARALLEL.items()
}
LAYOUTS |= {f"document-{name}": (size, overrides) for name, (size, overrides) in PARALLEL.items()}
LAYOUTS |= {
    f"async-{name}": (size, [*overrides, "checkpoint.async_save=true"])
    for name, (size, overrides) in LAYOUTS.items()
    if name in ("single", "dp2-zero2")
}
"""name -> (world size, overrides). document-*: train_documents's data (--packing document, train.carry.mode:
document); the others: train_data's. async-*: periodic saves written in the background; their reference is the
synchronous run of the same layout."""


@pytest.fixture(scope="module")
def layout_overrides(train_data, train_documents):
    def overrides(layout: str) -> tuple[int, list[str]]:
        world_size, extra = LAYOUTS[layout]
        data = train_documents if layout.startswith("document-") else train_data
        return world_size, data + extra + ["checkpoint.every=3"]

    return overrides


@pytest.fixture(scope="module")
def references(layout_overrides, tmp_path_factory):
    """layout -> the run folder of its uninterrupted run, trained once for both kill points."""
    folders = {}

    def reference(layout: str) -> Path:
        layout = layout.removeprefix("async-")  # an asynchronous save must not change the training
        if layout not in folders:
            world_size, overrides = layout_overrides(layout)
            folders[layout] = tmp_path_factory.mktemp(f"reference-{layout}") / "run"
            finish(launch(folders[layout], world_size, overrides), folders[layout])
        return folders[layout]

    return reference


# make test: one process, killed between checkpoints, without and with carried memory (document lanes); make
# test-all: every layout at both kill points, and every layout with carried memory (state and document).
@pytest.mark.parametrize(
    "layout,during_save",
    [
        ("single", False),
        ("document-single", False),
        ("async-single", False),
        ("async-single", True),
        pytest.param("async-dp2-zero2", False, marks=pytest.mark.slow),
        pytest.param("async-dp2-zero2", True, marks=pytest.mark.slow),
        *(
            pytest.param(name, False, marks=pytest.mark.slow)
            for name in LAYOUTS
            if name.startswith(("state-", "document-")) and name != "document-single"
        ),
        pytest.param("dp2-zero2", True, marks=pytest.mark.slow),
        pytest.param("single", True, marks=pytest.mark.slow),
        pytest.param("dp2-zero2", False, marks=pytest.mark.slow),
        pytest.param("tp2", False, marks=pytest.mark.slow),
        pytest.param("tp2", True, marks=pytest.mark.slow),
        pytest.param("pp2", False, marks=pytest.mark.slow),
        pytest.param("pp2", True, marks=pytest.mark.slow),
    ],
    ids=lambda value: {False: "between-checkpoints", True: "during-save"}.get(value, value),
)
def test_killed_and_resumed_run_is_bit_identical(tmp_path, layout_overrides, references, layout, during_save):
    world_size, overrides = layout_overrides(layout)
    reference, interrupted = references(layout), tmp_path / "interrupted"
    # async during a save: the kill surely lands while the background write is pending.
    held_back = 1 if layout.startswith("async-") and during_save else 0

    process = launch(interrupted, world_size, overrides, writes_held_back=held_back)
    killed_in = wait_for_kill_point(process, interrupted, during_save)
    kill_job(process)
    killed_at = len((interrupted / "metrics.jsonl").read_text().splitlines())
    assert killed_at < STEPS, "the kill came too late to interrupt anything"
    finish(launch(interrupted, world_size, overrides, "--resume", "auto"), interrupted)

    log = (tmp_path / "interrupted.log").read_text()
    assert "resumed from step 3" in log or "resumed from step 6" in log, log[-3000:]  # the newest complete one
    assert_ends_like(interrupted, reference, killed_in)
    complete = [row for row in inspect(interrupted / "checkpoints") if row["complete"]]
    assert [row["step"] for row in complete] == [3, 6, STEPS]  # keep=3; a half-written step 6 was redone


def test_async_saves_write_the_checkpoints_a_synchronous_run_writes(tmp_path, train_data):
    """Checkpoints every 2 steps, the background writer held back 0.5 s so that training changes the parameters
    while each save is pending: every file has the bytes of the synchronous run's (the model states' only
    difference: the config they record, checkpoint.async_save and logging.run_dir)."""
    sync, background = tmp_path / "sync", tmp_path / "async"
    overrides = [*train_data, "checkpoint.every=2", "checkpoint.keep=10"]
    finish(launch(sync, 1, overrides), sync)
    finish(launch(background, 1, [*overrides, "checkpoint.async_save=true"], writes_held_back=0.5), background)

    log = (tmp_path / "async.log").read_text()
    assert log.count("(in the background, published at step") == STEPS // 2 - 1, log[-3000:]  # the last: in sync
    assert logged_losses(background) == logged_losses(sync)
    assert [row["step"] for row in inspect(background / "checkpoints") if row["complete"]] == [2, 4, 6, 8]
    assert (background / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    for step in range(2, STEPS + 1, 2):
        ours = read_manifest(background / "checkpoints" / f"step_{step:08d}").files
        theirs = read_manifest(sync / "checkpoints" / f"step_{step:08d}").files
        assert ours.keys() == theirs.keys()
        differ = [name for name in theirs if ours[name]["sha256"] != theirs[name]["sha256"]]
        assert all("model_states" in name for name in differ), (step, differ)
        for name in differ:
            mine, reference = (
                torch.load(run / "checkpoints" / f"step_{step:08d}" / name, map_location="cpu", weights_only=False)
                for run in (background, sync)
            )
            assert mine["lm2"]["config"]["checkpoint"].pop("async_save") is True
            assert reference["lm2"]["config"]["checkpoint"].pop("async_save") is False
            assert mine["lm2"]["config"]["logging"].pop("run_dir") == str(background)
            assert reference["lm2"]["config"]["logging"].pop("run_dir") == str(sync)
            assert_same(mine, reference, f"{name} of step {step}")


def assert_same(ours, theirs, where: str) -> None:
    """Equal nested values, tensors bitwise."""
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor) and torch.equal(ours, theirs), where
    elif isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), where
        for key in theirs:
            assert_same(ours[key], theirs[key], f"{where}/{key}")
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}/{i}")
    else:
        assert ours == theirs, where


def test_sigusr1_saves_and_exits_for_requeue(tmp_path, train_data):
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "lm2.pipeline.cli",
        "train",
        "--config",
        str(CONFIG),
        f"logging.run_dir={run_dir}",
        "logging.wandb=disabled",
        "train.log_every=1",
        "train.steps=1000",
        "checkpoint.every=0",
        *train_data,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not (run_dir / "metrics.jsonl").exists():
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == EXIT_REQUEUE, output
    rows = inspect(run_dir / "checkpoints")
    assert len(rows) == 1 and rows[0]["complete"] and rows[0]["latest"]
    assert rows[0]["step"] == len((run_dir / "metrics.jsonl").read_text().splitlines())


def test_a_stop_signal_during_an_async_save_publishes_it_then_saves_and_exits_for_requeue(tmp_path, train_data):
    """SIGTERM while step 3's background write is held back 3 s: the run waits for that write, publishes step 3,
    saves the step it stopped at and exits 75; both checkpoints are complete and `latest` names the second."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "tests.slow_saves", "3", "train", "--config", str(CONFIG), *train_data]
    command += [f"logging.run_dir={run_dir}", "logging.wandb=disabled", "train.log_every=1", "train.steps=1000"]
    command += ["checkpoint.every=3", "checkpoint.async_save=true"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    metrics = run_dir / "metrics.jsonl"
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 4:
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.02)
    assert not (run_dir / "checkpoints" / "step_00000003" / MANIFEST).exists(), "step 3's save was not in flight"
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == EXIT_REQUEUE, output
    stopped = len(metrics.read_text().splitlines())
    assert f"(in the background, published at step {stopped})" in output, output
    rows = inspect(run_dir / "checkpoints")
    assert [(row["step"], row["complete"], row["latest"]) for row in rows] == [(3, True, False), (stopped, True, True)]


def test_inspect_command_reports_incomplete_checkpoints(tmp_path, train_data):
    run_dir = tmp_path / "run"
    trained = lm2_cli(
        [
            "train",
            "--config",
            str(CONFIG),
            f"logging.run_dir={run_dir}",
            "logging.wandb=disabled",
            "train.steps=2",
            "checkpoint.every=1",
            *train_data,
        ]
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run_dir / "checkpoints" / "step_00000001" / MANIFEST).unlink()
    inspected = lm2_cli(["ckpt", "inspect", str(run_dir / "checkpoints")])
    assert inspected.returncode == 0, inspected.stderr[-3000:]
    out = inspected.stdout
    lines = out.splitlines()
    assert "step=None" in lines[0] and "INCOMPLETE" in lines[0] and "no lm2_manifest.json" in lines[0]
    assert "step=2  complete  tp=1 pp=1 dp=1 zero=1" in lines[1] and "<- latest" in lines[1]


@pytest.mark.slow
def test_resume_at_another_data_parallel_size_continues_the_same_training(tmp_path, train_data):
    """DP=2 (ZeRO-1, micro-batch 2) killed after its step-3 checkpoint, resumed by one process (micro-batch 4: the
    same global batches) through a universal checkpoint: the losses of all steps match a one-process run."""
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    single = ["train.micro_batch=4", "checkpoint.every=3"]
    finish(launch(reference, 1, train_data + single), reference)
    process = launch(interrupted, 2, train_data + ["checkpoint.every=3"])
    while not (interrupted / "checkpoints" / "step_00000003" / MANIFEST).exists():
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    kill_job(process)
    finish(
        launch(interrupted, 1, train_data + single, "--resume", str(interrupted / "checkpoints" / "step_00000003")),
        interrupted,
    )
    assert "resumed from" in (tmp_path / "interrupted.log").read_text()
    ours, theirs = logged_losses(interrupted), logged_losses(reference)
    assert ours.keys() == theirs.keys() == set(range(1, STEPS + 1))
    for step in theirs:
        assert ours[step] == pytest.approx(theirs[step], rel=1e-5, abs=1e-5), step


def mount_7m(filesystem: str, disk: Path) -> str:
    """A shell command mounting a 7 MiB file system of that kind on `disk`: tmpfs (memory; older kernels refuse
    O_DIRECT there, and the files are written through the page cache) or ext4 on a loop device (direct writes to a
    disk)."""
    if filesystem == "tmpfs":
        return f"mount -t tmpfs -o size=7m tmpfs {disk}"
    image = disk.with_name("ext4.img")
    return f"truncate -s 7m {image} && mkfs.ext4 -F -q -O ^has_journal -m 0 {image} && mount -o loop {image} {disk}"


@pytest.mark.parametrize("filesystem", ["tmpfs", "ext4"])
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_while_saving_fails_once_and_keeps_the_previous_checkpoint(
    tmp_path, train_data, async_save, filesystem
):
    """The run folder lies on a 7 MiB file system (in a mount namespace of its own): one checkpoint of the tiny model
    (4.6 MB) fits, the second does not. Async: step 2's save fails on the background thread, and the error
    surfaces at the next step boundary as the synchronous save's does."""
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    disk.mkdir()
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount_7m(filesystem, disk)],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a 7 MiB {filesystem} in a mount namespace here: {probe.stderr.strip()}")
    train = [
        sys.executable,
        "-m",
        "lm2.pipeline.cli",
        "train",
        "--config",
        str(CONFIG),
        *train_data,
        f"logging.run_dir={disk}/run",
        "logging.wandb=disabled",
        "train.steps=2",
        "checkpoint.every=1",
        "checkpoint.keep=1",
        *(["checkpoint.async_save=true", "train.steps=3"] if async_save else []),
    ]
    # The mount vanishes with the namespace: the run folder is copied out before it ends.
    script = (
        f"{mount_7m(filesystem, disk)} && {subprocess.list2cmdline(train)}; code=$?; "
        f"cp -a {disk}/run {copy}; exit $code"
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "checkpoint error" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert f"could not write checkpoint {disk}/run/checkpoints/step_00000002" in errors[0]
    assert f"--resume auto from {disk}/run/checkpoints/step_00000001, which is intact" in errors[0]
    assert (copy / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    rows = inspect(copy / "checkpoints")
    assert [(row["step"], row["complete"]) for row in rows] == [(1, True)]  # and no partial step_00000002
    assert not [p for p in (copy / "checkpoints").rglob("*") if ".tmp-" in p.name]


def _shared_memory_of(folder: Path) -> dict[str, int]:
    """streaming's /dev/shm files (name -> inode) of the datasets registered as reading `folder`."""
    from streaming.base.shared.prefix import _unpack_locals

    files = {}
    for registry in Path("/dev/shm").glob("*_locals"):
        try:
            if str(folder) in _unpack_locals(registry.read_bytes())[0]:
                prefix = registry.name.removesuffix("_locals")
                files.update({p.name: p.stat().st_ino for p in Path("/dev/shm").glob(f"{prefix}_*")})
        except (OSError, ValueError):
            continue
    return files


@pytest.mark.slow
def test_the_shared_memory_of_a_killed_run_is_removed_by_the_next_run(tmp_path, train_data):
    run_dir = tmp_path / "run"
    data = Path(train_data[0].split("path: ")[1].rstrip("}]")) / "train"
    process = launch(run_dir, 1, train_data)
    while not (run_dir / "metrics.jsonl").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    kill_job(process)
    stale = _shared_memory_of(data)
    assert stale, "the killed run left no shared memory: nothing to test"
    finish(launch(run_dir, 1, train_data, "--resume", "auto"), run_dir)
    survivors = {name for name, inode in _shared_memory_of(data).items() if stale.get(name) == inode}
    assert not survivors
