"""Timing, memory and machine-description helpers of the main job (``benchmarks/compare.py``).

Timings interleave the implementations (round-robin, one call of each per round, after a
warmup) so that a background load that comes and goes on a shared machine hits them all
alike, and report the median of the rounds.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = [
    "interleaved_times",
    "machine_info",
    "paired_ratio",
    "peak_rss_bytes",
    "summarize",
]



def limit_threads_env(threads: int) -> None:
    """Limit torch's and XLA's CPU threads through the environment of this process (and of
    processes it starts). Takes effect only if called before torch/JAX start their pools.

    ``OMP_NUM_THREADS`` is set unless already set; XLA gets ``--xla_cpu_multi_thread_eigen``
    (false for one thread). Only valid ``--`` flags are added: XLA stops reading ``XLA_FLAGS``
    at a token that is not one, which would silently drop every flag after it (for example a
    test's ``--xla_force_host_platform_device_count``).
    """
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_cpu_multi_thread_eigen" not in flags:
        eigen = "false" if threads == 1 else "true"
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen={eigen}".strip()

#: The time box of the running section (:func:`time_box`): ``(deadline, min_rounds)`` on
#: ``time.perf_counter``'s clock, or ``None`` (every requested round runs).
_TIME_BOX: list[tuple[float, int] | None] = [None]
#: Every :func:`interleaved_times` call the time box cut short: ``(requested, timed)`` rounds.
CUT_SHORT: list[tuple[int, int]] = []


@contextlib.contextmanager
def time_box(seconds: float | None, min_rounds: int = 3) -> Iterator[None]:
    """Within ``with time_box(seconds, min_rounds=3):``, :func:`interleaved_times` stops
    timing new rounds once ``seconds`` have passed since the ``with`` began, after at least
    ``min_rounds`` timed rounds (or all requested, if fewer): repeats adapt to the time left
    in a section's budget, so a slower machine still finishes on time. Each call it cut short
    is appended to :data:`CUT_SHORT`; every figure's ``n`` is the rounds actually timed.
    ``seconds=None``: no box (every requested round runs)."""
    if min_rounds < 1:
        raise ValueError(f"time_box: min_rounds must be >= 1, got {min_rounds}")
    saved = _TIME_BOX[0]
    if seconds is not None:
        _TIME_BOX[0] = (time.perf_counter() + seconds, min_rounds)
    try:
        yield
    finally:
        _TIME_BOX[0] = saved


def interleaved_times(
    fns: Mapping[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 2,
    sync: Callable[[Any], None] | None = None,
    on_round: Callable[[], Any] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, calls interleaved round-robin.

    Inside a :class:`time_box` the rounds stop at its deadline (after its minimum count):
    each list then holds fewer than ``repeats`` entries, all from complete rounds.

    Args:
        fns: name -> function of no arguments (one unit of work).
        repeats: timed rounds (each function is called once per round), at most.
        warmup: untimed rounds first (allocations, caches, JIT compilation).
        sync: called with each function's return value before the clock stops
            (``jax.block_until_ready``); ``None`` when the work is synchronous.
        on_round: called after every round, warmup rounds included (a progress bar's
            ``update``): ``warmup + repeats`` calls in all.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            out = fns[name]()
            if sync is not None:
                sync(out)
        if on_round is not None:
            on_round()
    times: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection landing in one implementation's call is noise
    try:
        box = _TIME_BOX[0]
        for r in range(repeats):
            if box is not None and r >= min(box[1], repeats) and time.perf_counter() > box[0]:
                CUT_SHORT.append((repeats, r))
                break
            # Rotate the order every round: no implementation always runs right after another.
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                t0 = time.perf_counter()
                out = fns[name]()
                if sync is not None:
                    sync(out)
                times[name].append(time.perf_counter() - t0)
            if on_round is not None:
                on_round()
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def paired_ratio(
    a: list[float], b: list[float], *, n_boot: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Median of the per-round ratios ``a[i] / b[i]`` and a 95% bootstrap interval of it.

    ``a`` and ``b`` come from the same :func:`interleaved_times` run, so round ``i`` of each
    saw the same machine load: the per-round ratio cancels a drift that the ratio of the two
    medians keeps. The interval resamples rounds (percentile bootstrap, fixed seed).
    """
    import numpy as np

    if len(a) != len(b) or not a:
        raise ValueError(f"paired_ratio needs two equal, non-empty lists, got {len(a)} and {len(b)}")
    r = np.asarray(a, dtype=np.float64) / np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    boots = np.median(r[rng.integers(0, len(r), size=(n_boot, len(r)))], axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"median": float(np.median(r)), "ci95_low": float(lo), "ci95_high": float(hi),
            "n": len(r)}


def summarize(samples: list[float]) -> dict[str, float]:
    """Median, quartiles, min and count of a list of seconds (reported in milliseconds)."""
    ms = sorted(1e3 * s for s in samples)
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {
        "median_ms": statistics.median(ms),
        "q1_ms": q[0],
        "q3_ms": q[2],
        "min_ms": ms[0],
        "n": len(ms),
    }


def peak_rss_bytes() -> int | None:
    """The largest resident set size this process has had so far (max RSS), in bytes;
    ``None`` where the platform does not say (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux: KiB


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: The distribution that installs a module, where its name differs.
_DISTRIBUTIONS = {"sklearn": "scikit-learn", "sam_core": "sam-opt"}


def _version(module: str) -> str | None:
    """The installed version of ``module`` (``None``: not installed), from the package
    metadata when the module is not imported yet: importing JAX, Flax, scikit-learn and
    pytorch_optimizer only to read their versions cost a run several seconds."""
    if module not in sys.modules:
        try:
            return importlib.metadata.version(_DISTRIBUTIONS.get(module, module))
        except importlib.metadata.PackageNotFoundError:
            pass  # e.g. a source checkout on sys.path: import it
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    version = getattr(mod, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(module)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
    return str(version)


def _nvidia_driver() -> str | None:
    """The NVIDIA driver's version as ``nvidia-smi`` reports it (``None`` without it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def machine_info(threads: int) -> dict[str, Any]:
    """What the machine is (CPU model, logical CPUs, GPU if any, OS and architecture), the
    thread count, Python and library versions (``None``: missing); never its host name or a
    path on it."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
    }
    for name in ("torch", "jax", "jaxlib", "optax", "flax", "pytorch_optimizer", "numpy", "sklearn",
                 "sam_core"):
        info[name] = _version(name)
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
            info["cuda"] = torch.version.cuda
            info["cudnn"] = torch.backends.cudnn.version()
            info["gpu_driver"] = _nvidia_driver()
    except Exception:
        pass
    return info
