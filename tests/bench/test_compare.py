"""The main job (``benchmarks/compare.py``, the ``benchmarks`` package): its command line,
output folders and section registry, and the pieces whose numbers it reports. Its whole smoke
runs, in a fresh interpreter as users run it, are checked in tests/bench/test_smoke_job.py
(with :func:`run_compare` and :func:`write_fake_cifar10` from here).
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import accuracy, compare, memory, overhead, report
from benchmarks._common import MODES, sized
from benchmarks._progress import Progress
from benchmarks._timing import (
    interleaved_times,
    machine_info,
    paired_ratio,
    peak_rss_bytes,
    summarize,
)

ROOT = Path(__file__).resolve().parents[2]


def write_fake_cifar10(root: Path, n_train: int = 200, n_test: int = 50) -> Path:
    """Tiny ``cifar-10-batches-py/`` (5 train batches + test batch, Python pickles)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    sizes = [n_train // 5] * 5 + [n_test]
    for name, n in zip(names, sizes, strict=True):
        entry = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return root


def run_compare(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _fake_history(config: types.SimpleNamespace, noisy: bool) -> list[dict[str, float]]:
    """What the examples' ``train`` returns, with numbers that depend on the optimizer."""
    acc = {"sgd": 0.5, "sam": 0.7}.get(config.optimizer, 0.6) + (0.1 if config.m_sharpness
                                                                  else 0.0)
    fit = {"noisy_fit": 0.3, "clean_fit": 0.9} if noisy else {"noisy_fit": None,
                                                             "clean_fit": None}
    return [{"epoch": e + 1, "train_loss": 2.0, "test_loss": 1.0 / (e + 1), "test_acc": acc,
             "passes": 10, "passes_per_step": 1.0, "epoch_time_s": 1.0, **fit}
            for e in range(config.epochs)]


def test_no_cifar_runs_the_digits_through_the_examples_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CIFAR-10 the section trains SGD, SAM and m-SAM on the noisy digits in the
    label-noise study's settings, each run one call of the examples' ``train_model``, without
    the study's sharpness measures (the quick job's budget)."""
    from benchmarks.label_noise import DATASET_SETTINGS
    from examples import train_jax, train_torch

    calls: list[tuple[str, types.SimpleNamespace]] = []

    def fake(backend: str) -> object:
        def train_model(config: types.SimpleNamespace, progress: object = None) -> tuple:
            calls.append((backend, config))
            return _fake_history(config, noisy=True), None  # no model: nothing is measured
        return train_model

    monkeypatch.setattr(train_torch, "train_model", fake("torch"))
    monkeypatch.setattr(train_jax, "train_model", fake("jax"))
    missing = tmp_path / "nothing-here"
    # threads=None: the study's runner leaves the process's thread settings alone
    res = accuracy.run(compare.section_config(mode="quick", data_dir=str(missing),
                                              threads=None), Progress(enabled=False))
    assert res["dataset"] == "digits"
    assert "--data-dir FOLDER" in res["why"] and "the folder given by --data-dir" in res["why"]
    assert str(missing) not in json.dumps(res)  # the report names no folder of the machine
    study = DATASET_SETTINGS["digits"]
    seeds, epochs = accuracy.DIGITS_RUNS["quick"]
    assert [(b, c.optimizer, c.m_sharpness, c.rho) for b, c in calls] == [
        (b, opt, m, rho) for b in ("torch", "jax")
        for opt, m, rho in (("sgd", None, 0.0), ("sam", None, study["rho"]["sam"]),
                            ("sam", 16, study["rho"]["sam/m"]))]
    for _, c in calls:
        assert c.epochs == epochs and c.seed == seeds[0]
        for key, value in study["config"].items():
            if key == "rho_warmup_epochs" and c.optimizer == "sgd":
                assert c.rho_warmup_epochs == 0.0  # SGD has no rho to ramp
            elif key != "epochs":
                assert getattr(c, key) == value, key
    assert set(res["runs"]) == {f"{b} {o}" for b in ("torch", "jax")
                                for o in ("SGD", "SAM", "m-SAM (m=16)")}
    for run in res["runs"].values():
        assert len(run["history"]) == epochs and run["seconds"] >= 0
    rows = {(r["backend"], r["label"]): r for r in res["summary"]}
    assert rows[("jax", "m-SAM (m=16)")]["final_test_acc"] == pytest.approx((0.8, 0.0))
    assert rows[("torch", "SGD")]["noisy_fit"] == pytest.approx((0.3, 0.0))
    text = "\n".join(accuracy.report(res))
    assert "digits with 40 % symmetric label noise" in text and "CIFAR-10 not found" in text
    assert f"{epochs} epochs (the study runs {study['config']['epochs']}" in text
    assert "| torch | m-SAM (m=16) | 80.0 | 80.0 | 30.0 |" in text
    assert accuracy.targets(res) == []  # the targets hold for the study's epochs only
    full = dict(res, settings=dict(res["settings"], epochs=study["config"]["epochs"]))
    assert ("digits, 40 % noise, torch: SAM >= SGD + 5 points", "70.0 vs 50.0", True) in (
        accuracy.targets(full))
    assert ("digits, 40 % noise, jax: m-SAM (m=16) >= SAM", "80.0 vs 70.0", True) in (
        accuracy.targets(full))


def test_smoke_digits_run_trains_for_real() -> None:
    """One real smoke run of the digits path (torch): SAM and m-SAM differ from SGD."""
    res = accuracy.run(compare.section_config(backends=("torch",), data_dir="/nonexistent",
                                              threads=None), Progress(enabled=False))
    assert res["dataset"] == "digits" and res["backends"] == ["torch"]
    assert set(res["runs"]) == {"torch SGD", "torch SAM", "torch m-SAM (m=16)"}
    finals = {}
    for name, run in res["runs"].items():
        assert [h["epoch"] for h in run["history"]] == [1, 2]
        h = run["history"][-1]
        assert 0.0 <= h["test_acc"] <= 1.0 and 0.0 <= h["noisy_fit"] <= 1.0
        finals[name] = h["test_loss"]
    assert len(set(finals.values())) == 3
    # the records are the label-noise study's: the same fields as its results.json
    assert {"final_test_acc", "noisy_fit", "rho", "m_sharpness", "wall_s"} <= set(
        res["records"][0])


def test_cifar_runs_go_through_the_examples_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With CIFAR-10 each run is one call of the examples' training function of its backend,
    in the section's hyperparameters, and the landscape uses the trained torch models."""
    from benchmarks._common import ASAM_RHO, LR, MOMENTUM, RHO, WEIGHT_DECAY
    from examples import train_jax, train_torch

    data = write_fake_cifar10(tmp_path / "data")
    calls: list[tuple[str, types.SimpleNamespace]] = []
    models = []

    def fake_torch(config: types.SimpleNamespace, progress: object = None) -> tuple:
        calls.append(("torch", config))
        torch.manual_seed(len(calls))
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(),
                                    torch.nn.Linear(2 * 30 * 30, 10))
        models.append(model)
        return _fake_history(config, noisy=False), model

    def fake_jax(config: types.SimpleNamespace, progress: object = None) -> list[dict]:
        calls.append(("jax", config))
        return _fake_history(config, noisy=False)

    monkeypatch.setattr(train_torch, "train_model", fake_torch)
    monkeypatch.setattr(train_jax, "train", fake_jax)
    budget = accuracy.BUDGETS["smoke"]
    res = accuracy.run(compare.section_config(data_dir=str(data), optimizers=(
        "sgd", "sam", "asam", "looksam")), Progress(enabled=False))
    assert [(b, c.optimizer) for b, c in calls] == [
        ("torch", "sgd"), ("torch", "sam"), ("torch", "asam"), ("torch", "looksam"),
        ("jax", "sgd"), ("jax", "sam"), ("jax", "asam")]
    for _, c in calls:
        assert (c.dataset, c.data_dir, c.lr, c.momentum, c.weight_decay) == (
            "cifar10", str(data), LR, MOMENTUM, WEIGHT_DECAY)
        assert (c.schedule, c.label_smoothing, c.seed, c.out) == ("cosine", 0.0, 0, None)
        assert (c.depth, c.width, c.epochs, c.batch_size, c.limit_train, c.limit_test) == (
            budget.depth, budget.width, budget.epochs, budget.batch, budget.subset,
            budget.test_subset)
        assert c.rho == {"asam": ASAM_RHO}.get(c.optimizer, RHO)
    assert res["dataset"] == "cifar10"
    assert set(res["runs"]) == {"torch SGD", "torch SAM", "torch ASAM", "torch looksam",
                                "jax SGD", "jax SAM", "jax ASAM"}
    assert res["runs"]["jax SAM"]["history"][-1]["test_acc"] == pytest.approx(0.7)
    # the landscape of the SGD and SAM solutions: at alpha = 0, their own training loss
    from examples import data as data_mod

    alphas = res["landscape"]["alphas"]
    probe = data_mod.load_training_data(accuracy.cifar_config("SGD", budget, str(data))).train
    n = res["landscape"]["probe_images"]
    assert n == 128 and alphas == [-1.0, -0.5, 0.0, 0.5, 1.0]  # the smoke run's
    probe = data_mod.Split(probe.images[:n], probe.labels[:n])
    (xb, yb), = data_mod.batches(probe, 500)  # the probe as the section feeds it, one batch
    x, y = torch.from_numpy(data_mod.to_nchw(xb)), torch.from_numpy(yb)
    for kind, model in (("SGD", models[0]), ("SAM", models[1])):
        with torch.no_grad():  # the model's own training loss, eval mode, whole probe at once
            expected = float(torch.nn.functional.cross_entropy(model.eval()(x), y))
        assert res["landscape"]["train_loss"][kind][alphas.index(0.0)] == pytest.approx(
            expected, rel=1e-6)
    text = "\n".join(accuracy.report(res))
    assert "examples.train_torch.train_model" in text and "| jax SAM | 0.7000 |" in text


