"""The trainer as users run it: the schedule, the optimizer groups, config refusals, metrics and wandb offline,
and a stop with a clear message on a non-finite loss."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lm2.model.accounting import forward_flops_per_token
from lm2.model.errors import ConfigError
from lm2.pipeline.config import load_config
from lm2.pipeline.parallel.dims import ParallelDims
from lm2.pipeline.train.engine import ds_config, lr_factor, param_groups
from tests.distributed import lm2_cli

CONFIG = Path(__file__).parent / "tiny_train.yaml"


def test_lr_warms_up_then_decays_to_min_lr():
    run = load_config(CONFIG, ["optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_steps=4", "train.steps=14"])
    factors = [lr_factor(step, run.optim, run.train.steps) for step in range(16)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0) and factors[9] == pytest.approx(0.55)  # cosine midpoint
    assert factors[14] == pytest.approx(0.1) and factors[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    linear = load_config(
        CONFIG, ["optim.lr=1.0", "optim.min_lr=0.0", "optim.warmup_steps=0", "optim.decay=linear", "train.steps=10"]
    ).optim
    assert [lr_factor(s, linear, 10) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])


def test_weight_decay_spares_norms_biases_and_memory_banks(single_process):
    from lm2.model.lm import LM2Model
    from lm2.pipeline.parallel.mpu import tensor_parallel

    model = LM2Model(load_config(CONFIG).model, tensor_parallel())
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    spared = sorted({names[id(p)].split(".")[-1] for p in no_decay["params"]})
    assert spared == ["forget_gate_bias", "in_gate_bias", "init_bank", "out_gate_bias", "weight"]
    assert all(
        names[id(p)].endswith("norm.weight")
        or "layernorm" in names[id(p)]
        or "bias" in names[id(p)]
        or "init_bank" in names[id(p)]
        for p in no_decay["params"]
    )
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_batch_arithmetic_and_its_errors():
    run = load_config(CONFIG, ["train.global_batch=16", "train.micro_batch=2"])
    config = ds_config(run, ParallelDims(world_size=8, tp=2, pp=1))
    assert (config["train_batch_size"], config["gradient_accumulation_steps"]) == (16, 2)
    with pytest.raises(ConfigError, match="global_batch=16 must be a multiple of train.micro_batch .* = 2 . 3"):
        ds_config(run, ParallelDims(world_size=3))


def test_zero_2_with_pipeline_is_a_config_error_that_says_why():
    with pytest.raises(ConfigError, match="pipeline engine supports ZeRO 0-1 only"):
        load_config(CONFIG, ["parallel.pp=2", "parallel.zero_stage=2"])


def train_cli(run_dir, overrides, fresh=False):
    """`lm2 train` on the test config; fresh: in a new interpreter (what a user's console shows, import-time
    notices included), else forked from the tests' fork server (tests/distributed.py)."""
    args = ["train", "--config", str(CONFIG), f"logging.run_dir={run_dir}", *overrides]
    if fresh:
        return subprocess.run(
            [sys.executable, "-m", "lm2.pipeline.cli", *args], capture_output=True, text=True, timeout=600
        )
    return lm2_cli(args)


LOGGED = [
    "train.steps=4",
    "train.log_every=2",
    "train.eval_every=4",
    "train.peak_tflops=1.0",
    "checkpoint.every=2",
    "logging.wandb=offline",
]


@pytest.fixture(scope="module")
def logged_run(train_data, tmp_path_factory):
    """One 4-step run that logs, evaluates and saves every 2 steps to the console, metrics.jsonl and offline wandb."""
    run_dir = tmp_path_factory.mktemp("logged_run")
    result = train_cli(run_dir, train_data + LOGGED, fresh=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_metrics_reach_console_jsonl_and_offline_wandb(train_data, logged_run):
    tmp_path, result = logged_run
    run = load_config(CONFIG, [f"logging.run_dir={tmp_path}", *train_data, *LOGGED])
    entries = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries] == [2, 4]
    flops_per_token = 3 * forward_flops_per_token(run.model)
    for entry in entries:
        step = entry["step"]
        assert (entry["samples"], entry["tokens"]) == (step * 8, step * 8 * 32)
        # the LR step N applied: the schedule after N - 1 steps (test_schedule_and_clipping reads it from weights)
        assert entry["lr"] == pytest.approx(run.optim.lr * lr_factor(step - 1, run.optim, run.train.steps))
        assert entry["tflops_per_device"] == pytest.approx(entry["tokens_per_s"] * flops_per_token / 1e12)  # 1 rank
        assert entry["mfu"] == pytest.approx(entry["tflops_per_device"] / 1.0)
        assert entry["loss"] > 0 and entry["grad_norm"] > 0
        gates = {
            name: [entry[f"gates/layer_{i:02d}/{name}"] for i in range(4)] for name in ("g_in", "g_forget", "g_out")
        }
        assert all(0 < value < 1 for values in gates.values() for value in values)
        means = "/".join(f"{sum(values) / 4:.2f}" for values in gates.values())
        norms = [entry[f"memory/layer_{i:02d}/slot_norm_{kind}"] for kind in ("mean", "max") for i in range(4)]
        assert all(0 < norm for norm in norms) and max(norms[:4]) <= max(norms[4:])
        norm_line = f"slot norm mean/max {sum(norms[:4]) / 4:.2f}/{max(norms[4:]):.2f}"
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"step {step}/4 |"))
        assert f"loss {entry['loss']:.4f}" in line and line.endswith(f"gates in/forget/out {means} | {norm_line}")
    assert "val_loss" in entries[-1] and f"val {entries[-1]['val_loss']:.4f}" in result.stdout
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_console_shows_what_a_user_reads(train_data, logged_run, tmp_path):
    """One startup summary, one line per log step, one per checkpoint, an end line; no library notices (offline
    wandb included) unless --verbose."""
    _, result = logged_run
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[:5]] == ["model", "layout", "data", "run", "start"], lines
    assert "tp=1 pp=1 dp=1" in lines[1] and "fresh run from step 0" in lines[4]
    assert re.fullmatch(r"saved step 2 \(\d+\.\d MB, \d+\.\d s\): .*step_00000002", lines[6]), lines
    assert [line.split(" |")[0] for line in lines[5:]][:3] == ["step 2/4", lines[6], "step 4/4"]
    assert lines[-1].startswith("done: steps 1-4 in") and len(lines) == 10, lines
    assert result.stderr == "", result.stderr
    verbose = train_cli(tmp_path / "verbose", train_data + ["train.steps=1", "logging.wandb=offline", "--verbose"])
    assert verbose.returncode == 0 and "wandb:" in verbose.stdout + verbose.stderr


