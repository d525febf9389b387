"""launch/slurm/*.sbatch on a real SLURM cluster (tests/slurm_cluster.py: slurmctld and two slurmd "nodes" here).

Unmodified scripts: prepare.sbatch writes the same dataset as `prepare()`, as one job or as an array job of parts with
a dependent merge; train.sbatch on 2 nodes trains exactly like
torchrun; a signalled job saves, requeues itself and ends bitwise where an uninterrupted run ends, no step repeated
or skipped, the same wandb run continued; a crashing rank fails the job without requeue and leaves no process.
"""

import fcntl
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from tests import slurm_cluster
from tests.pipeline.test_checkpoint_resume import checkpoint_tensors

# make test-all and CI run it. The module is meant to stay on one pytest-xdist worker (xdist_group); the cluster
# fixture also takes a machine-wide lock (below), as parts of it still ran on both workers.
# The timeout covers a worker's wait for the machine-wide cluster lock while the other worker runs the module's
# jobs (about 14 min on 2 loaded cores, past the default 900 s: two setups timed out so).
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.xdist_group("slurm"), pytest.mark.timeout(2700)]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).parent / "tiny_train.yaml"
STEPS = 60
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # One cluster on the machine at a time: clusters number their jobs alike and a job's id gives its rendezvous
    # port (pipeline/launch/slurm.py), so the jobs of two clusters collided (EADDRINUSE on port 15004) when
    # pytest-xdist ran tests of this module on both workers. The lock also keeps the two workers from installing
    # SLURM at once.
    with open(Path(tempfile.gettempdir()) / "lm2-tests-slurm-cluster.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        reason = slurm_cluster.available()
        if reason and os.geteuid() == 0:
            slurm_cluster.install()
            reason = slurm_cluster.available()
        if reason:
            if os.environ.get("LM2_REQUIRE_SLURM"):
                pytest.fail(f"SLURM tests required (LM2_REQUIRE_SLURM) but {reason}")
            pytest.skip(reason)
        cluster = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
        try:
            yield cluster
        finally:
            cluster.stop()


def job_environment() -> dict[str, str]:
    """The scripts activate LM2_VENV (this interpreter's venv); one thread per rank, like torchrun."""
    return {"LM2_VENV": sys.prefix, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def submit(
    cluster, script: str, *args: str, options: tuple[str, ...] = (), output: Path, env: dict[str, str] | None = None
) -> str:
    result = cluster.run(
        "sbatch",
        "--parsable",
        f"--output={output}",
        *options,
        str(ROOT / "launch" / "slurm" / script),
        *args,
        cwd=ROOT,
        env={**job_environment(), **(env or {})},
    )
    return result.stdout.strip().split(";")[0]


def job_fields(cluster, job_id: str) -> dict[str, str]:
    line = cluster.run("scontrol", "show", "job", "-o", job_id).stdout
    return dict(re.findall(r"(\w+)=(\S*)", line))


def wait_for_job(cluster, job_id: str, timeout: float = 600) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = job_fields(cluster, job_id)
        if fields["JobState"] in TERMINAL:
            return fields
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not finished after {timeout} s: {fields}\n{cluster.logs()}")


def train_args(run_dir: Path, train_data: list[str], steps: int = STEPS) -> list[str]:
    return [
        "--config",
        str(CONFIG),
        f"logging.run_dir={run_dir}",
        "logging.wandb=offline",
        "train.log_every=1",
        f"train.steps={steps}",
        "checkpoint.every=0",
        *train_data,
    ]


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def logged_losses(run_dir: Path) -> dict[int, float]:
    return {
        entry["step"]: entry["loss"] for entry in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    }


def final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint_tensors(run_dir / "checkpoints" / f"step_{STEPS:08d}")


def assert_bitwise_equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    # RNG states are per process and launcher-specific (each rank seeds the same way, so they match too).
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key


@pytest.fixture(scope="module")
def torchrun_reference(tmp_path_factory, train_data):
    """The same config trained without SLURM: torchrun, 2 ranks on this machine."""
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "lm2.pipeline.cli",
        "train",
        *train_args(run_dir, train_data),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **job_environment()})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


