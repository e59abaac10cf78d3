"""benchmarks/label_noise.py ``--missing-measures``: the runs recorded before the sharpness
measures existed are rerun at their own recorded settings and replace their records."""

from __future__ import annotations

from benchmarks import label_noise as study
from tests.bench.test_label_noise_study import WARMUP, _run

MEASURED = {"lambda_max": 3.0, "hessian_trace": 40.0, "worst_sharpness": 0.1}
DIGITS = study.DATASET_SETTINGS["digits"]["config"]


def _old(**kw):
    """A record as the study wrote it before the measures and the rho ramp: its settings
    without ``rho_warmup_epochs``, no measure keys."""
    base = study.DATASET_SETTINGS[kw.get("dataset", "digits")]["config"]
    settings = {k: v for k, v in base.items() if k != "rho_warmup_epochs"}
    settings["label_noise"] = kw.get("label_noise", 0.4)
    kw.setdefault("epochs", base["epochs"])
    return _run(settings=settings, rho_warmup_epochs=kw.pop("rho_warmup_epochs", 0.0), **kw)


def test_plan_reruns_only_the_unmeasured_runs_with_their_own_keys_grid_first():
    grid_rho = study.DATASET_SETTINGS["digits"]["rho"]["sam"]
    runs = [
        _old(rho=0.05, seed=1),  # an old sweep rho without the ramp: not the grid's
        _old(rho=grid_rho, seed=2, rho_warmup_epochs=WARMUP),  # the grid's
        _old(optimizer="sgd", rho=0.0, seed=0, label_noise=0.2),
        _run(rho=grid_rho, seed=0, **MEASURED),  # measured: stays
        _old(optimizer="looksam", rho=0.1, seed=0, form_options={"alpha": 0.3},
             rho_warmup_epochs=WARMUP),
    ]
    plan = study.missing_measures_plan(runs)
    assert len(plan) == 4
    keys = [s.key() for s in plan]
    assert set(keys) == {study.run_key(r) for r in (runs[0], runs[1], runs[2], runs[4])}
    # the grid's runs first (seed by seed), then the others
    assert [study.in_grid(r) for r in (runs[2], runs[1], runs[4], runs[0])] == [
        True, True, True, False]
    assert keys == [study.run_key(r) for r in (runs[2], runs[4], runs[1], runs[0])]
    by_key = {s.key(): s for s in plan}
    old_sweep = dict(by_key[study.run_key(runs[0])].config)
    assert old_sweep["rho_warmup_epochs"] == 0.0  # the record's ramp, not today's setting
    assert old_sweep["lr"] == DIGITS["lr"] and old_sweep["epochs"] == DIGITS["epochs"]
    looksam = by_key[study.run_key(runs[4])]
    assert dict(looksam.config)["alpha"] == 0.3
    assert looksam.overrides()["alpha"] == 0.3 and looksam.overrides()["rho"] == 0.1
    assert by_key[study.run_key(runs[2])].overrides()["label_noise"] == 0.2


def test_plan_filters():
    runs = [_old(seed=0), _old(seed=1, backend="jax"), _old(seed=2, label_noise=0.6),
            _old(seed=3, m_sharpness=16), _old(seed=4, dataset="cifar10", n_train=1024)]

    def seeds(**kw):
        return sorted(s.seed for s in study.missing_measures_plan(runs, **kw))
    assert seeds() == [0, 1, 2, 3, 4]
    assert seeds(backends=["jax"]) == [1]
    assert seeds(noise_levels=[0.6]) == [2]
    assert seeds(optimizers=["sam/m16"]) == [3]
    assert seeds(datasets=["digits"], backends=["torch"], optimizers=["sam"]) == [0, 2]
    cifar = study.missing_measures_plan(runs, datasets=["cifar10"], data_dir="somewhere")
    assert dict(cifar[0].config)["data_dir"] == "somewhere"
    assert dict(cifar[0].config)["limit_train"] == 1024


def test_missing_measures_invocation_replaces_the_records(tmp_path, monkeypatch):
    out = tmp_path / "ln"
    old = [_old(optimizer="sgd", rho=0.0, seed=0, label_noise=0.2, train_time_s=5.0),
           _old(rho=0.2, seed=0, label_noise=0.2, rho_warmup_epochs=WARMUP, final_test_acc=0.5),
           _old(rho=0.2, seed=0, backend="jax", label_noise=0.2, rho_warmup_epochs=WARMUP),
           _run(rho=0.3, seed=1, final_test_acc=0.7, **MEASURED)]
    study.save_results(out / "results.json", {"runs": old, "invocations": []})
    ran = []

    def fake_execute(spec, threads=1, *, measure=True):
        ran.append((spec.backend, spec.optimizer.name, spec.seed))
        c = dict(spec.config)
        return _run(optimizer=spec.optimizer.name, seed=spec.seed, rho=spec.rho,
                    label_noise=c["label_noise"], rho_warmup_epochs=c["rho_warmup_epochs"],
                    train_time_s=10.0 if spec.optimizer.name == "sgd" else 18.0,
                    final_test_acc=0.9, wall_s=1.0, form_options={}, **MEASURED)

    monkeypatch.setattr(study, "execute", fake_execute)
    monkeypatch.setattr(study, "write_report", lambda results, out: None)
    study.main(["--dataset", "digits", "--backends", "torch", "--missing-measures", "--jobs", "1",
                "--out", str(out)], log=lambda _: None)
    assert sorted(ran) == [("torch", "sam", 0), ("torch", "sgd", 0)]  # not jax, not measured
    runs = study.load_results(out / "results.json")["runs"]
    assert len(runs) == 4  # replaced, not added
    by = {(r["backend"], r["optimizer"], r["seed"]): r for r in runs}
    assert by[("torch", "sam", 0)]["final_test_acc"] == 0.9
    assert by[("torch", "sam", 0)]["lambda_max"] == 3.0
    assert by[("torch", "sam", 0)]["wall_time_ratio"] == 1.8  # against the rerun SGD
    assert by[("jax", "sam", 0)].get("lambda_max") is None
    assert by[("torch", "sam", 1)]["final_test_acc"] == 0.7