def test_non_finite_loss_stops_with_a_clear_message(train_data, tmp_path):
    result = train_cli(
        tmp_path,
        train_data
        + [
            "optim.lr=1e30",
            "optim.warmup_steps=0",
            "optim.grad_clip=0",
            "train.steps=20",
            "logging.wandb=disabled",
            "checkpoint.every=1",
        ],
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert "non-finite loss" in result.stderr and "stopping without saving" in result.stderr
    saved = [p.name for p in (tmp_path / "checkpoints").glob("step_*")] if (tmp_path / "checkpoints").exists() else []
    failed_step = int(result.stderr.split("at step ")[1].split(":")[0])
    assert all(int(name.split("_")[1]) < failed_step for name in saved)


@pytest.mark.slow
def test_pipeline_validation_loss_equals_single_process(train_data, tmp_path):
    """The pipeline engine's eval_batch reports what the plain forward reports, on the same val rows."""
    from tests.pipeline.test_checkpoint_resume import finish, launch

    runs = {}
    for world_size, layout in ((1, []), (2, ["parallel.pp=2"])):
        run_dir = tmp_path / f"pp{world_size}"
        finish(
            launch(
                run_dir,
                world_size,
                train_data + layout + ["train.eval_every=4", "train.eval_batches=2", "checkpoint.every=0"],
            ),
            run_dir,
        )
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        runs[world_size] = [json.loads(line)["val_loss"] for line in lines if "val_loss" in line]
    assert len(runs[1]) == 2 and runs[2] == pytest.approx(runs[1], rel=1e-5)


@pytest.mark.slow
def test_a_fresh_start_in_a_folder_with_checkpoints_is_refused(train_data, tmp_path):
    base = train_data + ["logging.wandb=disabled", "checkpoint.every=1", "checkpoint.keep=3"]
    assert train_cli(tmp_path, base + ["train.steps=2"]).returncode == 0
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    metrics = (tmp_path / "metrics.jsonl").read_text()
    result = train_cli(tmp_path, base + ["train.steps=2"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "already holds checkpoints of a run (newest step_00000002)" in result.stderr
    assert "--resume auto" in result.stderr and "logging.run_dir" in result.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    assert (tmp_path / "metrics.jsonl").read_text() == metrics
    # An older checkpoint of the folder cannot be resumed into it either: the newer ones would be pruned at once.
    result = train_cli(tmp_path, base + ["train.steps=3", f"checkpoint.resume={tmp_path}/checkpoints/step_00000001"])
    assert result.returncode == 2 and "holds checkpoints newer than" in result.stderr, result.stderr[-3000:]
    resumed = train_cli(tmp_path, base + ["train.steps=3", "checkpoint.resume=auto", "--override-schedule"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 2" in resumed.stdout
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000003"


def test_a_run_folder_in_use_is_refused_naming_its_holder_and_freed_when_the_holder_dies(train_data, tmp_path):
    from lm2.pipeline.train.run_folder import lock_run_folder

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from lm2.pipeline.train.run_folder import lock_run_folder; "
            "handle = lock_run_folder(Path(sys.argv[1])); print('locked', flush=True); "
            "time.sleep(600)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = train_cli(tmp_path, train_data + ["logging.wandb=disabled", "checkpoint.resume=auto"])
        assert result.returncode == 2, result.stderr[-3000:]
        assert "is in use by another job (host " in result.stderr and f"pid {holder.pid}," in result.stderr
        assert not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()  # SIGKILL: no chance to clean up
        holder.wait()
    assert (tmp_path / ".lock").read_text().startswith("host ")  # the stale file of a killed job ...
    lock = lock_run_folder(tmp_path)  # ... holds no lock
    assert f"pid {os.getpid()}," in (tmp_path / ".lock").read_text()
    lock.release()


def fake_slurm(folder: Path, monkeypatch, squeue: str, sacct: str = "") -> None:
    """`squeue` and `sacct` on PATH that answer as SLURM does for one job: squeue prints its state, or fails with
    SLURM's message once the controller has forgotten the job ("gone"); sacct prints its accounted state."""
    folder.mkdir(exist_ok=True)
    if squeue == "gone":
        body = 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1'
    else:
        body = f'echo "{squeue}"'
    (folder / "squeue").write_text(f"#!/bin/sh\n{body}\n")
    (folder / "sacct").write_text(f'#!/bin/sh\necho "{sacct}"\n')
    for name in ("squeue", "sacct"):
        (folder / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def without_flock(monkeypatch) -> None:
    """flock as Lustre mounted noflock answers it."""
    import errno
    import fcntl

    def no_flock(*_):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)


def holder_line(host: str, pid: int, job: str | None = None) -> str:
    return f"host {host}, pid {pid}" + (f", SLURM job {job}" if job else "") + ", since 2026-01-01 00:00:00\n"


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_without_flock_the_lock_is_an_owner_file_judged_by_host_and_pid(tmp_path, monkeypatch):
    import socket

    from lm2.model.errors import CheckpointError
    from lm2.pipeline.train.run_folder import lock_run_folder

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    without_flock(monkeypatch)
    owner = tmp_path / ".lock.owner"
    lock = lock_run_folder(tmp_path)
    assert f"pid {os.getpid()}," in owner.read_text()
    with pytest.raises(CheckpointError, match=f"in use by another job \\(host .*, pid {os.getpid()},"):
        lock_run_folder(tmp_path)  # this process is alive: a second job on the folder is refused
    lock.release()
    assert not owner.exists()
    owner.write_text(holder_line(socket.gethostname(), dead_pid()))  # a killed job on this host
    lock = lock_run_folder(tmp_path)
    assert f"pid {os.getpid()}," in owner.read_text()
    lock.release()
    owner.write_text(holder_line("elsewhere", 12345))  # another host, no SLURM: nothing proves it gone
    with pytest.raises(CheckpointError, match=f"host elsewhere, pid 12345.*remove {owner}"):
        lock_run_folder(tmp_path)
    assert owner.read_text() == holder_line("elsewhere", 12345)


def test_without_flock_a_slurm_holder_is_judged_by_squeue_and_sacct(tmp_path, monkeypatch):
    from lm2.model.errors import CheckpointError
    from lm2.pipeline.train.run_folder import lock_run_folder

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    without_flock(monkeypatch)
    run_dir, owner = tmp_path / "run", tmp_path / "run" / ".lock.owner"
    run_dir.mkdir()
    for squeue, sacct, free in (
        ("RUNNING", "", False),
        ("COMPLETING", "", False),
        ("gone", "", True),
        ("", "CANCELLED by 1000", True),
        ("", "REQUEUED", False),
    ):
        owner.write_text(holder_line("node7", 999, job="4242"))
        fake_slurm(tmp_path / f"bin-{squeue or sacct}".replace(" ", "_"), monkeypatch, squeue, sacct)
        if free:
            lock_run_folder(run_dir).release()
            assert not owner.exists(), (squeue, sacct)
        else:
            with pytest.raises(CheckpointError, match="SLURM job 4242"):
                lock_run_folder(run_dir)
    owner.write_text(holder_line("node7", 999, job="5151"))
    monkeypatch.setenv("SLURM_JOB_ID", "5151")  # this job, requeued: its previous run has ended
    lock_run_folder(run_dir).release()


def test_a_flock_that_outlives_its_job_is_taken_over(tmp_path, monkeypatch):
    """NFS can keep a crashed node's flock until its server notices: a second open file holding the flock stands in
    for it. Held by a job SLURM says ended, the lock moves to a new file; held by a running job, it is refused."""
    import fcntl

    from lm2.model.errors import CheckpointError
    from lm2.pipeline.train.run_folder import lock_run_folder

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    (tmp_path / ".lock").write_text(holder_line("crashed-node", 31, job="77"))
    stale = open(tmp_path / ".lock")
    fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        fake_slurm(tmp_path / "running", monkeypatch, "RUNNING")
        with pytest.raises(CheckpointError, match="host crashed-node, pid 31, SLURM job 77"):
            lock_run_folder(tmp_path)
        fake_slurm(tmp_path / "ended", monkeypatch, "gone")
        lock = lock_run_folder(tmp_path)
        assert f"pid {os.getpid()}," in (tmp_path / ".lock").read_text()
        with pytest.raises(CheckpointError, match=f"pid {os.getpid()},"):
            lock_run_folder(tmp_path)  # the new file's flock holds
        lock.release()
    finally:
        stale.close()
