"""launch/local.sh: SIGTERM or SIGUSR1 to the launcher makes every rank save at the same step and the launcher exit
with the requeue code, leaving no process behind; a failing rank stops the job with its own exit code;
a config error is one line from rank 0."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from lm2.pipeline.checkpoint.reader import inspect
from lm2.pipeline.launch.exit_codes import EXIT_LM2_ERROR, EXIT_REQUEUE

ROOT = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).parent / "tiny_train.yaml"


def start_local(run_dir: Path, train_data: list[str], *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "NPROC": "2", "PATH": f"{Path(os.sys.executable).parent}:{os.environ['PATH']}"}
    command = [
        str(ROOT / "launch" / "local.sh"),
        "--config",
        str(CONFIG),
        f"logging.run_dir={run_dir}",
        "logging.wandb=disabled",
        "train.log_every=1",
        "checkpoint.every=0",
        *train_data,
        *overrides,
    ]
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def wait_for_steps(process: subprocess.Popen, run_dir: Path, steps: int) -> None:
    metrics = run_dir / "metrics.jsonl"
    while not metrics.exists() or len(metrics.read_text().splitlines()) < steps:
        assert process.poll() is None, (run_dir.parent / f"{run_dir.name}.log").read_text()[-3000:]
        time.sleep(0.05)


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)], ids=["sigterm", "sigusr1"]
)
def test_signal_to_the_launcher_saves_and_exits_for_requeue(tmp_path, train_data, signum):
    run_dir = tmp_path / "run"
    launcher = start_local(run_dir, train_data, "train.steps=1000")
    wait_for_steps(launcher, run_dir, 2)
    family = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
    launcher.send_signal(signum)
    code = launcher.wait(timeout=300)
    log = (tmp_path / "run.log").read_text()
    assert code == EXIT_REQUEUE, log[-3000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = inspect(run_dir / "checkpoints")
    assert len(rows) == 1 and rows[0]["complete"] and rows[0]["latest"], rows
    assert rows[0]["step"] == steps[-1] < 1000  # the step every rank agreed on, right after the last logged one
    assert rows[0]["topology"]["world_size"] == 2
    gone, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, f"processes survived the launcher: {[p.cmdline() for p in alive]}"
    assert "Traceback" not in log


@pytest.mark.slow
def test_a_failing_rank_stops_the_job_with_its_exit_code(tmp_path, train_data):
    run_dir = tmp_path / "run"
    launcher = start_local(run_dir, train_data, "train.steps=1000")
    wait_for_steps(launcher, run_dir, 1)
    ranks = psutil.Process(launcher.pid).children(recursive=True)
    victim = next(p for p in ranks if p.environ().get("RANK") == "1")
    victim.kill()
    code = launcher.wait(timeout=120)
    assert code == 128 + signal.SIGKILL
    assert "rank 1 was killed by SIGKILL; stopping the other ranks" in (tmp_path / "run.log").read_text()
    gone, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, f"processes survived the launcher: {[p.cmdline() for p in alive]}"
    assert not (run_dir / "checkpoints").exists() or not inspect(run_dir / "checkpoints")


def test_a_config_error_is_one_line_from_the_whole_job(tmp_path):
    """Every rank refuses the layout; rank 0 alone says why, the launcher adds nothing, the job exits with 2."""
    run_dir = tmp_path / "run"
    launcher = start_local(run_dir, [], "parallel.tp=2", "model.num_kv_heads=1")
    code = launcher.wait(timeout=300)
    log = (tmp_path / "run.log").read_text()
    assert code == EXIT_LM2_ERROR, log
    assert log == (
        "lm2 train: configuration error: num_kv_heads=1 must be divisible by the tensor-parallel size 2: "
        "lower parallel.tp or raise num_kv_heads\n"
    )
