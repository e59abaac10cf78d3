"""benchmarks/compare.py in its quickest mode, and the pieces whose numbers it reports.

The smoke runs start a fresh interpreter (as users run it; the agreement section also
switches JAX to float64 process-wide) on tiny CIFAR files written in the official layout.
Timings are only checked for being measured; the deterministic figures (buffer counts,
cross-backend differences) are checked against what they must be.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import compare
from benchmarks._timing import interleaved_times, paired_ratio, summarize

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


def test_quick_torch_run_with_cifar_files(tmp_path: Path) -> None:
    data = write_fake_cifar10(tmp_path / "data")
    out = tmp_path / "out"
    proc = run_compare(["--quick", "--backends", "torch", "--data-dir", str(data),
                        "--out", str(out), "--threads", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert results["errors"] == {}
    for key in ("cpu", "threads", "torch", "jax", "optax", "pytorch_optimizer"):
        assert key in results["machine"]
    assert results["machine"]["threads"] == 1
    for png in ("overhead.png", "train_step.png", "accuracy.png", "landscape.png"):
        assert (out / png).stat().st_size > 1000
        assert f"({png})" in report

    # 1. every implementation timed in both modes, ratio consistent with the medians
    for mode in ("SAM", "ASAM"):
        rows = results["overhead"]["modes"][mode]
        assert {"base SGD step", "sam_torch", "sam_torch foreach+copy (before)",
                "loop per tensor (popular wrapper)", "pytorch_optimizer.SAM foreach=True",
                "pytorch_optimizer.SAM foreach=False"} <= set(rows)
        base = rows["base SGD step"]["median_ms"]
        for r in rows.values():
            assert r["n"] == 3 and r["median_ms"] > 0
            assert r["ratio_to_base"] == pytest.approx(r["median_ms"] / base)

    # 3. buffer counts are exact: swap keeps one spare, copy two, the peers free theirs
    mem = results["memory_torch"]["rows"]
    assert mem["sam_torch (SAM)"]["extra_buffers"] == pytest.approx(1.0, abs=1e-3)
    assert mem["sam_torch (ASAM)"]["extra_buffers"] == pytest.approx(1.0, abs=1e-3)
    assert mem["sam_torch foreach+copy (before) (SAM)"]["extra_buffers"] == pytest.approx(
        2.0, abs=1e-3)
    peer = mem["pytorch_optimizer.SAM foreach=True (SAM)"]
    assert peer["extra_buffers"] == pytest.approx(0.0, abs=1e-3)
    assert peer["extra_buffers_while_perturbed"] == pytest.approx(1.0, abs=1e-3)

    # 2. torch whole step measured; JAX reported as not requested, never faked
    assert set(results["step_torch"]["rows"]) >= {"torch SGD", "sam_torch"}
    assert "skipped" in results["step_jax"] and "skipped" in results["agreement"]

    # 6. SAM family: every variant timed; passes per step are exact (k = 5)
    rows = results["variants"]["backends"]["torch"]
    assert set(results["variants"]["backends"]) == {"torch"}  # --quick: torch only
    expected_passes = {"sgd": 1.0, "sam": 2.0, "gsam": 2.0, "wsam": 2.0, "samon": 2.0,
                       "fsam": 2.0, "vasso": 2.0, "looksam(k=5)": 1.2, "everyk(k=5)": 1.2,
                       "msam": 1.0}
    assert {n: r["passes"] for n, r in rows.items()} == pytest.approx(expected_passes)
    for r in rows.values():
        assert r["ms"] > 0 and r["ratio_to_sgd"] == pytest.approx(r["ms"] / rows["sgd"]["ms"])
    assert "## 6. SAM family" in report
    assert any("looksam(k=5) step <= 1.25x" in t["target"] for t in results["targets"])

    # 5. accuracy on the fake data: one epoch per run, sane values, landscape through 0
    acc = results["accuracy"]
    assert set(acc["runs"]) == {"torch SGD", "torch SAM", "torch ASAM"}
    for run in acc["runs"].values():
        (h,) = run["history"]
        assert 0.0 <= h["test_acc"] <= 1.0 and np.isfinite(h["test_loss"])
    alphas = acc["landscape"]["alphas"]
    assert alphas[len(alphas) // 2] == 0.0
    for losses in acc["landscape"]["train_loss"].values():
        assert len(losses) == len(alphas) and all(np.isfinite(losses))


def test_quick_jax_sections(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_compare(["--quick", "--sections", "memory,agreement,step", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["errors"] == {}
    steps = results["step_jax"]["rows"]
    assert set(steps) == {"optax.sgd", "sam_jax", "optax.contrib.sam opaque",
                          compare.AA_CONTROL, "optax.contrib.sam alternating"}
    for name in ("sam_jax", compare.AA_CONTROL):
        pr = steps[name]["paired_ratio_to_optax_opaque"]
        assert pr["n"] == steps[name]["n"] and pr["ci95_low"] <= pr["median"] <= pr["ci95_high"]
    # sam_jax compiles to the work of optax.contrib.sam opaque (same two passes)
    work = results["step_jax"]["compiled_work"]
    assert 0.99 < work["flops_ratio"] < 1.01 and 0.99 < work["bytes_ratio"] < 1.01
    report = (out / "report.md").read_text()
    assert "(paired ratio, within the A/A noise floor)" in report
    assert "A/A control, the opaque step compiled a second time" in report
    mem = results["memory_jax"]["rows"]
    assert mem["sam_jax"]["extra_buffers"] == pytest.approx(0.0, abs=1e-3)
    assert mem["optax.contrib.sam opaque"]["extra_buffers"] == pytest.approx(0.0, abs=1e-3)
    assert mem["optax.contrib.sam alternating"]["extra_buffers"] == pytest.approx(1.0, abs=1e-3)
    agree = results["agreement"]["rows"]
    assert agree["SAM float64"]["max_rel_param_diff"] < 1e-10
    assert agree["SAM float64"]["global_rel_l2_diff"] < 1e-12
    assert agree["ASAM float32"]["global_rel_l2_diff"] < 1e-5
    assert results["accuracy"] == {"skipped": "not in --sections"}


def test_no_cifar_says_how_to_point_at_it(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    args = compare.build_parser().parse_args(["--data-dir", str(missing)])
    args.budget = compare.BUDGETS["smoke"]
    res = compare.section_accuracy(args, None, tmp_path)
    assert "--data-dir" in res["skipped"] and str(missing) in res["skipped"]


def test_budget_presets_and_pairs() -> None:
    assert compare.parse_budget("smoke") == compare.BUDGETS["smoke"]
    b = compare.parse_budget("epochs=3,width=1,subset=500")
    assert (b.epochs, b.width, b.subset) == (3, 1, 500)
    assert b.depth == compare.BUDGETS["default"].depth
    for bad in ("fast", "epochs=0", "epochs=two", "colour=3"):
        with pytest.raises(Exception, match="--budget"):
            compare.parse_budget(bad)


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
    opt = compare.LoopSAM(params, torch.optim.SGD, rho=0.3, adaptive=adaptive, lr=0.1)
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
    assert compare._held_bytes(opt, compare._param_ptrs(params)) == 0
    opt.step()
    assert compare._held_bytes(opt, compare._param_ptrs(params)) == 22 * 4  # momentum


def test_filter_normalized_landscape_restores_weights() -> None:
    from examples import data

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 30 * 30, 10))
    before = [p.detach().clone() for p in model.parameters()]
    rng = np.random.default_rng(0)
    split = data.Split(rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
                       rng.integers(0, 10, 20))
    losses = compare.loss_landscape(model, split, data, np.array([-1.0, 0.0, 1.0]))
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

    times = interleaved_times({"a": make("a"), "b": make("b")}, repeats=5, warmup=2)
    assert calls == {"a": 7, "b": 7}
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
    for fn in (compare.asam_perturb_per_tensor, compare.asam_perturb_blocked,
               compare.asam_perturb_floor):
        got = fn(ws, gs, [torch.empty_like(w) for w in ws], 0.5, 0.01, 1e-12)
        for w, g, ti, o in zip(ws, gs, t, got, strict=True):
            expected = w.numpy() + 0.5 * ti**2 * g.numpy() / (norm + 1e-12)
            np.testing.assert_allclose(o.numpy(), expected, rtol=1e-13)


def test_quick_accuracy_run_with_sam_family_variants(tmp_path: Path) -> None:
    """Section 5 trains the variants named in --optimizers (torch) next to SGD/SAM/ASAM."""
    data = write_fake_cifar10(tmp_path / "data")
    out = tmp_path / "out"
    proc = run_compare(["--quick", "--backends", "torch", "--sections", "accuracy",
                        "--optimizers", "looksam,msam", "--data-dir", str(data),
                        "--out", str(out), "--threads", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["errors"] == {}
    runs = results["accuracy"]["runs"]
    assert set(runs) == {"torch SGD", "torch SAM", "torch ASAM", "torch looksam", "torch msam"}
    for run in runs.values():
        (h,) = run["history"]
        assert 0.0 <= h["test_acc"] <= 1.0 and np.isfinite(h["test_loss"])
    # the variants trained: their weights differ from SGD's (different test loss)
    assert runs["torch looksam"]["history"][0]["test_loss"] != runs["torch SGD"]["history"][0][
        "test_loss"]
    # no section with a target ran: the report says so instead of an empty table
    assert results["targets"] == []
    report = (out / "report.md").read_text()
    assert "No target is measured by the sections of this run" in report
    assert "| target | measured | holds |" not in report


def test_unknown_optimizer_is_refused_with_the_choices() -> None:
    with pytest.raises(SystemExit):
        compare.build_parser().parse_args(["--optimizers", "adamw"])
