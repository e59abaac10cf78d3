"""Section 7 of the main job, m-sharpness cost: its sizes per mode and its place in the main
job. Its figures, report and targets in a whole smoke run of compare.py are checked in
tests/bench/test_smoke_job.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import compare, msharpness
from benchmarks._common import MODES, sized

ROOT = Path(__file__).resolve().parents[2]


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
