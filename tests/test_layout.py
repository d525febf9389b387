"""The package layout: every package folder ships in the wheel, and model/ stays single-device math."""

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for package, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *relative)))
    assert found == listed


def test_every_c_source_ships_in_the_wheel():
    """Kernels are compiled from their source on the user's machine, so the wheel must carry it."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    sources = [
        (package, path)
        for package, folder in setuptools["package-dir"].items()
        for path in (ROOT / folder).rglob("*.c")
    ]
    assert sources
    for package, path in sources:
        assert any(path.match(pattern) for pattern in setuptools["package-data"].get(package, [])), path


def test_model_never_imports_training_machinery():
    forbidden = {"deepspeed", "wandb", "streaming", "os", "lm2.pipeline"}
    for path in (ROOT / "model").rglob("*.py"):
        # The one place the model meets the OS: the compiled kernels' folder must be this user's (uid, XDG cache).
        allowed = {"os"} if path.name == "kernel_cache.py" else set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                assert not any(name == f or name.startswith(f + ".") for f in forbidden - allowed), (
                    f"{path}: imports {name}"
                )


def test_plain_pytest_collects_from_the_repository_root(tmp_path):
    """The `pytest` console script puts no folder on sys.path (unlike `python -m pytest`, which adds the current
    one): this script does what it does, so `tests.*` must import through the pytest configuration alone."""
    import subprocess
    import sys

    script = tmp_path / "pytest_console_script.py"
    script.write_text("import sys\nimport pytest\nsys.exit(pytest.main())\n")
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/model/test_config.py",
            "tests/pipeline/test_memory_metrics.py",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
