"""The GPU job (``compare.py --gpu``) as far as a machine without CUDA can check it: it stops
with a clear message, what it would run, its section at smoke size on the CPU, and the parts
of the report only it writes."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from benchmarks import compare, gpu, report
from benchmarks._progress import Progress
from tests.bench.test_compare import run_compare


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_job_without_cuda_exits_at_once_with_a_message(tmp_path: Path) -> None:
    proc = run_compare(["--gpu", "--out", str(tmp_path / "out")])
    assert proc.returncode != 0
    assert "--gpu needs a CUDA device" in proc.stderr
    assert "torch.cuda.is_available() is False" in proc.stderr
    assert "python benchmarks/compare.py" in proc.stderr  # what to run instead
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written


def _fake_torch(cuda: bool) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        cuda=types.SimpleNamespace(is_available=lambda: cuda),
        version=types.SimpleNamespace(cuda="12.8" if cuda else None),
        device=torch.device, __version__=torch.__version__)


def test_gpu_job_is_the_full_run_on_cuda_without_the_accuracy_section() -> None:
    args = compare.build_parser().parse_args(["--gpu"])
    assert compare.resolve_mode(args, _fake_torch(cuda=True)) is True
    assert (args.mode, args.device) == ("full", "cuda")
    assert "accuracy" not in args.sections and "gpu" in args.sections
    assert set(args.sections) == set(compare.SECTION_NAMES) - {"accuracy"}
    args = compare.build_parser().parse_args(["--gpu", "--device", "cuda:1"])
    compare.resolve_mode(args, _fake_torch(cuda=True))
    assert args.device == "cuda:1"
    with pytest.raises(SystemExit, match="--gpu runs on a CUDA device"):
        compare.resolve_mode(compare.build_parser().parse_args(["--gpu", "--device", "cpu"]),
                             _fake_torch(cuda=True))
    with pytest.raises(SystemExit, match="a CPU-only build"):
        compare.resolve_mode(compare.build_parser().parse_args(["--gpu"]), _fake_torch(False))
    # a CPU run: every section but the GPU one unless it is asked for
    args = compare.build_parser().parse_args([])
    assert compare.resolve_mode(args, _fake_torch(cuda=False)) is False
    assert args.device == "cpu" and "gpu" not in args.sections and "accuracy" in args.sections
    args = compare.build_parser().parse_args(["--sections", "gpu"])
    compare.resolve_mode(args, _fake_torch(cuda=False))
    assert args.sections == ("gpu",)


def test_gpu_section_measures_every_precision_on_the_cpu() -> None:
    result = gpu.run(compare.section_config("smoke", backends=("torch",)),
                     Progress([("gpu", 1)], enabled=False))
    assert list(result["rows"]) == list(gpu.PRECISIONS)
    for row in result["rows"].values():
        assert row["sgd_ms"] > 0 and row["sam_ms"] > 0
        assert row["ratio_to_sgd"] == pytest.approx(row["sam_ms"] / row["sgd_ms"])
        assert row["sam_host_syncs"] is None and row["sam_peak_bytes"] is None  # CUDA only
    assert result["rows"]["float16"]["driver"] == "ScaledSAM + GradScaler"
    text = "\n".join(gpu.report(result))
    assert "| float16 | ScaledSAM + GradScaler |" in text and "n/a (CPU)" in text
    assert gpu.run(compare.section_config("smoke", backends=("jax",)), None) == {
        "skipped": "--backends jax (this section is torch's)"}
    assert gpu.count_host_syncs(torch.device("cpu"), lambda: None) is None


def test_gpu_sizes_are_the_issue_sizes() -> None:
    from benchmarks import msharpness, step, variants
    from benchmarks._common import sized

    on_gpu = {"mode": "full", "device": "cuda"}
    assert {k: sized(on_gpu, gpu.SIZES)[k] for k in ("depth", "width", "batch")} == {
        "depth": 16, "width": 8, "batch": 128}
    assert {k: sized(on_gpu, step.SIZES)[k] for k in ("depth", "width", "batch")} == {
        "depth": 16, "width": 8, "batch": 128}
    m = sized(on_gpu, msharpness.SIZES)
    assert (m["depth"], m["width"], m["batch"], m["ms"]) == (16, 8, 128, [4, 16, 32])
    assert sized(on_gpu, variants.SIZES)["batch"] == 128


def test_report_names_the_gpu_driver_and_the_cuda_tests(tmp_path: Path) -> None:
    machine = {"cpu": "Some CPU", "logical_cpus": 16, "threads": 16, "python": "3.11",
               "torch": "2.13.0", "jax": "0.10.2", "optax": "0.2.8", "flax": "0.12",
               "pytorch_optimizer": "3.9", "gpu": "NVIDIA H200", "gpu_memory_bytes": 141 * 2**30,
               "gpu_driver": "580.1", "cuda": "12.8", "cudnn": 91000}
    results = {"generated": "now", "command": "python benchmarks/compare.py --gpu",
               "seconds": 400, "mode": "full", "machine": machine, "device": "cuda",
               "sections": [], "notes": {"jax": "JAX sections not run: no GPU backend"},
               "cuda_tests": {"command": "python -m pytest -q -m cuda tests", "returncode": 0,
                              "summary": "8 passed in 20s", "seconds": 21.0,
                              "output": "cuda-tests.txt"}}
    text = report.write_report(results, tmp_path, [])
    assert "GPU: NVIDIA H200, 141 GiB; NVIDIA driver 580.1, CUDA 12.8, cuDNN 91000." in text
    assert "## CUDA tests" in text and "passed in 21 s, `8 passed in 20s`" in text
    assert "Note (jax): JAX sections not run: no GPU backend." in text
