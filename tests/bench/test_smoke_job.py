"""The main job run whole, as users run it: ``benchmarks/compare.py --smoke`` in a fresh
interpreter, once for the torch sections (tiny CIFAR files in the official layout, every section
but the cross-backend agreement, SAM-family variants in the accuracy section) and once for the
JAX sections. Each run is started once per module; the tests below check its results, report
and plots. Timings are only checked for being measured; the deterministic figures (buffer
counts, passes per step, cross-backend differences) are checked against what they must be.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import compare, diagnostics, msharpness
from benchmarks._common import AA_CONTROL
from tests.bench.test_compare import ROOT, run_compare, write_fake_cifar10


@dataclass
class SmokeRun:
    proc: subprocess.CompletedProcess[str]
    root: Path  # the temporary folder holding the data and the output
    out: Path
    results: dict[str, Any]
    report: str


def _smoke_run(root: Path, args: list[str]) -> SmokeRun:
    out = root / "out"
    proc = run_compare(["--smoke", *args, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SmokeRun(proc, root, out, json.loads((out / "results.json").read_text()),
                    (out / "report.md").read_text())


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory: pytest.TempPathFactory) -> SmokeRun:
    root = tmp_path_factory.mktemp("torch-smoke")
    data = write_fake_cifar10(root / "data")
    return _smoke_run(root, ["--backends", "torch", "--data-dir", str(data),
                             "--optimizers", "looksam,msam", "--threads", "1"])


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory: pytest.TempPathFactory) -> SmokeRun:
    return _smoke_run(tmp_path_factory.mktemp("jax-smoke"),
                      ["--sections", "memory,agreement,step"])


# ---------------------------------------------------------------------------------------
# The torch run: every section but the agreement
# ---------------------------------------------------------------------------------------


def test_the_run_names_the_machine_and_no_folder_of_it(torch_run: SmokeRun) -> None:
    results, report = torch_run.results, torch_run.report
    assert results["errors"] == {}
    assert results["mode"] == "smoke"
    assert results["sections"] == ["overhead", "step", "memory", "agreement", "accuracy",
                                   "variants", "msharpness", "diagnostics"]
    for key in ("cpu", "logical_cpus", "threads", "torch", "jax", "optax", "pytorch_optimizer"):
        assert key in results["machine"]
    assert results["machine"]["threads"] == 1
    # the report and the JSON name the machine by what it is, never a folder of it
    for text in (report, (torch_run.out / "results.json").read_text()):
        assert str(torch_run.root) not in text and str(ROOT) not in text
    assert results["command"] == ("python benchmarks/compare.py --smoke --backends torch "
                                  "--data-dir DIR --optimizers looksam,msam --threads 1 "
                                  "--out DIR")
    assert results["accuracy"]["data"] == "the folder given by --data-dir"
    assert "**Smoke run**" in report and "† few repeats (smoke run)" in report
    assert str(torch_run.out) in torch_run.proc.stdout and "report.md" in torch_run.proc.stdout


def test_peak_memory_after_each_section_and_the_plots(torch_run: SmokeRun) -> None:
    results, report = torch_run.results, torch_run.report
    # peak memory: the process's max RSS, and after each section (never decreasing)
    peak = results["peak_memory"]
    after = list(peak["after_section"].values())  # in the order the sections ran
    assert set(peak["after_section"]) == set(results["sections"])
    assert after == sorted(after) and 0 < after[-1] <= peak["max_rss_bytes"]
    assert "Peak memory (max RSS of the process):" in report
    for png in ("overhead.png", "train_step.png", "accuracy.png", "landscape.png"):
        assert (torch_run.out / png).stat().st_size > 1000
        assert f"({png})" in report


def test_overhead_every_implementation_timed_in_both_modes(torch_run: SmokeRun) -> None:
    for mode in ("SAM", "ASAM"):
        rows = torch_run.results["overhead"]["modes"][mode]
        assert {"base SGD step", "sam_torch", "sam_torch foreach+copy (before)",
                "loop per tensor (popular wrapper)", "pytorch_optimizer.SAM foreach=True",
                "pytorch_optimizer.SAM foreach=False"} <= set(rows)
        base = rows["base SGD step"]["median_ms"]
        for r in rows.values():
            assert r["n"] == 3 and r["median_ms"] > 0
            assert r["ratio_to_base"] == pytest.approx(r["median_ms"] / base)


def test_memory_buffer_counts_are_exact(torch_run: SmokeRun) -> None:
    # swap keeps one spare, copy two, the peers free theirs
    mem = torch_run.results["memory"]["torch"]["rows"]
    assert mem["sam_torch (SAM)"]["extra_buffers"] == pytest.approx(1.0, abs=1e-3)
    assert mem["sam_torch (ASAM)"]["extra_buffers"] == pytest.approx(1.0, abs=1e-3)
    assert mem["sam_torch foreach+copy (before) (SAM)"]["extra_buffers"] == pytest.approx(
        2.0, abs=1e-3)
    peer = mem["pytorch_optimizer.SAM foreach=True (SAM)"]
    assert peer["extra_buffers"] == pytest.approx(0.0, abs=1e-3)
    assert peer["extra_buffers_while_perturbed"] == pytest.approx(1.0, abs=1e-3)


def test_jax_is_reported_as_not_requested_never_faked(torch_run: SmokeRun) -> None:
    results = torch_run.results
    assert set(results["step"]["torch"]["rows"]) >= {"torch SGD", "sam_torch"}
    assert "skipped" in results["step"]["jax"] and "skipped" in results["agreement"]
    assert results["memory"]["jax"] == {"skipped": "--backends torch"}
    assert not any(name.startswith("jax ") for name in results["accuracy"]["runs"])


def test_variants_every_form_timed_with_its_exact_passes(torch_run: SmokeRun) -> None:
    results = torch_run.results
    rows = results["variants"]["backends"]["torch"]
    assert set(results["variants"]["backends"]) == {"torch"}  # --smoke: torch only
    expected_passes = {"sgd": 1.0, "sam": 2.0, "gsam": 2.0, "wsam": 2.0, "samon": 2.0,
                       "fsam": 2.0, "vasso": 2.0, "looksam(k=5)": 1.2, "everyk(k=5)": 1.2,
                       "msam": 1.0}
    assert {n: r["passes"] for n, r in rows.items()} == pytest.approx(expected_passes)
    for r in rows.values():
        assert r["ms"] > 0 and r["ratio_to_sgd"] == pytest.approx(r["ms"] / rows["sgd"]["ms"])
    assert "## 6. SAM family" in torch_run.report
    assert any("looksam(k=5) step <= 1.25x" in t["target"] for t in results["targets"])


def test_accuracy_trains_sgd_sam_asam_and_the_named_variants(torch_run: SmokeRun) -> None:
    """Section 5 on the fake CIFAR files: one epoch per run, the variants named in
    --optimizers (torch) next to SGD/SAM/ASAM, sane values, the landscape through 0."""
    acc = torch_run.results["accuracy"]
    runs = acc["runs"]
    assert set(runs) == {"torch SGD", "torch SAM", "torch ASAM", "torch looksam", "torch msam"}
    for run in runs.values():
        (h,) = run["history"]
        assert 0.0 <= h["test_acc"] <= 1.0 and np.isfinite(h["test_loss"])
    # the variants trained: their weights differ from SGD's (different test loss)
    sgd_loss = runs["torch SGD"]["history"][0]["test_loss"]
    for name in ("torch SAM", "torch looksam", "torch msam"):
        assert runs[name]["history"][0]["test_loss"] != sgd_loss, name
    alphas = acc["landscape"]["alphas"]
    assert alphas[len(alphas) // 2] == 0.0
    for losses in acc["landscape"]["train_loss"].values():
        assert len(losses) == len(alphas) and all(np.isfinite(losses))


def test_msharpness_section_reports_its_paths_and_targets(torch_run: SmokeRun) -> None:
    results, report = torch_run.results, torch_run.report
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
    assert "jax" not in res  # not requested (--backends torch)
    # the targets (m = 4 here; m = 2 has none), in the run's targets table
    (verdict,) = [v for v in res["verdicts"] if v["target"] is not None]
    assert verdict["m"] == 4 and verdict["target"] == 1.5
    assert verdict["ratio"] == rows[verdict["fastest_path"]]["ratio_to_batch_sam"]["median"]
    (target,) = [t for t in results["targets"] if "m-SAM" in t["target"]]
    assert target["target"] == ("torch m-SAM step, m=4, fastest path <= 1.5x batch-SAM step "
                                f"(WRN-10-1, batch {smoke['batch']}, CPU)")
    assert target["measured"] == f"{verdict['ratio']:.2f}x ({verdict['fastest_path']})"
    assert target["holds"] == (verdict["ratio"] <= 1.5)
    holds = "yes" if target["holds"] else "**no**"
    assert f"| {target['target']} | {target['measured']} † | {holds} |" in report
    assert "## 7. m-sharpness: cost of an m-SAM step\n\nWRN-10-1, batch 8" in report
    assert "### torch (cpu)" in report and "| m=4 vectorized |" in report
    assert "### jax" not in report[report.index("## 7."):report.index("## 8.")]
    assert "### Targets (fastest path / batch-SAM step)" in report
    # asked for JAX too, the smoke run leaves it out and the section says why
    _, note = msharpness._section_config(
        compare.section_config(mode="smoke", backends=("torch", "jax")))
    assert note == "not in the smoke run"
    text = "\n".join(msharpness.report({**res, "jax": {"error": note}}))
    assert "### jax\n\nnot measured: not in the smoke run" in text


def test_diagnostics_section_times_hvps_and_lambda_max(torch_run: SmokeRun) -> None:
    results, report = torch_run.results, torch_run.report
    res = results["diagnostics"]
    smoke = diagnostics.SIZES["smoke"]
    assert res["mode"] == "smoke" and res["config"]["iterations"] == smoke["iterations"]
    rows = res["torch"]["rows"]
    assert rows["gradient"]["median_ms"] > 0 and rows["gradient"]["n"] == smoke["repeats"]
    assert set(diagnostics.TORCH_ROWS.values()) <= set(rows)
    for name in diagnostics.TORCH_ROWS.values():
        assert rows[name]["median_ms"] > 0 and rows[name]["ratio_to_gradient"]["median"] > 0
    hvp = rows[diagnostics.TORCH_ROWS["double_backward"]]
    lanczos = rows[f"lambda_max, Lanczos {smoke['iterations']} iterations (sam_torch)"]
    power = rows[f"lambda_max, PyHessian-style power iteration, {smoke['iterations']} products"]
    # Same model and data: after 3 products, Lanczos's Ritz value is at least the power
    # iteration's Rayleigh quotient up to rounding (both lower bounds of lambda_max).
    assert lanczos["lambda_max"] >= power["lambda_max"] * (1 - 1e-3) > 0
    assert "jax" not in res  # not requested (--backends torch)
    (target,) = [t for t in results["targets"] if "HVP" in t["target"]]
    ratio = hvp["ratio_to_gradient"]["median"]
    assert target["measured"] == f"{ratio:.2f}x" and target["holds"] == (ratio <= 2.5)
    assert "## 8. Diagnostics: cost of Hessian-vector products and lambda_max" in report
    assert f"| {diagnostics.TORCH_ROWS['func_per_product']} |" in report
    # asked for JAX too, the smoke run leaves it out and the section says why
    _, note = diagnostics._config(compare.section_config(mode="smoke", backends=("torch", "jax")))
    assert note == "not in the smoke run"
    text = "\n".join(diagnostics.report({**res, "jax": {"error": note}}))
    assert "not in the smoke run" in text


# ---------------------------------------------------------------------------------------
# The JAX run: step, memory and agreement
# ---------------------------------------------------------------------------------------


def test_jax_sections_in_the_reports_order(jax_run: SmokeRun) -> None:
    results = jax_run.results
    assert results["errors"] == {}
    # the report orders the sections by number, whatever the order they ran in
    assert results["sections"] == ["step", "memory", "agreement"]
    assert "accuracy" not in results


def test_jax_step_is_paired_against_optax_contrib_sam(jax_run: SmokeRun) -> None:
    results = jax_run.results
    steps = results["step"]["jax"]["rows"]
    assert set(steps) == {"optax.sgd", "sam_jax", "optax.contrib.sam opaque",
                          AA_CONTROL, "optax.contrib.sam alternating"}
    for name in ("sam_jax", AA_CONTROL):
        pr = steps[name]["paired_ratio_to_optax_opaque"]
        assert pr["n"] == steps[name]["n"] and pr["ci95_low"] <= pr["median"] <= pr["ci95_high"]
    # sam_jax compiles to the work of optax.contrib.sam opaque (same two passes)
    work = results["step"]["jax"]["compiled_work"]
    assert 0.99 < work["flops_ratio"] < 1.01 and 0.99 < work["bytes_ratio"] < 1.01
    assert "(paired ratio, within the A/A noise floor)" in jax_run.report
    assert "A/A control, the opaque step compiled a second time" in jax_run.report


def test_jax_memory_and_cross_backend_agreement(jax_run: SmokeRun) -> None:
    results = jax_run.results
    mem = results["memory"]["jax"]["rows"]
    assert mem["sam_jax"]["extra_buffers"] == pytest.approx(0.0, abs=1e-3)
    assert mem["optax.contrib.sam opaque"]["extra_buffers"] == pytest.approx(0.0, abs=1e-3)
    assert mem["optax.contrib.sam alternating"]["extra_buffers"] == pytest.approx(1.0, abs=1e-3)
    agree = results["agreement"]["rows"]
    assert agree["SAM float64"]["max_rel_param_diff"] < 1e-10
    assert agree["SAM float64"]["global_rel_l2_diff"] < 1e-12
    assert agree["ASAM float32"]["global_rel_l2_diff"] < 1e-5