def test_prepare_array_job_and_its_dependent_merge_write_the_dataset_of_prepared_parts(
    cluster, tmp_path, text_inputs, train_data
):
    from lm2.pipeline.data.parts import Part, merge
    from lm2.pipeline.data.prepare import prepare

    tokenizer = Path(train_data[1].split("=", 1)[1])  # an array job needs its tokenizer up front
    config = yaml.safe_load(CONFIG.read_text())
    config["data"] = {"tokenizer": str(tokenizer)}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    array = submit(
        cluster,
        "prepare.sbatch",
        str(tmp_path / "run.yaml"),
        str(tmp_path / "data"),
        str(text_inputs),
        options=("--array=0-1", "--cpus-per-task=1"),
        output=tmp_path / "part-%a.out",
        env={"VAL_FRACTION": "0.25"},
    )
    merged = submit(
        cluster,
        "prepare.sbatch",
        "--merge",
        str(tmp_path / "data"),
        options=(f"--dependency=afterok:{array}", "--cpus-per-task=1"),
        output=tmp_path / "merge.out",
    )
    fields = wait_for_job(cluster, merged)
    logs = "".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("*.out")))
    assert fields["JobState"] == "COMPLETED", logs
    for index in range(2):
        prepare(
            [text_inputs],
            tmp_path / "reference",
            tokenizer,
            row_length=32,
            val_fraction=0.25,
            part=Part(index, 2),
            progress=False,
        )
    reference = merge(tmp_path / "reference")
    ours = json.loads((tmp_path / "data" / "lm2_data.json").read_text())
    assert ours["parts"] == 2 and ours["splits"] == reference["splits"]
    for split in ("train", "val"):
        index = json.loads((tmp_path / "data" / split / "index.json").read_text())["shards"]
        assert index == json.loads((tmp_path / "reference" / split / "index.json").read_text())["shards"]


def test_srun_tasks_get_ranks_and_a_rendezvous_from_the_allocation(cluster):
    probe = (
        "import json, os; from lm2.pipeline.launch.environment import launcher_environment; "
        "print(json.dumps({**launcher_environment(os.environ), 'node': os.environ['SLURMD_NODENAME']}))"
    )
    result = cluster.run("srun", "--nodes=2", "--ntasks-per-node=2", sys.executable, "-c", probe)
    tasks = sorted((json.loads(line) for line in result.stdout.splitlines()), key=lambda task: int(task["RANK"]))
    assert [task["RANK"] for task in tasks] == ["0", "1", "2", "3"]
    assert [task["LOCAL_RANK"] for task in tasks] == ["0", "1", "0", "1"]
    assert [task["node"] for task in tasks] == ["node1", "node1", "node2", "node2"]
    assert {task["WORLD_SIZE"] for task in tasks} == {"4"} and {task["LOCAL_WORLD_SIZE"] for task in tasks} == {"2"}
    assert {task["MASTER_ADDR"] for task in tasks} == {"node1"}
    assert len({task["MASTER_PORT"] for task in tasks}) == 1 and 15000 <= int(tasks[0]["MASTER_PORT"]) < 30000


