"""``make test`` prints a branch-coverage report of the three packages and never fails on it
(dry run: nothing is installed or run)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.bench.test_make import ROOT, dry_run

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def test_make_test_reports_branch_coverage_without_a_threshold(tmp_path: Path) -> None:
    tomllib = pytest.importorskip("tomllib")
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    plan = dry_run(tmp_path, "test", "PYTEST_ARGS=tests/core")
    assert ".venv/bin/python -m pytest -q tests/core --cov --cov-report=term-missing:skip-covered" in plan
    assert "fail-under" not in plan
    assert "--cov" not in dry_run(tmp_path, "test", "COV=")  # the way to run without it
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    coverage = config["tool"]["coverage"]
    assert coverage["run"]["branch"] is True
    assert set(coverage["run"]["source"]) == {"sam_core", "sam_torch", "sam_jax"}
    assert "fail_under" not in coverage.get("report", {})
    assert any(dep.startswith("pytest-cov") for dep in config["project"]["optional-dependencies"]["dev"])