def test_the_accuracy_section_keeps_no_training_loop() -> None:
    source = inspect.getsource(accuracy)
    for loop_marker in (".backward(", "first_step", "second_step", "optax.apply_updates",
                        "value_and_grad"):
        assert loop_marker not in source


def test_budget_presets_and_pairs() -> None:
    assert accuracy.parse_budget("smoke") == accuracy.BUDGETS["smoke"]
    b = accuracy.parse_budget("epochs=3,width=1,subset=500")
    assert (b.epochs, b.width, b.subset) == (3, 1, 500)
    assert b.depth == accuracy.BUDGETS["default"].depth
    for bad in ("fast", "epochs=0", "epochs=two", "colour=3"):
        with pytest.raises(Exception, match="--budget"):
            accuracy.parse_budget(bad)
    # each run mode's budget when --budget is not given: the full run keeps the default
    assert {m: accuracy.MODE_BUDGET[m] for m in MODES} == {
        "smoke": "smoke", "quick": "quick", "full": "default"}


@pytest.mark.parametrize("adaptive", [False, True])
def test_loop_baseline_is_the_popular_wrappers_algorithm(adaptive: bool) -> None:
    """The baseline perturbs to w + rho * T^2 g / ||T g|| with T = |w| (ASAM) or 1."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_()
              for s in [(3, 4), (5,), (2, 3, 3)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    w = [p.detach().numpy().copy() for p in params]
    g = [p.grad.numpy().copy() for p in params]
    t = [np.abs(x) if adaptive else np.ones_like(x) for x in w]
    norm = np.sqrt(sum(np.sum((ti * gi) ** 2) for ti, gi in zip(t, g, strict=True)))
    expected = [x + 0.3 * ti**2 * gi / (norm + 1e-12) for x, ti, gi in zip(w, t, g, strict=True)]
    opt = overhead.LoopSAM(params, torch.optim.SGD, rho=0.3, adaptive=adaptive, lr=0.1)
    opt.first_step()
    for p, e in zip(params, expected, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-12)
    opt.second_step()  # restores w, then plain SGD with the (unchanged) gradient
    for p, x, gi in zip(params, w, g, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), x - 0.1 * gi, rtol=1e-12)


def test_held_bytes_counts_distinct_state_storages() -> None:
    params = [torch.zeros(10, requires_grad=True), torch.zeros(3, 4, requires_grad=True)]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    assert memory._held_bytes(opt, memory._param_ptrs(params)) == 0
    opt.step()
    assert memory._held_bytes(opt, memory._param_ptrs(params)) == 22 * 4  # momentum


def test_filter_normalized_landscape_restores_weights() -> None:
    from examples import data

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 30 * 30, 10))
    before = [p.detach().clone() for p in model.parameters()]
    rng = np.random.default_rng(0)
    split = data.Split(rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
                       rng.integers(0, 10, 20))
    losses = accuracy.loss_landscape(model, split, data, np.array([-1.0, 0.0, 1.0]))
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    x = torch.from_numpy(data.to_nchw(data.normalize(split.images)))
    with torch.no_grad():
        clean = torch.nn.functional.cross_entropy(model(x), torch.from_numpy(split.labels))
    assert losses[1] == pytest.approx(float(clean), rel=1e-6)
    assert losses[0] != pytest.approx(losses[1])


def test_interleaved_times_calls_each_function_warmup_plus_repeats() -> None:
    calls = {"a": 0, "b": 0}

    def make(name: str):
        def f() -> None:
            calls[name] += 1
        return f

    rounds = []
    times = interleaved_times({"a": make("a"), "b": make("b")}, repeats=5, warmup=2,
                              on_round=lambda: rounds.append(dict(calls)))
    assert calls == {"a": 7, "b": 7}
    # the progress callback runs once per round, warmup included, after both calls
    assert rounds == [{"a": i, "b": i} for i in range(1, 8)]
    assert {k: len(v) for k, v in times.items()} == {"a": 5, "b": 5}
    s = summarize([0.001, 0.003, 0.002])
    assert s["median_ms"] == pytest.approx(2.0) and s["min_ms"] == pytest.approx(1.0)


def test_paired_ratio_cancels_a_drift_that_the_ratio_of_medians_keeps() -> None:
    # b is 2% faster than a in every round, under a load that drifts from 1x to 3x
    load = np.linspace(1.0, 3.0, 21)
    b = list(0.010 * load)
    a = list(0.0102 * load)
    pr = paired_ratio(a, b)
    assert pr["median"] == pytest.approx(1.02, rel=1e-12)
    assert pr["ci95_low"] == pytest.approx(1.02, rel=1e-12) == pr["ci95_high"]
    assert pr["n"] == 21
    # independent noise: the interval brackets the median and is deterministic
    rng = np.random.default_rng(3)
    a = list(0.01 * (1 + 0.05 * rng.standard_normal(15)))
    b = list(0.01 * (1 + 0.05 * rng.standard_normal(15)))
    pr = paired_ratio(a, b)
    r = np.asarray(a) / np.asarray(b)
    assert pr["median"] == pytest.approx(float(np.median(r)), rel=1e-15)
    assert pr["ci95_low"] <= pr["median"] <= pr["ci95_high"]
    assert pr["ci95_low"] < pr["ci95_high"]
    assert paired_ratio(a, b) == pr
    with pytest.raises(ValueError, match="equal, non-empty lists, got 2 and 1"):
        paired_ratio([1.0, 2.0], [1.0])


def test_asam_perturbation_before_and_after_match_the_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    """w + rho T^2 g / (||T g|| + eps), T = |w| + eta, in float64, blocks cutting and grouping tensors."""
    import sam_torch._sam as sam_impl

    monkeypatch.setattr(sam_impl, "_CPU_BLOCK", 4)
    gen = torch.Generator().manual_seed(3)
    shapes = [(7, 5), (3,), (1,), (4, 2, 3)]
    ws = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    gs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    t = [np.abs(w.numpy()) + 0.01 for w in ws]
    norm = np.sqrt(sum(np.sum((ti * g.numpy()) ** 2) for ti, g in zip(t, gs, strict=True)))
    for fn in (overhead.asam_perturb_per_tensor, overhead.asam_perturb_blocked,
               overhead.asam_perturb_floor):
        got = fn(ws, gs, [torch.empty_like(w) for w in ws], 0.5, 0.01, 1e-12)
        for w, g, ti, o in zip(ws, gs, t, got, strict=True):
            expected = w.numpy() + 0.5 * ti**2 * g.numpy() / (norm + 1e-12)
            np.testing.assert_allclose(o.numpy(), expected, rtol=1e-13)


def test_unknown_optimizer_is_refused_with_the_choices() -> None:
    with pytest.raises(SystemExit):
        compare.build_parser().parse_args(["--optimizers", "adamw"])


# --------------------------------------------------------------------------------------
# output folders, registry, run modes, report
# --------------------------------------------------------------------------------------
def _tracked_results() -> dict[str, bytes]:
    folder = ROOT / "benchmarks" / "results"
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_run_without_out_writes_a_new_folder_under_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(compare, "_ROOT", tmp_path)  # runs/ of a stand-in clone
    before = _tracked_results()
    args = ["--smoke", "--sections", "memory", "--backends", "torch", "--no-progress"]
    first = compare.main(args)
    second = compare.main(args)
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all(f.name.startswith("compare-") for f in folders)
    for folder in folders:
        assert {"report.md", "results.json"} <= {p.name for p in folder.iterdir()}
    assert first["out"] == f"runs/{folders[0].name}" and second["out"] == f"runs/{folders[1].name}"
    printed = capsys.readouterr().out
    assert printed.count("report: ") == 2 and folders[1].name in printed
    assert _tracked_results() == before  # the committed results are left alone


def test_run_folders_never_collide(tmp_path: Path) -> None:
    now = 1_700_000_000.0
    a = compare.new_run_folder(tmp_path, now)
    b = compare.new_run_folder(tmp_path, now)
    c = compare.new_run_folder(tmp_path, now)
    assert a.name.startswith("compare-") and len(a.name) == len("compare-YYYYmmdd-HHMMSS")
    assert (b.name, c.name) == (a.name + "-2", a.name + "-3")
    assert all(f.is_dir() and not any(f.iterdir()) for f in (a, b, c))


def test_out_is_honoured_and_a_run_without_targets_says_so(tmp_path: Path) -> None:
    out = tmp_path / "given"
    returned = compare.main(["--smoke", "--sections", "memory", "--backends", "torch",
                             "--out", str(out), "--no-progress"])
    results = json.loads((out / "results.json").read_text())
    assert results["out"] == returned["out"] == "DIR" and results["sections"] == ["memory"]
    assert results["memory"]["torch"]["rows"]["sam_torch (SAM)"]["extra_buffers"] == (
        pytest.approx(1.0, abs=1e-3))
    assert [t["target"] for t in results["targets"]] == [
        "sam_torch (SAM) extra memory <= 1 parameter-sized buffer",
        "sam_torch (ASAM) extra memory <= 1 parameter-sized buffer"]
    # the same run's report without its one section with targets: it says so instead of
    # an empty table
    bare = {k: v for k, v in results.items() if k not in ("memory", "targets")}
    bare["sections"] = []
    (tmp_path / "bare").mkdir()
    text = report.write_report(bare, tmp_path / "bare", [])
    assert "No target is measured by the sections of this run" in text
    assert "| target | measured | holds |" not in text


def test_python_m_benchmarks_is_the_main_job() -> None:
    """``python -m benchmarks`` reaches compare.py's command line (its whole runs, through
    the script, are in tests/bench/test_smoke_job.py)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: ")
    for flag in ("--out", "--smoke", "--full", "--gpu", "--sections", "--backends"):
        assert flag in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "benchmarks", "--sections", "nosuch"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "nosuch" in bad.stderr


