"""The label-noise study's cost fields: passes per step and the training time relative to
SGD's in the same invocation, and a form's own knobs (``k``, ``alpha``) in a run's identity."""

from __future__ import annotations

import json

import pytest

from benchmarks import label_noise as study
from tests.bench.test_label_noise_study import _run


def test_form_options_are_the_knobs_that_differ_from_the_forms_defaults():
    assert study.form_options("looksam", {"k": 5, "alpha": 0.7}) == {}
    assert study.form_options("looksam", {"k": 5, "alpha": 0.3}) == {"alpha": 0.3}
    assert study.form_options("everyk", {"k": 2, "alpha": 0.3}) == {"k": 2}  # no alpha there
    assert study.form_options("sam", {"k": 2}) == {}


def test_form_options_are_part_of_a_runs_identity_and_label():
    plain, tuned = _run(optimizer="looksam"), _run(optimizer="looksam", form_options={"alpha": 0.3})
    assert study.run_key(plain) != study.run_key(tuned)
    assert study.run_key(plain) == study.run_key(_run(optimizer="looksam", form_options={}))
    assert study._label(tuned) == "LookSAM (alpha=0.3)"
    assert not study.in_grid(tuned)
    rows = study.summarize([plain, tuned], "all")
    assert sorted(r["label"] for r in rows) == ["LookSAM", "LookSAM (alpha=0.3)"]


def test_wall_time_ratio_is_against_the_same_invocations_sgd():
    runs = [
        _run(optimizer="sgd", train_time_s=10.0, train_cpu_s=9.0, seed=0),
        _run(optimizer="sgd", train_time_s=12.0, train_cpu_s=9.5, seed=1),
        # one SGD run at a slow moment of the machine: the median of the three ignores it
        _run(optimizer="sgd", train_time_s=30.0, train_cpu_s=14.0, seed=2),
        _run(optimizer="sam", train_time_s=24.0, train_cpu_s=19.0),
        _run(optimizer="sam", backend="jax", train_time_s=30.0),  # no JAX SGD here
    ]
    study.wall_time_ratios(runs)
    assert [r.get("wall_time_ratio") for r in runs] == [
        pytest.approx(10 / 12, abs=1e-3), 1.0, 2.5, 2.0, None
    ]
    # the same of the CPU time the runs spent (the load on the machine does not move it)
    assert [r.get("cpu_time_ratio") for r in runs] == [
        pytest.approx(9 / 9.5, abs=1e-3), 1.0, pytest.approx(14 / 9.5, abs=1e-3), 2.0, None
    ]
    row = study.summarize(runs[3:4], "all")[0]
    assert row["wall_time_ratio"][0] == pytest.approx(2.0)


