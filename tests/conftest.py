"""Settings shared by every test process.

Under pytest-xdist (``make test`` runs ``-n 2``) each worker limits torch and XLA to one
intra-op thread: the workers already keep the cores busy, and more threads per worker would
only oversubscribe them. Set here, before any test module imports torch or JAX (the pools
read the environment when they start); subprocesses the tests start inherit it. A serial run
(``-n 0`` / ``-p no:xdist``) keeps the libraries' defaults. Tests that change the thread
count themselves (the examples' ``--threads``) restore it afterwards.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _one_thread_per_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    if "torch" in sys.modules:  # imported by a plugin before this file: set it directly
        sys.modules["torch"].set_num_threads(1)


def _quick_xla_compiles() -> None:
    """The tests' JAX programs are tiny, so compiling them costs far more than running them.
    XLA's CPU backend compiles them without LLVM's optimizations (``make test`` measured a
    third less CPU time on the JAX tests) and with its elemental IR emitters rather than its
    newer fusion emitters (the SAM step of a WRN-10-1 compiled in 1.2 s instead of 4.5 s).
    Both choose how XLA generates machine code for the same HLO, not what it computes: every
    program of a test, and the references it is compared with, compiles the same way. A
    user's XLA_FLAGS that set either win."""
    for flag, value in (("--xla_backend_optimization_level", "0"),
                        ("--xla_cpu_use_fusion_emitters", "false")):
        flags = os.environ.get("XLA_FLAGS", "")
        if flag not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {flag}={value}".strip()


def _compilation_cache() -> None:
    """JAX's persistent compilation cache for the test processes, in the clone's ignored
    ``runs/.cache/jax-tests/``: the same program compiled by several tests (the examples'
    steps, the reference steps) is compiled once and loaded after that, in this run and the
    next. An executable is keyed on the program, the XLA flags and the jax/jaxlib version,
    so a cached one is the one a compile would give. ``SAM_TEST_JAX_CACHE=0`` turns it off;
    a user's own ``JAX_COMPILATION_CACHE_DIR`` wins."""
    if os.environ.get("SAM_TEST_JAX_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    folder = Path(__file__).resolve().parents[1] / "runs" / ".cache" / "jax-tests"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only clone: compile every time
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)
    # every program: the tests' programs compile in well under JAX's 1-second default
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


_quick_xla_compiles()
_compilation_cache()
if os.environ.get("PYTEST_XDIST_WORKER"):
    _one_thread_per_worker()
