"""benchmarks/label_noise.py: optimizer specs, the run plan, merging invocations into one
results.json (skip or replace), the summary statistics and the report of a tiny real run."""

from __future__ import annotations

import json
import statistics

import pytest

from benchmarks import label_noise as study


def _run(**kw):
    base = {
        "dataset": "digits", "backend": "torch", "optimizer": "sam", "m_sharpness": None,
        "seed": 0, "label_noise": 0.4, "rho": 0.05, "epochs": 40, "n_train": None,
        "final_test_acc": 0.8, "best_test_acc": 0.9, "noisy_fit": 0.3, "clean_fit": 0.99,
        "kind": "grid", "history": [], "rho_warmup_epochs": WARMUP,
    }
    return {**base, **kw}


WARMUP = study.DATASET_SETTINGS["digits"]["config"].get("rho_warmup_epochs", 0.0)


def test_parse_optimizer():
    assert study.parse_optimizer("sam") == study.OptimizerSpec("sam")
    spec = study.parse_optimizer("sam/m16")
    assert (spec.name, spec.m, spec.label, spec.display) == ("sam", 16, "sam/m16",
                                                             "m-SAM (m=16)")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        study.parse_optimizer("adam")
    with pytest.raises(ValueError, match="'/m' and a positive integer"):
        study.parse_optimizer("sam/16")
    with pytest.raises(ValueError, match="SAM-family"):
        study.parse_optimizer("sgd/m4")


def test_merge_replaces_same_key_and_keeps_others():
    a = _run(seed=0, final_test_acc=0.7)
    b = _run(seed=1)
    sgd = _run(optimizer="sgd", rho=0.05)
    merged = study.merge_runs([a, b, sgd], [_run(seed=0, final_test_acc=0.75),
                                             _run(optimizer="sgd", rho=0.0, seed=0)])
    assert len(merged) == 3  # seed 0 replaced; SGD's rho is not part of its key
    assert {r["final_test_acc"] for r in merged if r["seed"] == 0 and r["optimizer"] == "sam"} \
        == {0.75}
    assert study.run_key(_run(m_sharpness=16)) != study.run_key(_run())
    assert study.run_key(_run(backend="jax")) != study.run_key(_run())
    assert study.run_key(_run(epochs=2)) != study.run_key(_run())


def test_rho_warmup_is_part_of_a_runs_identity_and_of_the_grid():
    assert study.run_key(_run(rho_warmup_epochs=5.0)) != study.run_key(_run(rho_warmup_epochs=0))
    legacy = _run(rho_warmup_epochs=0.0)
    del legacy["rho_warmup_epochs"]  # records written before the field: no warm-up
    assert study.run_key(legacy) == study.run_key(_run(rho_warmup_epochs=0.0))
    # SGD has no rho: its warm-up never splits its runs
    assert study.run_key(_run(optimizer="sgd", rho_warmup_epochs=5.0)) == study.run_key(
        _run(optimizer="sgd", rho_warmup_epochs=0.0))
    chosen = study.DATASET_SETTINGS["digits"]["rho"]["sam"]
    assert study.in_grid(_run(rho=chosen))
    assert not study.in_grid(_run(rho=chosen, rho_warmup_epochs=WARMUP + 1.0))
    # the plan passes the warm-up to the SAM forms only (--rho-warmup-epochs rejects sgd)
    settings = {**study.DATASET_SETTINGS["digits"]}
    settings["config"] = {**settings["config"], "rho_warmup_epochs": 2.0}
    opts = [study.parse_optimizer(o) for o in ("sgd", "sam")]
    sgd, sam = study.plan_runs(settings, opts, [0], ["torch"])
    assert "rho_warmup_epochs" not in sgd.overrides()
    assert sam.overrides()["rho_warmup_epochs"] == 2.0
    assert sam.key() != study.plan_runs(
        study.DATASET_SETTINGS["digits"], opts[1:], [0], ["torch"]
    )[0].key() or WARMUP == 2.0


