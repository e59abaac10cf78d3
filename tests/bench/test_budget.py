"""The quick run's time budget (``benchmarks.compare.BUDGET_S``), the time box that adapts a
section's repeats to it, its report, and the persistent JAX compilation cache.

Nothing here is timed: the budget table is checked for adding up, the report for listing each
section's measured time beside its budget, the time box with a zero-second box (it must stop
after its minimum rounds) and without one (every round runs).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from benchmarks import _timing, compare, report

ROOT = Path(__file__).resolve().parents[2]


def test_the_budget_covers_every_default_section_and_adds_up_to_the_limit() -> None:
    default = [s.name for s in compare.SECTIONS if s.default]
    assert set(default) <= set(compare.BUDGET_S), set(default) - set(compare.BUDGET_S)
    # nothing budgeted that is not a section of the quick run (or what lies outside them)
    assert set(compare.BUDGET_S) - {"STARTUP"} == set(default)
    assert all(v > 0 for v in compare.BUDGET_S.values())
    assert compare.QUICK_LIMIT_S == 300
    assert sum(compare.BUDGET_S.values()) <= compare.QUICK_LIMIT_S
    assert compare.section_budgets("quick") == {k: float(v) for k, v in compare.BUDGET_S.items()}
    # the full and smoke runs run every repeat they ask for
    assert compare.section_budgets("full") == {} and compare.section_budgets("smoke") == {}


def test_a_time_box_stops_the_rounds_after_its_minimum_and_says_so() -> None:
    calls = {"a": 0, "b": 0}

    def make(name: str):
        def f() -> None:
            calls[name] += 1
        return f

    fns = {n: make(n) for n in calls}
    before = len(_timing.CUT_SHORT)
    with _timing.time_box(0.0, min_rounds=3):
        times = _timing.interleaved_times(fns, repeats=10, warmup=1)
    assert {n: len(t) for n, t in times.items()} == {"a": 3, "b": 3}
    assert calls == {"a": 4, "b": 4}  # the warm-up round always runs
    assert _timing.CUT_SHORT[before:] == [(10, 3)]
    # a box with time to spare, fewer repeats than its minimum, or no box: every round
    with _timing.time_box(3600.0):
        assert len(_timing.interleaved_times(fns, repeats=5, warmup=0)["a"]) == 5
    with _timing.time_box(0.0, min_rounds=3):
        assert len(_timing.interleaved_times(fns, repeats=2, warmup=0)["a"]) == 2
    assert len(_timing.interleaved_times(fns, repeats=6, warmup=0)["b"]) == 6
    assert _timing.CUT_SHORT[before:] == [(10, 3)]
    assert _timing._TIME_BOX[0] is None  # the box ends with its block
    with pytest.raises(ValueError, match="min_rounds must be >= 1, got 0"), \
            _timing.time_box(1.0, min_rounds=0):
        pass


def _fake(title: str, repeats: int) -> types.ModuleType:
    def run(config, progress):
        times = _timing.interleaved_times({"x": lambda: None}, repeats=repeats, warmup=0)
        return {"n": len(times["x"])}

    module = types.ModuleType(f"benchmarks.fake_{title}")
    module.TITLE = title
    module.ESTIMATE_S = {"smoke": 1, "quick": 1, "full": 1}
    module.run = run
    return module


def test_the_quick_report_lists_each_sections_time_against_its_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A quick run of fake sections: report.md and the console give each section's seconds,
    its budget and whether it held, what lay outside the sections, and the total against the
    300 s limit; a section whose box is spent (a zero budget) is cut to 3 rounds, and says so."""
    monkeypatch.setitem(sys.modules, "benchmarks.fake_one", _fake("1. One", 50))
    monkeypatch.setitem(sys.modules, "benchmarks.fake_two", _fake("2. Two", 50))
    monkeypatch.setattr(compare, "SECTIONS", (
        compare.Section("one", "benchmarks.fake_one"),
        compare.Section("two", "benchmarks.fake_two")))
    monkeypatch.setattr(compare, "SECTION_NAMES", ("one", "two"))
    monkeypatch.setattr(compare, "BUDGET_S", {"STARTUP": 20, "one": 100, "two": 0})
    monkeypatch.delenv("SAM_BENCH_TIME_BOX", raising=False)
    out = tmp_path / "out"
    results = compare.main(["--out", str(out), "--no-progress", "--backends", "torch"])
    assert results["mode"] == "quick" and results["errors"] == {}
    assert results["budget_s"] == {"STARTUP": 20.0, "one": 100.0, "two": 0.0}
    assert results["time_limit_s"] == 300
    assert set(results["section_seconds"]) == {"one", "two"}
    assert results["one"] == {"n": 50} and results["two"] == {"n": 3}
    assert results["rounds_cut"] == {"two": [[50, 3]]}
    text = (out / "report.md").read_text()
    part = text.split("## Time against the budget", 1)[1]
    sec = results["section_seconds"]
    assert f"| one | {sec['one']:.0f} | 100 | yes |" in part
    assert f"| two | {sec['two']:.0f} | 0 |" in part
    assert "| start-up, imports, plots, report | " in part and " | 20 | " in part
    assert (f"| **total** | {results['seconds']:.0f} | 300 (budgets add up to 120) | yes |"
            in part)
    assert "two: 3 of 50 timed rounds" in part
    assert "no JAX compilation cache" in part  # --backends torch: no JAX, no cache
    console = capsys.readouterr().out
    assert "[compare] time per section (s) against its budget (the quick run's, 300 s in all):" \
        in console
    assert re.search(rf"^  one +{sec['one']:.0f} / 100  within: yes$", console, re.M), console
    assert re.search(rf"^  total +{results['seconds']:.0f} / 300 \(budgets add up to 120\)"
                     "  within: yes$", console, re.M), console
    assert "the budget cut repeats short: two: 3 of 50 timed rounds." in console
    # SAM_BENCH_TIME_BOX=0: the budget stays a yardstick, every repeat runs
    monkeypatch.setenv("SAM_BENCH_TIME_BOX", "0")
    assert not compare.time_boxed()
    monkeypatch.setenv("SAM_BENCH_TIME_BOX", "1")
    assert compare.time_boxed()


