"""Section 6, the SAM family: the cost of one training step of each variant (GSAM, SAM-ON,
FriendlySAM, VaSSO, WSAM, LookSAM, every-k, Momentum-SAM) as a ratio to an SGD step, with the
forward-backward passes per step counted through the closure (torch) or ``grad_fn`` (JAX).
The timing itself lives in :mod:`benchmarks.variants_cost`, which also runs alone.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import torch

from benchmarks import variants_cost
from benchmarks._common import jax_unavailable, sized

TITLE = "6. SAM family: cost per step"
#: Targets of the cheap variants, as a ratio to an SGD step.
TARGETS = {"looksam(k=5)": 1.25, "everyk(k=5)": 1.25, "msam": 1.05}
#: The JAX rows of the quick run: those with a target, and SGD and SAM to compare them with
#: (each JAX step form compiles once, most of the section's time on a CPU).
QUICK_JAX = ("sgd", "sam", "looksam(k=5)", "everyk(k=5)", "msam")
#: Conv-net width, batch, steps per timed block (a multiple of k), timed blocks, JAX rows
#: (``None``: all, ``()``: none; the smoke run is torch only).
SIZES = {
    "smoke": {"width": 8, "batch": 8, "steps": 5, "repeats": 1, "jax": ()},
    "quick": {"width": 16, "batch": 32, "steps": 5, "repeats": 3, "jax": QUICK_JAX},
    "full": {"width": 16, "batch": 32, "steps": 10, "repeats": 15, "jax": None},
    # the full run on a CUDA device (the GPU job): a wider net at batch 128
    "gpu": {"width": 64, "batch": 128, "steps": 10, "repeats": 20, "jax": None},
}
ESTIMATE_S = {"smoke": 10, "quick": 60, "full": 400}


def run(config: Mapping[str, Any], progress: Any) -> dict[str, Any]:
    """``{"model", "definition", "backends": {backend: {variant: {ms, ratio_to_sgd, passes}}}}``."""
    s = sized(config, SIZES)
    ns = argparse.Namespace(width=s["width"], batch=s["batch"], k=5, steps=s["steps"],
                            repeats=s["repeats"], threads=torch.get_num_threads())
    out: dict[str, Any] = {
        "model": f"6-conv BN net, width {ns.width}, batch {ns.batch}x3x32x32",
        "repeats": ns.repeats,
        "definition": (f"median over up to {ns.repeats} interleaved blocks of {ns.steps} "
                       "steps (a multiple of k, so LookSAM/every-k average full and one-pass "
                       "steps; fewer blocks where the section's time box ended them); "
                       "passes = forward-backward calls per step"),
        "backends": {},
    }
    backends = [b for b in ("torch", "jax") if b in config.get("backends", ("torch", "jax"))]
    if s["jax"] == () and "jax" in backends:
        backends.remove("jax")
        out["jax"] = "not in the smoke run"
    elif "jax" in backends and jax_unavailable(config):
        backends.remove("jax")
        out["jax"] = jax_unavailable(config)
    for backend in backends:
        if backend == "torch":
            bar = progress.tick(1 + ns.repeats, "torch variants, rounds of blocks of steps")
            res = variants_cost.torch_results(ns, on_block=bar.update, quiet=True)
        else:
            rows = variants_cost.JAX_VARIANTS if s["jax"] is None else len(s["jax"])
            bar = progress.tick(rows + ns.repeats, "JAX variants: compile each, then "
                                "rounds of blocks of steps")
            res = variants_cost.jax_results(ns, on_block=bar.update, quiet=True,
                                            names=s["jax"])
            if s["jax"] is not None:
                out["jax_rows"] = "the quick run's JAX rows: those with a target, SGD and SAM"
        bar.close()
        base = res["sgd"][0]
        out["backends"][backend] = {
            name: {"ms": 1e3 * sec, "ratio_to_sgd": sec / base, "passes": passes}
            for name, (sec, passes) in res.items()
        }
    return out