def test_tiny_study_records_passes_and_ratio(tmp_path, monkeypatch):
    # The sharpness measures (not asserted here) at a fraction of their cost: --jobs 1 runs
    # them in this process. tests/bench/test_label_noise_study.py checks what they record.
    monkeypatch.setattr(study, "MEASURES", {**study.MEASURES, "lanczos_iterations": 3,
                                            "trace_probes": 2, "ascent_steps": 2, "m": 640})
    out = tmp_path / "ln"
    argv = ["--dataset", "digits", "--optimizers", "sgd,looksam", "--seeds", "0",
            "--backends", "torch", "--set", "epochs=1,limit_train=320,alpha=0.3", "--jobs", "1",
            "--out", str(out)]
    study.main(argv, log=lambda _: None)
    runs = {r["optimizer"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert runs["sgd"]["passes_per_step"] == 1.0 and runs["sgd"]["wall_time_ratio"] == 1.0
    assert runs["sgd"]["cpu_time_ratio"] == 1.0 and runs["looksam"]["cpu_time_ratio"] > 0
    assert 0 < runs["looksam"]["train_cpu_s"]
    # 3 steps of 128: full steps at 0 only (k = 5)
    assert runs["looksam"]["passes_per_step"] == pytest.approx(4 / 3, abs=1e-4)
    assert runs["looksam"]["form_options"] == {"alpha": 0.3}
    assert runs["looksam"]["wall_time_ratio"] > 0
    assert "passes/step | time / SGD" in (out / "report.md").read_text()


def test_grid_takes_a_forms_knobs_from_the_dataset_settings():
    settings = study.DATASET_SETTINGS["digits"]
    grid_alpha = settings["form_options"]["looksam"]["alpha"]
    (plan,) = study.plan_runs(settings, [study.parse_optimizer("looksam")], [0], ["torch"])
    assert dict(plan.config)["alpha"] == grid_alpha
    # --set alpha=... wins over the grid's
    (swept,) = study.plan_runs(
        settings, [study.parse_optimizer("looksam")], [0], ["torch"], overrides={"alpha": 0.7}
    )
    assert dict(swept.config)["alpha"] == 0.7
    rho = settings["rho"]["looksam"]
    grid = _run(optimizer="looksam", rho=rho, form_options={"alpha": grid_alpha})
    assert study.in_grid(grid)
    assert not study.in_grid(_run(optimizer="looksam", rho=rho))  # the paper's alpha: a sweep run


def test_runs_go_seed_by_seed_and_each_recorded_run_gets_its_ratio_at_once(tmp_path, monkeypatch):
    """SGD, every ratio's baseline, runs spread over the invocation (every form's seed 0, then
    seed 1, ...), and results.json carries the ratios of what has run after every run, so an
    invocation stopped half-way keeps them."""
    out = tmp_path / "ln"
    seen: list[tuple[str, int, dict]] = []
    times = {"sgd": 10.0, "sam": 25.0, "looksam": 12.0}

    def fake_execute(spec, threads=1, *, measure=True):
        on_disk = study.load_results(out / "results.json")["runs"]
        seen.append((spec.optimizer.name, spec.seed,
                     {(r["optimizer"], r["seed"]): r.get("wall_time_ratio") for r in on_disk}))
        return _run(optimizer=spec.optimizer.name, seed=spec.seed, rho=spec.rho,
                    train_time_s=times[spec.optimizer.name] + spec.seed, wall_s=1.0,
                    form_options={}, epochs=40)

    monkeypatch.setattr(study, "execute", fake_execute)
    monkeypatch.setattr(study, "write_report", lambda results, out: None)
    study.main(["--dataset", "digits", "--optimizers", "sgd,sam,looksam", "--seeds", "0,1",
                "--backends", "torch", "--jobs", "1", "--out", str(out)], log=lambda _: None)
    assert [(name, seed) for name, seed, _ in seen] == [
        ("sgd", 0), ("sam", 0), ("looksam", 0), ("sgd", 1), ("sam", 1), ("looksam", 1)]
    # before SGD's seed 1 ran, seed 0's runs were on disk with ratios to SGD's seed 0
    assert seen[3][2] == {("sgd", 0): 1.0, ("sam", 0): 2.5, ("looksam", 0): 1.2}
    final = {(r["optimizer"], r["seed"]): r["wall_time_ratio"]
             for r in study.load_results(out / "results.json")["runs"]}
    assert final[("sam", 1)] == pytest.approx(26.0 / 10.5, abs=1e-3)  # against both SGD runs


def test_pass_rates_weight_each_epoch_by_its_steps() -> None:
    """Two epochs of 10 and 30 steps at 2.0 and 1.2 passes (ESAM-like 0.5 / 0 forwards): the
    run's rates are the step-weighted means, not the means of the epochs' rates."""
    history = [
        {"passes": 20, "passes_per_step": 2.0, "forwards_per_step": 0.5},
        {"passes": 36, "passes_per_step": 1.2},
    ]
    rates = study.pass_rates(history)
    assert rates["passes_per_step"] == pytest.approx((20 + 36) / 40)
    assert rates["forwards_per_step"] == pytest.approx((0.5 * 10) / 40)
