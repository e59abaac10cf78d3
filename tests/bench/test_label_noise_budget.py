"""The study's cost-against-accuracy outputs: the share of SAM's gain a form keeps, the
"which SAM for my budget" table, the cheap-form target and the Pareto plot."""

from __future__ import annotations

import pytest

from benchmarks import label_noise as study

RHO = study.DATASET_SETTINGS["digits"]["rho"]
WARM = study.DATASET_SETTINGS["digits"]["config"]["rho_warmup_epochs"]


def _runs(optimizer, accs, times, sgd_time=10.0, **kw):
    """One grid run per seed at the digits' settings, with ``train_time_s`` given."""
    rho = 0.0 if optimizer == "sgd" else RHO[optimizer]
    warm = 0.0 if optimizer in ("sgd", *study.NO_RHO_RAMP) else WARM
    return [
        {"dataset": "digits", "backend": "torch", "optimizer": optimizer, "m_sharpness": None,
         "seed": seed, "label_noise": 0.4, "rho": rho, "epochs": 40, "n_train": None,
         "final_test_acc": acc, "best_test_acc": acc, "noisy_fit": 0.1, "clean_fit": 0.9,
         "kind": "grid", "history": [], "rho_warmup_epochs": warm, "train_time_s": t,
         "passes_per_step": kw.get("passes", 1.0), **kw.get("extra", {})}
        for seed, (acc, t) in enumerate(zip(accs, times, strict=True))
    ]


def _rows(*, looksam_time=12.0):
    runs = (
        _runs("sgd", [0.70, 0.72, 0.74], [9.0, 10.0, 11.0])
        + _runs("sam", [0.94, 0.96, 0.98], [20.0, 20.0, 20.0], passes=2.0)
        + _runs("everyk", [0.80, 0.82, 0.84], [11.0, 11.0, 11.0], passes=1.2)
        + _runs("looksam", [0.90, 0.92, 0.94], [looksam_time] * 3, passes=1.2,
                extra={"form_options": {"alpha": 0.3}})
    )
    study.wall_time_ratios(runs)
    return study.summarize(runs, "grid")


def test_gain_share_is_the_fraction_of_sams_gain_over_sgd():
    rows = {r["optimizer"]: r for r in _rows()}
    # SGD 72, SAM 96, LookSAM 92: (92 - 72) / (96 - 72)
    assert study.gain_share(rows["looksam"], rows["sgd"], rows["sam"]) == pytest.approx(20 / 24)
    assert study.gain_share(rows["sam"], rows["sgd"], rows["sam"]) == pytest.approx(1.0)
    assert study.gain_share(rows["sgd"], rows["sgd"], rows["sam"]) == pytest.approx(0.0)
    # SAM gaining nothing: no share
    assert study.gain_share(rows["looksam"], rows["sgd"], rows["sgd"]) is None


def test_budget_table_picks_the_best_form_within_each_budget():
    lines = study.budget_lines(_rows())
    body = {line.split("|")[4].strip(): line for line in lines[2:]}
    assert set(body) == {"<= 1.1", "<= 1.3", "<= 1.6", "<= 2.2", "any"}
    assert "| every-k SAM |" in body["<= 1.1"] and "42 %" in body["<= 1.1"]  # (82-72)/24
    assert "| LookSAM (alpha=0.3) |" in body["<= 1.3"] and "83 %" in body["<= 1.3"]
    assert "| SAM |" in body["<= 2.2"] and "| SAM |" in body["any"] and "100 %" in body["any"]
    assert "1.20 | 1.20 ± 0.00" in body["<= 1.3"]  # passes/step, then time / SGD (12 / 10)


def test_cheap_form_target_passes_and_misses_on_the_ratio():
    (line,) = study.cheap_form_targets(_rows())
    assert "LookSAM (alpha=0.3) at 1.20x" in line and "83 %" in line and line.endswith("PASS")
    (line,) = study.cheap_form_targets(_rows(looksam_time=14.0))  # 1.4x: out of the budget
    assert "every-k SAM at 1.10x" in line and "42 %" in line and line.endswith("MISS")


def test_pareto_plot_is_written_per_dataset(tmp_path):
    assert study.plot_pareto(_rows(), tmp_path) == ["pareto-digits.png"]
    assert (tmp_path / "pareto-digits.png").stat().st_size > 10_000


def test_report_has_the_budget_table_the_plot_and_the_target(tmp_path):
    runs = []
    for name, accs, times in (("sgd", [0.7, 0.72], [10.0, 10.0]),
                              ("sam", [0.95, 0.97], [21.0, 19.0])):
        runs += _runs(name, accs, times)
    study.wall_time_ratios(runs)
    for r in runs:
        r["settings"] = {"epochs": 40, "lr": 0.05}
    text = study.write_report({"runs": runs, "invocations": []}, tmp_path)
    assert "## Which SAM for my budget" in text and "![accuracy against cost](pareto-digits.png)" in text
    assert "digits, 40 % noise, torch: no form measured at <= 1.3x SGD's time: MISS" in text
