"""Which distributed environment a rank gets from its launcher, and how SLURM's task counts are read."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lm2.pipeline.launch.environment import launcher_environment
from lm2.pipeline.launch.slurm import master_port, requeue_note, tasks_on_node


@pytest.mark.parametrize("spec,node,count", [("8", 0, 8), ("8(x2),4", 1, 8), ("8(x2),4", 2, 4), ("2,1(x3)", 3, 1)])
def test_tasks_on_node_reads_slurm_compressed_counts(spec, node, count):
    assert tasks_on_node(spec, node) == count


def test_a_launcher_that_sets_the_world_is_left_alone():
    assert launcher_environment({"WORLD_SIZE": "4", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3"}) == {}


def test_the_batch_script_itself_is_a_world_of_one_not_a_slurm_task():
    env = launcher_environment({"SLURM_JOB_ID": "12", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"})
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")


def test_master_port_is_the_same_for_every_task_of_a_job_and_below_ephemeral_ports():
    ports = {master_port(str(job)) for job in (7, 15007, 30007)}
    assert ports == {15007} and all(15000 <= master_port(str(job)) < 30000 for job in range(0, 100000, 997))


def test_requeue_note_names_the_restart_and_the_job():
    assert requeue_note({"SLURM_JOB_ID": "12", "SLURM_RESTART_COUNT": "2"}) == " (requeue 2 of job 12)"
    assert requeue_note({"SLURM_JOB_ID": "12", "SLURM_RESTART_COUNT": "0"}) == ""
    assert requeue_note({}) == ""


def job_info(world_size: int, *train_args: str, tmp_path) -> subprocess.CompletedProcess:
    config = Path(__file__).parent / "tiny_train.yaml"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "lm2.pipeline.cli",
            "launch",
            "job-info",
            str(world_size),
            "--config",
            str(config),
            f"logging.run_dir={tmp_path}",
            *train_args,
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, SLURM_JOB_ID="77"),
        timeout=120,
    )


def test_job_info_checks_the_layout_against_the_jobs_ranks(tmp_path):
    good = job_info(4, "parallel.tp=2", tmp_path=tmp_path)
    assert good.returncode == 0 and good.stdout.split() == [str(tmp_path.resolve() / "slurm" / "77"), "75"]
    bad = job_info(3, "parallel.tp=2", tmp_path=tmp_path)  # 3 ranks cannot hold tp=2
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "tp" in bad.stderr, bad.stderr
