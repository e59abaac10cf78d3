"""Section 8 of the main job, diagnostics cost: its smoke run through compare's command line,
its sizes per mode and the report and targets drawn from the figures (timings are only checked
for being measured)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import compare, diagnostics
from benchmarks._common import MODES

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_through_compare(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--smoke", "--sections",
         "diagnostics", "--out", str(out), "--threads", "1", "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["errors"] == {} and results["sections"] == ["diagnostics"]
    res = results["diagnostics"]
    smoke = diagnostics.SIZES["smoke"]
    assert res["mode"] == "smoke" and res["config"]["iterations"] == smoke["iterations"]
    rows = res["torch"]["rows"]
    assert rows["gradient"]["median_ms"] > 0 and rows["gradient"]["n"] == smoke["repeats"]
    assert set(diagnostics.TORCH_ROWS.values()) <= set(rows)
    for name in diagnostics.TORCH_ROWS.values():
        assert rows[name]["median_ms"] > 0 and rows[name]["ratio_to_gradient"]["median"] > 0
    hvp = rows[diagnostics.TORCH_ROWS["func"]]
    lanczos = rows[f"lambda_max, Lanczos {smoke['iterations']} iterations (sam_torch)"]
    power = rows[f"lambda_max, PyHessian-style power iteration, {smoke['iterations']} products"]
    # Same model and data: after 3 products, Lanczos's Ritz value is at least the power
    # iteration's Rayleigh quotient up to rounding (both lower bounds of lambda_max).
    assert lanczos["lambda_max"] >= power["lambda_max"] * (1 - 1e-3) > 0
    assert res["jax"] == {"error": "not in the smoke run"}
    (target,) = [t for t in results["targets"] if "HVP" in t["target"]]
    ratio = hvp["ratio_to_gradient"]["median"]
    assert target["measured"] == f"{ratio:.2f}x" and target["holds"] == (ratio <= 2.5)
    report = (out / "report.md").read_text()
    assert "## 8. Diagnostics: cost of Hessian-vector products and lambda_max" in report
    assert f"| {diagnostics.TORCH_ROWS['func_per_product']} |" in report


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