def test_prepare_job_writes_the_dataset_prepare_writes(cluster, tmp_path, text_inputs, train_data):
    config = yaml.safe_load(CONFIG.read_text())
    config["data"] = {"tokenizer": str(tmp_path / "tokenizer.model")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    job = submit(
        cluster,
        "prepare.sbatch",
        str(tmp_path / "run.yaml"),
        str(tmp_path / "data"),
        str(text_inputs),
        options=("--cpus-per-task=2",),
        output=tmp_path / "prepare.out",
        env={"VAL_FRACTION": "0.25"},
    )
    fields = wait_for_job(cluster, job)
    assert fields["JobState"] == "COMPLETED", (tmp_path / "prepare.out").read_text()[-3000:]
    # train_data: the same inputs, a 400-piece tokenizer and rows of 32 with a quarter of the documents for val.
    reference = Path(train_data[1].split("=", 1)[1]).parent / "data" / "lm2_data.json"
    ours, theirs = json.loads((tmp_path / "data" / "lm2_data.json").read_text()), json.loads(reference.read_text())
    assert ours["tokenizer"]["sha256"] == theirs["tokenizer"]["sha256"]
    assert ours["row_length"] == theirs["row_length"] == 32 and ours["splits"] == theirs["splits"]


def test_two_node_job_trains_exactly_like_torchrun(cluster, tmp_path, train_data, torchrun_reference):
    run_dir = tmp_path / "run"
    job = submit(
        cluster,
        "train.sbatch",
        *train_args(run_dir, train_data),
        options=("--nodes=2", "--gpus-per-node=1"),
        output=tmp_path / "job.out",
    )
    fields = wait_for_job(cluster, job)
    log = (run_dir / "slurm" / job / "train.log").read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "0", log[-3000:]
    assert "training finished" in (run_dir / "slurm" / job / "job.log").read_text()
    assert logged_losses(run_dir) == logged_losses(torchrun_reference)
    assert_bitwise_equal(final_tensors(run_dir), final_tensors(torchrun_reference))


ASYNC_SAVES = ["checkpoint.every=2", "checkpoint.async_save=true"]


@pytest.mark.parametrize(
    "target,saves",
    [("--batch", []), ("--full", []), ("--full", ASYNC_SAVES)],
    ids=["batch-shell-forwards", "every-rank", "every-rank-async-saves"],
)
def test_signalled_job_saves_requeues_and_ends_like_an_uninterrupted_run(
    cluster, tmp_path, train_data, torchrun_reference, target, saves
):
    """--batch: the signal reaches the batch shell only, which forwards it to the ranks. --full: every process of the
    job gets it at once, as with `#SBATCH --signal=USR1@<grace>` before the time limit or a preemption notice.
    Async saves: a checkpoint every 2 steps written in the background, so the signal comes with one pending or just
    published; saves do not change training, so the reference (no periodic saves) is the same."""
    run_dir = tmp_path / "run"
    job = submit(
        cluster,
        "train.sbatch",
        *train_args(run_dir, train_data),
        *saves,
        options=("--nodes=2", "--gpus-per-node=1"),
        output=tmp_path / "job.out",
    )
    while not (run_dir / "metrics.jsonl").exists() or len(logged_steps(run_dir)) < 2:
        assert job_fields(cluster, job)["JobState"] not in TERMINAL, (tmp_path / "job.out").read_text()[-3000:]
        time.sleep(0.05)
    cluster.run("scancel", "--signal=USR1", target, job)
    fields = wait_for_job(cluster, job)
    log_dir = run_dir / "slurm" / job
    log = (log_dir / "train.log").read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", log[-3000:]
    steps = logged_steps(run_dir)
    assert steps == list(range(1, STEPS + 1)), "a step was repeated or skipped across the requeue"
    saved = re.search(r"resumed from step (\d+) \(requeue 1 of job (\d+)\)", log)
    assert saved and saved[2] == job and 2 <= int(saved[1]) < STEPS, log[-3000:]
    assert "requeueing" in (log_dir / "job.log").read_text()
    assert ("(in the background, published at step" in log) == bool(saves), log[-3000:]
    assert logged_losses(run_dir) == logged_losses(torchrun_reference)
    assert_bitwise_equal(final_tensors(run_dir), final_tensors(torchrun_reference))
    wandb_runs = {path.name.rsplit("-", 1)[1] for path in (run_dir / "wandb").glob("offline-run-*")}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2 and len(wandb_runs) == 1  # one run, resumed


def job_processes(job_id: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("SLURM_JOB_ID") == job_id:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_a_crashing_rank_fails_the_job_without_requeue(cluster, tmp_path, train_data):
    run_dir = tmp_path / "run"
    job = submit(
        cluster,
        "train.sbatch",
        *train_args(run_dir, train_data, steps=100000),
        options=("--nodes=2", "--gpus-per-node=1"),
        output=tmp_path / "job.out",
    )
    while not (run_dir / "metrics.jsonl").exists():
        assert job_fields(cluster, job)["JobState"] not in TERMINAL, (tmp_path / "job.out").read_text()[-3000:]
        time.sleep(0.05)
    rank1 = next(
        p for p in job_processes(job) if p.environ().get("SLURM_PROCID") == "1" and "lm2 train" in " ".join(p.cmdline())
    )
    rank1.kill()
    fields = wait_for_job(cluster, job)
    assert fields["JobState"] == "FAILED" and fields["Restarts"] == "0"
    job_log = (run_dir / "slurm" / job / "job.log").read_text()
    assert "training failed with exit code" in job_log and "not requeued" in job_log
    time.sleep(1)
    assert not job_processes(job), "processes of the failed job survived"