def test_the_smoke_report_times_its_sections_without_a_budget(tmp_path: Path) -> None:
    results = {"section_seconds": {"memory": 1.2}, "budget_s": {}, "time_limit_s": None,
               "seconds": 3.0, "jax_cache": {"dir": "runs/.cache/jax", "entries_before": 4}}
    md = "\n".join(report.time_lines(results, markdown=True))
    assert "| memory | 1 |  |  |" in md and "| **total** | 3 |  |  |" in md
    assert "JAX compilation cache `runs/.cache/jax` (4 entries before this run" in md


def test_the_cache_folder_is_ignored_by_git_and_can_be_turned_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    parser = compare.build_parser()
    monkeypatch.delenv("SAM_BENCH_CACHE", raising=False)
    monkeypatch.delenv("SAM_BENCH_CACHE_DIR", raising=False)
    assert compare.cache_folder(parser.parse_args([])) == ROOT / "runs" / ".cache" / "jax"
    assert compare.cache_folder(parser.parse_args(["--no-cache"])) is None
    monkeypatch.setenv("SAM_BENCH_CACHE", "0")
    assert compare.cache_folder(parser.parse_args([])) is None
    monkeypatch.setenv("SAM_BENCH_CACHE", "1")
    monkeypatch.setenv("SAM_BENCH_CACHE_DIR", "/elsewhere/jax")
    assert compare.cache_folder(parser.parse_args([])) == Path("/elsewhere/jax")
    probe = (compare.CACHE_DIR / "entry").as_posix()
    ignored = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0, f"{probe} is not ignored by git"


def test_the_jax_cache_keeps_even_a_tiny_program(tmp_path: Path) -> None:
    """In a fresh interpreter (JAX sets its cache up once per process): after
    ``enable_jax_cache`` a jitted function that compiles in milliseconds lands in the folder."""
    pytest.importorskip("jax")
    code = (
        "import sys; from pathlib import Path; from benchmarks import compare\n"
        "info = compare.enable_jax_cache(Path(sys.argv[1]))\n"
        "assert info['entries_before'] == 0, info\n"
        "import jax, jax.numpy as jnp\n"
        "jax.block_until_ready(jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "jax")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert any((tmp_path / "jax").iterdir()), "nothing cached"
