"""The import contracts of pyproject.toml ([tool.importlinter]): fusion <- evaluation <- pipelines <-
assets <- app, no orchestration or storage library in fusion/ or evaluation/, nothing shipped
imports tests or benchmarks. `make lint` runs the same check; here a broken contract fails the tests.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lint-imports"
    cmd = str(exe) if exe.exists() else shutil.which("lint-imports")
    assert cmd, "import-linter is not installed (make install)"
    return subprocess.run([cmd, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_project_keeps_its_import_contracts():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path):
    # A copy of the packages with one upward import (evaluation -> pipelines) must be refused.
    for pkg in ("app", "assets", "pipelines", "evaluation", "fusion", "tests", "benchmarks"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bad = tmp_path / "evaluation" / "sneaky.py"
    bad.write_text("from pipelines.lake import Lake\nimport dagster\n")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command as c; c()",
            "--no-cache",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert "evaluation.sneaky -> pipelines.lake" in result.stdout
    assert "evaluation.sneaky -> dagster" in result.stdout
