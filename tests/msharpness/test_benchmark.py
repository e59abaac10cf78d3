"""benchmarks/msharpness.py in its smallest form: it measures every path and reports them."""

from __future__ import annotations

import json

from benchmarks import msharpness


class _Progress:
    def __init__(self) -> None:
        self.n = 0

    def update(self, n: int) -> None:
        self.n += n


def test_run_torch_quick_reports_every_path():
    progress = _Progress()
    config = {
        "quick": True, "backends": ["torch"], "ms": [4, 8], "repeats": 2, "warmup": 1,
        "memory": False, "profile": True,
    }
    result = msharpness.run(config, progress)
    json.dumps(result)  # JSON-ready
    rows = result["torch"]["rows"]
    assert set(rows) == {
        "SGD", "batch SAM", "m=4 loop", "m=4 vectorized", "m=8 loop", "m=8 vectorized",
    }
    for row in rows.values():
        assert row["median_ms"] > 0 and row["n"] == 2
    assert rows["batch SAM"]["ratio_to_batch_sam"]["median"] == 1.0
    assert [p["k"] for p in result["torch"]["profile"]] == [4, 2]
    assert {v["m"] for v in result["verdicts"]} == {4, 8}
    assert set(result["auto_choice"]["torch"]) == {"4", "8"}
    assert progress.n > 0
    lines = msharpness.report(result)
    assert isinstance(lines, list) and "### Targets (fastest path / batch-SAM step)" in lines
    text = msharpness.markdown(result)  # the standalone report.md
    assert text.startswith("# m-sharpness on one device")
    assert "| m=4 loop |" in text and "## Targets" in text and result["machine"]["cpu"] in text
    (target,) = msharpness.targets(result)  # m = 4 (<= 1.5x); m = 8 has no target
    ratio = next(v["ratio"] for v in result["verdicts"] if v["m"] == 4)
    assert target[0].startswith("torch m-SAM step, m=4, fastest path <= 1.5x batch-SAM step")
    assert target[1].startswith(f"{ratio:.2f}x") and target[2] == (ratio <= 1.5)


def test_memory_worker_measures_a_fresh_process():
    cfg = dict(msharpness.DEFAULT_CONFIG)
    cfg.update(msharpness.QUICK_CONFIG)
    out = msharpness._measure_memory("torch", ["m=4 loop"], cfg, None)
    assert out["m=4 loop"]["peak_rss_delta_bytes"] >= 0, out


def test_standalone_cli_writes_its_own_report_without_machine_paths(tmp_path, capsys):
    out = tmp_path / "out"
    result = msharpness.main(["--quick", "--backends", "torch", "--ms", "4", "--repeats", "1",
                              "--warmup", "0", "--no-memory", "--no-profile", "--out", str(out)])
    capsys.readouterr()
    text = (out / "report.md").read_text()
    assert text == msharpness.markdown(result) + "\n"
    assert json.loads((out / "results.json").read_text())["verdicts"] == result["verdicts"]
    assert "Command: `python -m benchmarks.msharpness --quick" in text and "--out DIR`" in text
    assert str(tmp_path) not in text
