"""benchmarks/study_pace.py: the study's forms timed round-robin in one process."""

from __future__ import annotations

import pytest

from benchmarks import study_pace


def test_forms_are_timed_round_robin_with_their_grid_passes(tmp_path):
    out = tmp_path / "pace.md"
    result = study_pace.main(["--dataset", "digits", "--optimizers", "sgd,looksam",
                              "--epochs", "1", "--rounds", "2", "--out", str(out)])
    rows = result["rows"]
    assert list(rows) == ["sgd", "looksam"]
    assert rows["sgd"]["ratio_to_sgd"] == 1.0 and rows["sgd"]["passes_per_step"] == 1.0
    # the digits' grid: LookSAM k = 5 over 40 steps an epoch: 1 + 8 / 40 passes a step
    assert rows["looksam"]["passes_per_step"] == pytest.approx(1.2)
    assert all(r["epochs"] == 2 and r["median_epoch_s"] > 0 for r in rows.values())
    assert rows["looksam"]["ratio_to_sgd"] == pytest.approx(
        rows["looksam"]["median_epoch_s"] / rows["sgd"]["median_epoch_s"], abs=1e-3)
    text = out.read_text()
    assert "| LookSAM | 1.20 |" in text and str(tmp_path) not in text


def test_the_baseline_must_come_first():
    with pytest.raises(ValueError, match="must be sgd"):
        study_pace.measure("digits", ["sam", "sgd"], epochs=1, rounds=1)
