"""Layering: the library packages stay free of orchestration and storage libraries, imports point one
way (fusion <- evaluation <- pipelines <- assets), and only tests import tests.

Every .py file is parsed with `ast` (nothing is imported), so a violation anywhere, even behind an
`if` or inside a function, fails the test. `importlib.import_module("x")` and `__import__("x")` with a
literal name count as imports too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BANNED_IN_CORE = ("dagster", "lance", "lancedb", "mlflow", "duckdb")
# package -> top-level packages of this project it must never import
UPWARD = {
    "fusion": ("evaluation", "pipelines", "assets", "benchmarks", "tests"),
    "evaluation": ("pipelines", "assets", "benchmarks", "tests"),
}
SKIP_DIRS = {".venv", "venv", "lake", "node_modules", "build", "dist", "__pycache__"}


def imported_modules(source: str, module: str = "", is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in `source`.

    `module` is the dotted name of the file (e.g. "fusion.encoders.hf"), used to resolve relative
    imports; `is_package` says the file is a package's __init__.py (relative imports then start at it).
    """
    tree = ast.parse(source)
    here = module.split(".") if module else []
    base = here if is_package else here[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 > len(base):
                    raise ValueError(f"{module}: relative import beyond the top-level package")
                anchor = base[: len(base) - (node.level - 1)]
                parts = anchor + (node.module.split(".") if node.module else [])
                if node.module is None:  # `from . import x`: each name may be a module
                    found += [(node.lineno, ".".join(parts + [a.name])) for a in node.names]
                    continue
                found.append((node.lineno, ".".join(parts)))
            else:
                found.append((node.lineno, node.module or ""))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """The layering rules broken by `source`, the text of module `module`, as readable strings."""
    top = module.split(".")[0]
    bad: list[str] = []
    for line, name in imported_modules(source, module, is_package):
        root = name.split(".")[0]
        if top in ("fusion", "evaluation") and root in BANNED_IN_CORE:
            bad.append(
                f"{module}:{line} imports {name} ({top}/ must stay free of {', '.join(BANNED_IN_CORE)})"
            )
        if root in UPWARD.get(top, ()):
            bad.append(f"{module}:{line} imports {name} (imports point one way: {top} may not import {root})")
        if top != "tests" and root == "tests":
            bad.append(f"{module}:{line} imports {name} (only tests import tests)")
    return bad


def _python_files(root: Path) -> list[Path]:
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith(".") for part in rel.parts[:-1]):
            continue
        out.append(path)
    return sorted(out)


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def check_tree(root: Path) -> list[str]:
    """Every layering violation in the .py files under `root` (a project checkout)."""
    bad = []
    for path in _python_files(root):
        module, is_pkg = _module_name(path, root)
        bad += violations(path.read_text(encoding="utf-8"), module, is_pkg)
    return bad


def test_the_project_keeps_its_layers():
    files = _python_files(ROOT)
    names = {_module_name(p, ROOT)[0].split(".")[0] for p in files}
    assert {"fusion", "evaluation", "tests"} <= names  # the walk really found the packages
    assert sum(1 for p in files if p.relative_to(ROOT).parts[0] == "fusion") >= 8
    bad = check_tree(ROOT)
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_check_tree_finds_a_violation_in_a_nested_module(tmp_path):
    (tmp_path / "fusion" / "encoders").mkdir(parents=True)
    (tmp_path / "fusion" / "__init__.py").write_text("")
    (tmp_path / "fusion" / "encoders" / "__init__.py").write_text("from . import good\n")
    (tmp_path / "fusion" / "encoders" / "good.py").write_text("import torch\n")
    (tmp_path / ".venv" / "dagster").mkdir(parents=True)  # third-party code is not ours to check
    (tmp_path / ".venv" / "dagster" / "x.py").write_text("import tests\n")
    assert check_tree(tmp_path) == []
    (tmp_path / "fusion" / "encoders" / "bad.py").write_text("import os\n\nif os.name:\n    import mlflow\n")
    assert check_tree(tmp_path) == [
        "fusion.encoders.bad:4 imports mlflow (fusion/ must stay free of dagster, lance, lancedb, mlflow, duckdb)"
    ]


@pytest.mark.parametrize(
    ("source", "module", "why"),
    [
        ("import dagster\n", "fusion.trainer", "dagster"),
        ("import lance.dataset\n", "fusion.x", "lance"),
        ("from lancedb import connect\n", "evaluation.report", "lancedb"),
        ("def f():\n    import mlflow\n", "evaluation.report", "mlflow"),
        ("try:\n    import duckdb\nexcept ImportError:\n    pass\n", "fusion.x", "duckdb"),
        ("import importlib\nm = importlib.import_module('mlflow.tracking')\n", "fusion.x", "mlflow"),
        ("m = __import__('dagster')\n", "evaluation.x", "dagster"),
        ("from evaluation.retrieval import retrieval_metrics\n", "fusion.trainer", "evaluation"),
        ("from ..evaluation import retrieval\n", "fusion.trainer", "evaluation"),
        ("from ... import evaluation\n", "fusion.encoders.hf", "evaluation"),
        ("from pipelines.resources import Lake\n", "evaluation.report", "pipelines"),
        ("from tests.tiny_models import build\n", "pipelines.cli", "only tests"),
        ("import tests.fixtures\n", "benchmarks.bench_x", "only tests"),
        ("from tests import conftest\n", "fusion.synthetic", "only tests"),
    ],
)
def test_checker_flags_forbidden_imports(source, module, why):
    bad = violations(source, module)
    assert bad and any(why in b for b in bad), bad


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("import torch\nimport numpy as np\nfrom fusion.config import AdapterConfig\n", "fusion.trainer"),
        ("from fusion.adapters import FusedModel\n", "evaluation.retrieval"),
        ("from .retrieval import retrieval_metrics\n", "evaluation.report"),
        ("from . import config\n", "fusion.trainer"),
        ("import lancedb\nimport dagster as dg\nfrom evaluation import retrieval\n", "pipelines.lake"),
        ("from tests.tiny_models import build\n", "tests.fusion.test_x"),
        ("import lance_utils\nimport duckdb_like\n", "fusion.x"),  # names that merely start alike
        ("x = 'import dagster'\n# import mlflow\n", "fusion.x"),  # strings and comments are not imports
    ],
)
def test_checker_allows_legal_imports(source, module):
    assert violations(source, module) == []


def test_relative_imports_resolve_against_the_module():
    assert imported_modules("from .loss import clip_loss\n", "fusion.trainer") == [(1, "fusion.loss")]
    assert imported_modules("from .. import media\n", "fusion.encoders.hf") == [(1, "fusion.media")]
    assert imported_modules("from .base import X\n", "fusion.encoders", is_package=True) == [
        (1, "fusion.encoders.base")
    ]
