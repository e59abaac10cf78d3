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


def test_skip_epochs_and_set_time_the_epochs_with_the_trajectory_term(tmp_path):
    """SAF's term starts after ``saf_start_epoch``: with it at 0 (lag 1) and the first epoch
    not timed, every timed SAF epoch carries the term; the report names both settings."""
    out = tmp_path / "pace.md"
    result = study_pace.main(["--dataset", "digits", "--optimizers", "sgd,saf", "--epochs", "2",
                              "--rounds", "2", "--skip-epochs", "1", "--set",
                              "saf_start_epoch=0,saf_lag_epochs=1", "--out", str(out)])
    assert result["skip_epochs"] == 1
    assert result["overrides"] == {"saf_start_epoch": 0, "saf_lag_epochs": 1}
    rows = result["rows"]
    assert all(r["epochs"] == 2 for r in rows.values())  # 1 timed epoch x 2 rounds
    assert rows["saf"]["term_epochs"] == 2 and rows["sgd"]["term_epochs"] == 0
    text = out.read_text()
    assert "`saf_lag_epochs=1`, `saf_start_epoch=0`" in text
    assert "first 1 epoch(s) not timed" in text
    assert "Timed epochs with the trajectory term on: SAF 2 of 2." in text
    assert "--skip-epochs 1 --set saf_start_epoch=0,saf_lag_epochs=1" in text
    with pytest.raises(ValueError, match="skip_epochs must be in"):
        study_pace.measure("digits", ["sgd"], epochs=1, rounds=1, skip_epochs=1)
