"""The Makefile's set-up logic, dry-run (``make -n``): what a first call installs, that a
second call installs nothing, and that a change of ``pyproject.toml`` or ``TORCH`` sets up
again. Nothing is installed here."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def dry_run(folder: Path, *args: str) -> str:
    proc = subprocess.run(["make", "-n", *args, f"PYTHON={sys.executable}"], cwd=folder,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def stamp_of(plan: str) -> str:
    (stamp,) = set(re.findall(r'touch "(\.venv/\.sam-opt-setup-[0-9a-f]{16})"', plan))
    return stamp


def test_setup_runs_once_per_pyproject_and_torch(tmp_path: Path) -> None:
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    plan = dry_run(tmp_path, "setup")
    assert '.venv/bin/python -m pip install --quiet "torch==2.13.0"' in plan
    assert '.venv/bin/python -m pip install --quiet -e ".[torch,jax,examples,bench,dev,hf]"' in plan
    assert plan.index('"torch==2.13.0"') < plan.index('-e ".[')  # torch first: pinned
    stamp = stamp_of(plan)
    (tmp_path / stamp).parent.mkdir()
    (tmp_path / stamp).touch()
    assert "pip install" not in dry_run(tmp_path, "setup")  # set up: nothing to do
    other = dry_run(tmp_path, "setup", "TORCH=torch==2.5.1")
    assert '"torch==2.5.1"' in other and stamp_of(other) != stamp
    with open(tmp_path / "pyproject.toml", "a", encoding="utf-8") as f:
        f.write("\n# changed\n")
    again = dry_run(tmp_path, "setup")
    assert "pip install" in again and stamp_of(again) != stamp


def test_test_and_bench_run_the_readme_commands_in_the_venv(tmp_path: Path) -> None:
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    plan = dry_run(tmp_path, "test", "PYTEST_ARGS=tests/core")
    assert ".venv/bin/ruff check ." in plan
    assert ".venv/bin/python -m pytest -q tests/core" in plan
    assert "collected no tests" in plan  # pytest's exit code 5 fails make test
    assert ".venv/bin/python benchmarks/compare.py --full" in dry_run(tmp_path, "bench",
                                                                      "ARGS=--full")
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_make_test_runs_on_two_xdist_workers_unless_told_not_to(tmp_path: Path) -> None:
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    plan = dry_run(tmp_path, "test")
    assert re.search(r"\.venv/bin/python -m pytest -q .* -n 2 --dist loadfile", plan)
    serial = dry_run(tmp_path, "test", "XDIST=")
    assert ".venv/bin/python -m pytest -q " in serial and " -n " not in serial
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert any(d.startswith("pytest-xdist") for d in config["project"]["optional-dependencies"]["dev"])