def test_plan_grid_and_sweep():
    settings = study.DATASET_SETTINGS["digits"]
    opts = [study.parse_optimizer(o) for o in ("sgd", "sam", "sam/m16")]
    plan = study.plan_runs(settings, opts, [0, 1], ["torch", "jax"])
    assert len(plan) == 3 * 2 * 2
    assert {(r.optimizer.label, r.rho) for r in plan} == {
        ("sgd", 0.0), ("sam", settings["rho"]["sam"]), ("sam/m16", settings["rho"]["sam/m"])}
    assert all(dict(r.config)["label_noise"] == 0.4 for r in plan)
    sweep = study.plan_runs(settings, opts[1:2], [0], ["torch"], sweep=True)
    assert [r.rho for r in sweep] == list(settings["sweep"]["sam"])
    assert {r.kind for r in sweep} == {"sweep"}
    noisy = study.plan_runs(study.PRESETS["foret-table4"], opts[:1], [0], ["torch"])
    assert [dict(r.config)["label_noise"] for r in noisy] == [0.2, 0.4, 0.6, 0.8]
    assert dict(noisy[0].config)["width"] == 8 and dict(noisy[0].config)["epochs"] == 200


def test_summary_is_mean_and_sample_std_over_seeds():
    chosen = study.DATASET_SETTINGS["digits"]["rho"]["sam"]
    # Runs at the dataset's chosen rho form the grid, whichever invocation made them.
    runs = [_run(seed=s, final_test_acc=v, rho=chosen, kind="sweep" if s == 2 else "grid")
            for s, v in enumerate((0.80, 0.84, 0.86))]
    runs += [_run(optimizer="sgd", rho=0.0, seed=s, final_test_acc=v)
             for s, v in enumerate((0.74, 0.75, 0.76))]
    runs.append(_run(seed=0, rho=chosen / 2, kind="grid", final_test_acc=0.5))
    assert not study.in_grid(runs[-1]) and study.in_grid(runs[2])
    # Other settings than the dataset's (a preset, --set): the planned kind decides.
    assert study.in_grid(_run(epochs=2, rho=0.01)) and not study.in_grid(
        _run(epochs=2, kind="sweep"))
    rows = study.summarize(runs)
    assert [r["label"] for r in rows] == ["SGD", "SAM"]  # the other rho is not in the grid
    assert len(study.summarize(runs, "all")) == 3
    mean, std = rows[1]["final_test_acc"]
    assert mean == pytest.approx(statistics.fmean([0.80, 0.84, 0.86]))
    assert std == pytest.approx(statistics.stdev([0.80, 0.84, 0.86]))
    lines = study.check_targets(rows)  # SAM 83.3 vs SGD 75.0
    assert lines == ["- digits, 40 % noise, torch (3 seeds): SAM 83.3 >= SGD 75.0 + 5: PASS"]