def test_paths_are_shown_relative_to_the_clone_or_not_at_all(tmp_path: Path) -> None:
    assert compare.shown_path(ROOT / "benchmarks" / "results") == "benchmarks/results"
    assert compare.shown_path(tmp_path / "x") == "DIR"
    cmd = compare.shown_command(["--data-dir", str(tmp_path), "--out=" + str(ROOT / "runs" / "a"),
                                 "--full", "--sections", "overhead"])
    assert cmd == ("python benchmarks/compare.py --data-dir DIR --out=runs/a --full "
                   "--sections overhead")


def test_the_registry_loads_every_section_with_one_signature() -> None:
    assert {"overhead", "memory", "step", "agreement", "accuracy", "variants",
            "msharpness"} <= set(compare.SECTION_NAMES)
    assert compare.SECTION_NAMES[-1] == "agreement"  # it switches JAX to float64 a while
    for section in compare.SECTIONS:
        module, note = compare.load_section(section)
        if module is None:  # only an optional section may be absent, and it says so
            assert section.optional and note == f"{section.module.replace('.', '/')}.py is " \
                                                 "not in this checkout"
            continue
        params = list(inspect.signature(module.run).parameters)
        assert params == ["config", "progress"], section.name
        assert set(module.ESTIMATE_S) >= set(MODES), section.name
    absent = compare.Section("nothere", "benchmarks.nothere", optional=True)
    assert compare.load_section(absent) == (None, "benchmarks/nothere.py is not in this checkout")
    with pytest.raises(ImportError):
        compare.load_section(compare.Section("nothere", "benchmarks.nothere"))


