"""Section 7 of the main job, m-sharpness cost: run through compare's command line in its
smoke mode, and its sizes per mode. Timings are only checked for being measured and for
agreeing with the figures the report and the targets show."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import compare, msharpness
from benchmarks._common import MODES, sized

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_through_compare_reports_the_section_and_its_targets(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--smoke", "--sections",
         "msharpness", "--out", str(out), "--threads", "1", "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["errors"] == {} and results["sections"] == ["msharpness"]
    res = results["msharpness"]
    # the smoke sizes, torch only, every path timed
    assert res["mode"] == "smoke" and res["config"]["threads"] == 1
    smoke = msharpness.SIZES["smoke"]
    assert res["config"]["ms"] == smoke["ms"] and res["config"]["batch"] == smoke["batch"]
    rows = res["torch"]["rows"]
    assert set(rows) == {"SGD", "batch SAM"} | {f"m={m} {p}" for m in smoke["ms"]
                                                for p in ("loop", "vectorized")}
    for row in rows.values():
        assert row["median_ms"] > 0 and row["n"] == smoke["repeats"]
    assert res["jax"] == {"error": "not in the smoke run"}
    # the targets (m = 4 here; m = 2 has none), in the run's targets table
    (verdict,) = [v for v in res["verdicts"] if v["target"] is not None]
    assert verdict["m"] == 4 and verdict["target"] == 1.5
    assert verdict["ratio"] == rows[verdict["fastest_path"]]["ratio_to_batch_sam"]["median"]
    (target,) = [t for t in results["targets"] if "m-SAM" in t["target"]]
    assert target["target"] == ("torch m-SAM step, m=4, fastest path <= 1.5x batch-SAM step "
                                f"(WRN-10-1, batch {smoke['batch']}, CPU)")
    assert target["measured"] == f"{verdict['ratio']:.2f}x ({verdict['fastest_path']})"
    assert target["holds"] == (verdict["ratio"] <= 1.5)
    report = (out / "report.md").read_text()
    holds = "yes" if target["holds"] else "**no**"
    assert f"| {target['target']} | {target['measured']} † | {holds} |" in report
    assert "## 7. m-sharpness: cost of an m-SAM step\n\nWRN-10-1, batch 8" in report
    assert "### torch (cpu)" in report and "| m=4 vectorized |" in report
    assert "### jax\n\nnot measured: not in the smoke run" in report
    assert "### Targets (fastest path / batch-SAM step)" in report


def test_sizes_per_mode_and_the_main_jobs_keys() -> None:
    assert compare.Section("msharpness", "benchmarks.msharpness") in compare.SECTIONS
    assert compare._order_key(msharpness.TITLE)[0] == 7.0
    assert set(msharpness.ESTIMATE_S) == set(MODES)
    base = {"device": "cpu", "backends": ("torch",), "threads": 2, "repeats": None,
            "data_dir": None, "budget": None, "optimizers": ("sgd",), "out": Path(".")}
    cfgs = {m: msharpness._section_config({**base, "mode": m})[0] for m in MODES}
    # the full run is the issue's: WRN-16-2, batch 128, m in {4, 16, 32}, every figure
    full = cfgs["full"]
    assert (full["depth"], full["width"], full["batch"], full["ms"]) == (16, 2, 128, [4, 16, 32])
    assert full["memory"] and full["profile"] and sized({"mode": "full"}, msharpness.SIZES)["jax"]
    # the quick run keeps both targets' m, without the fresh-process memory or the profile
    quick = cfgs["quick"]
    assert set(msharpness.TARGETS) <= set(quick["ms"])
    assert not quick["memory"] and not quick["profile"]
    assert cfgs["smoke"]["repeats"] <= quick["repeats"] < full["repeats"]
    for cfg in cfgs.values():
        assert cfg["backends"] == ["torch"] and cfg["threads"] == 2
        assert all(cfg["batch"] % m == 0 for m in cfg["ms"])
    # --repeats overrides every mode; the smoke run leaves JAX out and says so
    over = msharpness._section_config({**base, "mode": "quick", "repeats": 7})[0]
    assert over["repeats"] == 7
    cfg, note = msharpness._section_config({**base, "mode": "smoke",
                                            "backends": ("torch", "jax")})
    assert cfg["backends"] == ["torch"] and note == "not in the smoke run"
    with pytest.raises(ValueError, match="config\\['mode'\\] must be one of"):
        msharpness._section_config({**base, "mode": "fast"})
