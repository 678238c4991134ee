"""The import rules of docs/architecture.md (import-linter contracts in pyproject.toml): kept by the package, and
broken by each kind of violation they exist to catch (an upward import, a cycle, an import of the harness)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package under ``root`` with the project's contracts."""
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "HOME": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_package_keeps_every_contract():
    run = lint(ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "4 kept, 0 broken" in run.stdout


@pytest.fixture
def copy_of_package(tmp_path):
    shutil.copytree(ROOT / "nnterp", tmp_path / "nnterp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def add_line(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


@pytest.mark.parametrize("violation", [
    ("core/tokens.py", "from ..standardized import base", "Layers, one direction"),  # upward, core -> models
    ("backends/taps/plan.py", "from ..vllm import engine", "Backends: the engines"),  # shared -> one engine
    ("core/progress.py", "from . import tokens", "No import cycles"),  # with tokens -> progress below
    ("standardized/source.py", "import harness.sweep", "never imports the maintainers' harness"),
])
def test_each_kind_of_violation_breaks_its_contract(copy_of_package, violation):
    where, line, contract = violation
    if contract == "No import cycles":
        add_line(copy_of_package / "nnterp/core/tokens.py", "from . import progress")
    add_line(copy_of_package / "nnterp" / where, line)
    run = lint(copy_of_package)
    assert run.returncode != 0 and "Broken contracts" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
    assert contract in run.stdout.split("Broken contracts")[1], run.stdout[-3000:]
