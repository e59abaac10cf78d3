"""Section 8 of the main job, diagnostics cost: its sizes per mode and its registration. Its
figures, report and targets in a whole smoke run of compare.py are checked in
tests/bench/test_smoke_job.py."""

from __future__ import annotations

from pathlib import Path

from benchmarks import compare, diagnostics
from benchmarks._common import MODES

ROOT = Path(__file__).resolve().parents[2]


def test_sizes_per_mode_and_registration() -> None:
    assert set(diagnostics.SIZES) == set(MODES) and set(diagnostics.ESTIMATE_S) == set(MODES)
    assert diagnostics.SIZES["full"]["depth"] == 16 and diagnostics.SIZES["full"]["width"] == 2
    assert diagnostics.SIZES["full"]["batch"] == 128 and diagnostics.SIZES["full"]["iterations"] == 20
    assert diagnostics.SIZES["full"]["jax"] and not diagnostics.SIZES["smoke"]["jax"]
    assert diagnostics.SIZES["quick"]["jax"] and diagnostics.SIZES["full"]["jax_per_product"]
    assert diagnostics.ESTIMATE_S["quick"] <= 20
    assert "diagnostics" in compare.SECTION_NAMES
    cfg, note = diagnostics._config(compare.section_config(mode="quick", backends=("torch",)))
    assert cfg["backends"] == ["torch"] and note is None