def test_a_registered_section_runs_reports_and_adds_targets(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding a section is one registry entry; its module's ``report``/``targets`` hooks are
    used when present, its JSON otherwise; an absent optional one is a note, not an error."""
    seen = {}

    def run(config, progress):
        seen["config"] = dict(config)
        for _ in progress(range(3), desc="x"):
            pass
        return {"ratio": 1.5}

    fake = types.ModuleType("benchmarks.fakesection")
    fake.TITLE = "7. A new section"
    fake.ESTIMATE_S = {"smoke": 1, "quick": 1, "full": 1}
    fake.run = run
    fake.report = lambda r: [f"ratio {r['ratio']:.2f}", ""]
    fake.targets = lambda r: [("fake ratio <= 2", f"{r['ratio']:.2f}", r["ratio"] <= 2)]
    monkeypatch.setitem(sys.modules, "benchmarks.fakesection", fake)
    monkeypatch.setattr(compare, "SECTIONS", (
        compare.Section("fakesection", "benchmarks.fakesection"),
        compare.Section("nothere", "benchmarks.nothere", optional=True),
    ))
    monkeypatch.setattr(compare, "SECTION_NAMES", ("fakesection", "nothere"))
    out = tmp_path / "out"
    results = compare.main(["--smoke", "--out", str(out), "--no-progress",
                            "--backends", "torch"])
    assert results["fakesection"] == {"ratio": 1.5} and results["errors"] == {}
    assert seen["config"]["mode"] == "smoke" and seen["config"]["out"] == out
    assert results["nothere"] == {"skipped": "benchmarks/nothere.py is not in this checkout"}
    text = (out / "report.md").read_text()
    assert "## 7. A new section\n\nratio 1.50" in text
    assert "| fake ratio <= 2 | 1.50 † | yes |" in text
    assert "## nothere\n\nNot measured: benchmarks/nothere.py is not in this checkout" in text


def test_quick_is_the_default_and_sizes_grow_from_smoke_to_full() -> None:
    parser = compare.build_parser()
    assert parser.parse_args([]).mode == "quick"
    assert parser.parse_args(["--full"]).mode == "full"
    assert parser.parse_args(["--smoke"]).mode == "smoke"
    with pytest.raises(SystemExit):
        parser.parse_args(["--full", "--smoke"])
    from benchmarks import agreement, step, variants

    for module in (overhead, step, variants, agreement):
        smoke, quick, full = (sized({"mode": m}, module.SIZES) for m in MODES)
        for key in ("repeats", "steps"):
            if key in full:
                assert smoke[key] <= quick[key] < full[key], (module.__name__, key)
    # the quick run times section 1 on the full run's WRN-16-8 set: its targets are defined there
    q, f = (sized({"mode": m}, overhead.SIZES) for m in ("quick", "full"))
    assert (q["depth"], q["width"]) == (f["depth"], f["width"]) == (16, 8)
    # a GPU gets its own full sizes; --repeats overrides every mode
    assert sized({"mode": "full", "device": "cuda"}, step.SIZES) == step.SIZES["gpu"]
    assert sized({"mode": "quick", "device": "cuda"}, step.SIZES) == step.SIZES["quick"]
    assert overhead.sizes({"mode": "quick", "repeats": 7})["repeats"] == 7
    assert step.sizes({"mode": "quick", "repeats": 4})["repeats"] == 3
    with pytest.raises(ValueError, match="config\\['mode'\\] must be one of"):
        sized({"mode": "fast"}, step.SIZES)


def _synthetic_results(mode: str) -> dict:
    return {
        "generated": "2026-01-01 00:00:00 UTC", "command": "python benchmarks/compare.py",
        "mode": mode, "seconds": 12.0,
        "machine": machine_info(2), "device": "cpu", "errors": {},
        "sections": ["overhead", "memory"],
        "section_titles": {"overhead": overhead.TITLE, "memory": memory.TITLE},
        "peak_memory": {"max_rss_bytes": 3 * 2**30, "after_section": {"overhead": 2**30}},
        "overhead": {"model": "WRN-16-8", "tensors": 2, "parameters": 10, "repeats": 10,
                     "pytorch_optimizer": "present", "modes": {"SAM": {
                         name: {"median_ms": ms, "q1_ms": ms, "q3_ms": ms, "min_ms": ms,
                                "n": 10, "ratio_to_base": ms / 2.0, "ratio_of_minimums": 1.0}
                         for name, ms in (("base SGD step", 2.0), ("sam_torch", 4.0))}}},
        "memory": {"torch": {"parameter_bytes": 40, "rows": {
            "sam_torch (SAM)": {"held_bytes": 40, "held_while_perturbed_bytes": 40,
                                "extra_buffers": 1.0, "extra_buffers_while_perturbed": 1.0}}},
                   "jax": {"skipped": "--backends torch"}},
    }


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_both_runs_report_the_targets_and_the_quick_one_marks_its_few_repeats(
        tmp_path: Path, mode: str) -> None:
    results = _synthetic_results(mode)
    text = report.write_report(results, tmp_path, [])
    assert (tmp_path / "report.md").read_text() == text
    assert "| sam_torch SAM first+second <= 2.2x base step | 2.00x" in text
    assert "Peak memory (max RSS of the process): 3,072 MiB; after each section: overhead " \
           "1,024 MiB." in text
    if mode == "quick":
        assert "**This is the quick run**" in text and "`python benchmarks/compare.py --full`" in text
        assert "| 2.00x † | yes |" in text
        assert "| sam_torch (SAM) extra memory <= 1 parameter-sized buffer | 1.00 | yes |" in text
    else:
        assert "quick run" not in text and "†" not in text
    assert text.index("## 1. Optimizer overhead") < text.index("## 3. Memory")
    assert "JAX: not measured: --backends torch" in text


def test_progress_without_bars_passes_iterables_through(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress([("a", 5.0), ("b", 1.0)], enabled=False)
    assert not progress.bars
    with progress.section("a"):
        assert list(progress(range(4), desc="repeats")) == [0, 1, 2, 3]
        bar = progress.tick(3, "rounds")
        bar.update()
        bar.close()
    progress.close()
    assert capsys.readouterr().out.startswith("[compare] a: 0 s (1/2)")


def test_peak_memory_and_machine_description() -> None:
    peak = peak_rss_bytes()
    if sys.platform != "win32":
        big = np.ones(64 * 2**20 // 8)  # 64 MiB touched: the peak is at least that
        assert peak_rss_bytes() >= max(peak, big.nbytes)
    info = machine_info(3)
    assert info["threads"] == 3 and info["logical_cpus"] == os.cpu_count()
    assert info["cpu"] and "/" not in info["platform"]
    assert info["torch"] == torch.__version__ and info["numpy"] == np.__version__


def test_versions_come_from_the_metadata_without_importing(monkeypatch) -> None:
    import sklearn

    import sam_core
    from benchmarks._timing import _version

    for name, module in (("sklearn", sklearn), ("sam_core", sam_core)):
        monkeypatch.delitem(sys.modules, name)  # as in a fresh process (restored afterwards)
        assert _version(name) == module.__version__  # the distribution's name differs
        assert name not in sys.modules
    assert _version("no_such_module_here") is None