def test_tiny_study_writes_results_report_and_merges(tmp_path, monkeypatch):
    # The sharpness measures at a fraction of their cost (--jobs 1 runs in this process).
    monkeypatch.setattr(study, "MEASURES", {**study.MEASURES, "lanczos_iterations": 3,
                                            "trace_probes": 2, "ascent_steps": 2, "m": 100})
    # ... on the first 200 of the 1,280 training images (CIFAR-10's runs use their first 256)
    monkeypatch.setattr(study, "MEASURE_EXAMPLES", {"digits": 200})
    out = tmp_path / "ln"
    argv = ["--dataset", "digits", "--optimizers", "sgd,sam", "--seeds", "0",
            "--backends", "torch", "--set", "epochs=1", "--jobs", "1", "--out", str(out)]
    logs: list[str] = []
    results = study.main(argv, log=logs.append)
    assert len(results["runs"]) == 2
    saved = json.loads((out / "results.json").read_text())
    run = next(r for r in saved["runs"] if r["optimizer"] == "sam")
    for key in ("dataset", "backend", "optimizer", "m_sharpness", "seed", "label_noise", "rho",
                "final_test_acc", "best_test_acc", "noisy_fit", "clean_fit", "history"):
        assert key in run
    rho = study.DATASET_SETTINGS["digits"]["rho"]["sam"]
    assert run["rho"] == rho and run["label_noise"] == 0.4 and len(run["history"]) == 1
    assert 0 <= run["final_test_acc"] <= 1 and run["final_test_acc"] == run["history"][0][
        "test_acc"]
    inv = saved["invocations"][0]
    assert inv["command"].startswith("python -m benchmarks.label_noise --dataset digits")
    assert str(tmp_path) not in inv["command"] and inv["hardware"]["logical_cpus"] >= 1
    report = (out / "report.md").read_text()
    rho_text = f"{rho:g}" + (f", warm-up {WARMUP:g} ep" if WARMUP else "")
    assert run["rho_warmup_epochs"] == WARMUP
    assert f"| 40 % | torch | SAM | {rho_text} | 1 |" in report and (out / "curves-digits.png").is_file()
    assert "## Targets" in report and str(tmp_path) not in report
    # Issue 27: every run carries the sharpness measures of its final model, and the report
    # shows them beside test accuracy.
    for r in saved["runs"]:
        assert r["lambda_max"] > 0 and r["hessian_trace_se"] >= 0
        assert all(isinstance(r[k], float) for k in study.MEASURE_KEYS)
        assert len(r["landscape"]["alphas"]) == len(r["landscape"]["loss"]) == 11
        assert abs(r["landscape"]["loss"][5] - r["clean_train_loss"]) < 1e-4
        assert r["measures"]["examples"] == 200 and r["measures"]["m"] == 100
    assert "## Sharpness of the final models" in report
    assert "| digits | 40 % | torch | SAM | 1 |" in report
    # A second invocation skips what is there; --replace reruns it.
    study.main(argv, log=logs.append)
    assert "2 already in results.json, 0 to run" in logs[-1] or any(
        "2 already in results.json, 0 to run" in line for line in logs)
    assert len(json.loads((out / "results.json").read_text())["invocations"]) == 1
    study.main([*argv, "--optimizers", "sgd", "--replace"], log=logs.append)
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["runs"]) == 2 and len(saved["invocations"]) == 2


def test_concurrent_invocations_keep_each_others_runs(tmp_path):
    """Two invocations writing the same results.json: each merge re-reads the file."""
    path = tmp_path / "results.json"
    first = {"id": "a", "command": "x", "runs_done": 1}
    second = {"id": "b", "command": "y", "runs_done": 1}
    study.update_results(path, [_run(seed=0)], first)
    study.update_results(path, [_run(seed=1, backend="jax")], second)
    first["runs_done"] = 2
    merged = study.update_results(path, [_run(seed=2)], first)
    assert sorted((r["backend"], r["seed"]) for r in merged["runs"]) == [
        ("jax", 1), ("torch", 0), ("torch", 2)]
    assert [(i["id"], i["runs_done"]) for i in merged["invocations"]] == [("b", 1), ("a", 2)]
    assert json.loads(path.read_text()) == merged
    assert list(tmp_path.iterdir()) == [path]  # no lock file beside the results


def test_rho_per_noise_level_and_override():
    settings = {**study.DATASET_SETTINGS["digits"], "rho": {"sam": 0.2},
                "rho_by_noise": {0.6: {"sam": 0.1}}}
    assert study.rho_for(settings, "sam", 0.4) == 0.2
    assert study.rho_for(settings, "sam", 0.6) == 0.1
    assert study.rho_for(settings, "asam", 0.4) is None
    assert study.rho_for({**settings, "rho_override": {"sam": 0.3}}, "sam", 0.6) == 0.3
    plan = study.plan_runs(settings, [study.parse_optimizer("sam")], [0], ["torch"],
                           noise_levels=[0.4, 0.6])
    assert [(dict(r.config)["label_noise"], r.rho) for r in plan] == [(0.4, 0.2), (0.6, 0.1)]
    # the grid of each level is its own rho
    real = study.DATASET_SETTINGS["digits"]
    for noise, table in real.get("rho_by_noise", {}).items():
        for key, rho in table.items():
            m = 16 if key == "sam/m" else None
            name = "sam" if key == "sam/m" else key
            assert study.in_grid(_run(optimizer=name, m_sharpness=m, rho=rho, label_noise=noise))
