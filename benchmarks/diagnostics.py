"""Section 8 of the main job, diagnostics cost: Hessian-vector products and lambda_max.

On a WRN (``examples/wrn_torch.py``, ``examples/wrn_flax.py``) in eval mode, random
CIFAR-shaped data (the cost does not depend on the values), float32:

* one gradient evaluation (the unit every other figure is a multiple of);
* one Hessian-vector product (HVP) by each implementation: over one batch, with what does not
  depend on the vector built once and reused by every product (torch: the double backward
  through the gradient's retained graph, the default, and ``torch.func.vjp`` of the gradient;
  JAX: ``jax.linearize`` of the gradient, the default), and per product from the weights, as
  over several batches (torch: double backward, the default there too, and ``torch.func``
  forward-over-reverse; JAX: ``jvp`` of ``grad``, full size only);
* ``hessian_eigenvalues(k=1)`` with a fixed number of Lanczos iterations (``tol=0``: no early
  stop), in both backends;
* PyHessian's algorithm as its users run it, written here: the gradient built once with
  ``torch.autograd.grad(create_graph=True)``, then plain power iteration, each product a
  backward through that retained graph, for the same number of products.

Gradient and HVP timings interleave round-robin (the machine may be shared: a load that comes
and goes hits all alike); ratios are medians of per-round ratios. Peak memory: the rise of the
process's resident-set high-water mark (reset before each measurement, Linux) during one
lambda_max run (JAX's programs are compiled before it and reused).

``run(config, progress)`` takes the main job's config (``mode``: ``"smoke"`` WRN-10-1, batch 8,
3 iterations, torch only; ``"quick"`` the same with 3 rounds, both backends (JAX without the
per-product HVP, whose compilation would take a third of the quick budget); ``"full"``
WRN-16-2, batch 128, 20 iterations, both backends) and returns a JSON-ready dict; :func:`report`
renders it; :func:`targets` gives the issue's target (one HVP <= 2.5 gradients).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Mapping
from typing import Any

from benchmarks._timing import interleaved_times, machine_info, paired_ratio, summarize

__all__ = ["ESTIMATE_S", "SIZES", "TITLE", "report", "run", "targets"]

TITLE = "8. Diagnostics: cost of Hessian-vector products and lambda_max"

#: The HVP rows by implementation (torch): the default over one batch first.
TORCH_ROWS = {
    "double_backward": "HVP, double backward, graph built once (default, one batch)",
    "func": "HVP, torch.func vjp of grad, built once (one batch)",
    "double_backward_per_product": "HVP, double backward, per product (default, several batches)",
    "func_per_product": "HVP, torch.func jvp of grad, per product",
}
#: The HVP rows by implementation (JAX).
JAX_ROWS = {
    "linearized": "HVP, jvp of grad linearized once (default, one batch)",
    "per_product": "HVP, jvp of grad per product (several batches)",
}

SIZES: dict[str, dict[str, Any]] = {
    "smoke": {"depth": 10, "width": 1, "batch": 8, "iterations": 3, "repeats": 2, "jax": False},
    # JAX compiles each program of a WRN for seconds on CPU: the quick run compiles the
    # gradient and the linearized HVP (what Lanczos uses) only, not the per-product one.
    "quick": {"depth": 10, "width": 1, "batch": 8, "iterations": 3, "repeats": 3, "jax": True,
              "jax_per_product": False},
    "full": {"depth": 16, "width": 2, "batch": 128, "iterations": 20, "repeats": 5, "jax": True,
             "jax_per_product": True},
}
#: Expected seconds on 2 CPU cores (progress-bar ETA).
ESTIMATE_S = {"smoke": 10, "quick": 15, "full": 900}
#: The issue's target: one HVP costs at most this many gradient evaluations.
TARGET_HVP_RATIO = 2.5


def _peak_rise_kib(fn: Callable[[], Any]) -> tuple[Any, int | None]:
    """``fn()`` and the rise of the resident-set high-water mark while it ran (KiB)."""
    from benchmarks.msharpness import _reset_peak, _rss_kib

    try:
        if not _reset_peak():
            return fn(), None
        before = _rss_kib("VmRSS")
        out = fn()
        return out, max(_rss_kib("VmHWM") - before, 0)
    except OSError:
        return fn(), None


def pyhessian_power_iteration(model: Any, criterion: Any, x: Any, y: Any, iterations: int,
                              seed: int = 0) -> float:
    """The top eigenvalue as PyHessian computes it: power iteration on HVPs from one graph.

    The gradient is built once with ``create_graph=True``; each product is
    ``torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)``, the vector
    normalized, the eigenvalue the Rayleigh quotient ``v . Hv``.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    loss = criterion(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen).to(p) for p in params]
    norm = torch.sqrt(sum((t * t).sum() for t in v))
    v = [t / norm for t in v]
    eigenvalue = 0.0
    for _ in range(iterations):
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        eigenvalue = float(sum((a * b).sum() for a, b in zip(hv, v, strict=True)))
        norm = torch.sqrt(sum((t * t).sum() for t in hv))
        v = [t / norm for t in hv]
    return eigenvalue


def run_torch(cfg: dict[str, Any], progress: Any = None) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from examples.wrn_torch import WideResNet
    from sam_torch import diagnostics

    torch.manual_seed(0)
    model = WideResNet(cfg["depth"], cfg["width"]).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg["batch"], 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (cfg["batch"],), generator=gen)
    batch = [(x, y)]
    objectives = {m: diagnostics._Objective(model, F.cross_entropy, m, "eval")
                  for m in ("double_backward", "func")}
    v = [torch.randn_like(p) for p in objectives["func"].params]
    with objectives["func"], objectives["double_backward"]:
        # What a Lanczos run over one batch uses: built once, one product per call.
        reused = {m: o.hvp_operator(batch) for m, o in objectives.items()}
        fns = {
            "gradient": lambda: objectives["func"].value_and_grad(None, batch),
            TORCH_ROWS["double_backward"]: lambda: reused["double_backward"](v),
            TORCH_ROWS["func"]: lambda: reused["func"](v),
            # Over several batches each product starts from the weights, per batch.
            TORCH_ROWS["double_backward_per_product"]: lambda: objectives["double_backward"].hvp(v, batch),
            TORCH_ROWS["func_per_product"]: lambda: objectives["func"].hvp(v, batch),
        }
        times = interleaved_times(fns, repeats=cfg["repeats"], warmup=1,
                                  on_round=(lambda: progress.update(1)) if progress else None)
        reused.clear()  # frees the retained graphs before the lambda_max runs
    rows = {name: {**summarize(t), "ratio_to_gradient": paired_ratio(t, times["gradient"])}
            for name, t in times.items()}
    iters = cfg["iterations"]
    grad_ms = rows["gradient"]["median_ms"]
    runs: dict[str, Callable[[], float]] = {
        f"lambda_max, Lanczos {iters} iterations (sam_torch)": lambda: float(
            diagnostics.hessian_eigenvalues(model, F.cross_entropy, batch, k=1, max_iter=iters,
                                            tol=0.0)[0]),
        f"lambda_max, PyHessian-style power iteration, {iters} products": lambda: (
            pyhessian_power_iteration(model, F.cross_entropy, x, y, iters)),
    }
    for name, fn in runs.items():
        t0 = time.perf_counter()
        value, peak = _peak_rise_kib(fn)
        seconds = time.perf_counter() - t0
        rows[name] = {"seconds": seconds, "lambda_max": value, "peak_rss_rise_kib": peak,
                      "gradients": 1e3 * seconds / grad_ms,
                      "gradients_per_product": 1e3 * seconds / grad_ms / iters}
        if progress:
            progress.update(1)
    return {"model": f"WRN-{cfg['depth']}-{cfg['width']}", "batch": cfg["batch"], "device": "cpu",
            "params": sum(p.numel() for p in model.parameters()), "rows": rows}


def run_jax(cfg: dict[str, Any], progress: Any = None) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from examples.wrn_flax import WideResNet
    from sam_jax import diagnostics

    model = WideResNet(cfg["depth"], cfg["width"])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((cfg["batch"], 32, 32, 3), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 10, cfg["batch"]))
    variables = model.init(jax.random.PRNGKey(0), x[:1], train=False)
    stats = variables["batch_stats"]

    def loss_fn(params: Any, b: Any) -> Any:
        logits = model.apply({"params": params, "batch_stats": stats}, b[0], train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()

    params = variables["params"]
    batch = [(x, y)]
    obj = diagnostics._Objective(loss_fn, params)
    v = [jnp.ones_like(p) for p in obj.params]
    fns: dict[str, Callable[[], Any]] = {
        "gradient": lambda: obj._value_and_grad(obj.params, batch[0])}
    held = {"linearized": obj.hvp_operator(batch)}
    fns[JAX_ROWS["linearized"]] = lambda: held["linearized"](v)
    if cfg.get("jax_per_product", True):
        fns[JAX_ROWS["per_product"]] = lambda: obj._hvp(obj.params, v, batch[0])

    t0 = time.perf_counter()
    for fn in fns.values():
        jax.block_until_ready(fn())
    compile_s = time.perf_counter() - t0
    times = interleaved_times(fns, repeats=cfg["repeats"], warmup=1, sync=jax.block_until_ready,
                              on_round=(lambda: progress.update(1)) if progress else None)
    held.clear()  # frees the linearization's residuals before the lambda_max run
    rows: dict[str, Any] = {name: {**summarize(t), "ratio_to_gradient": paired_ratio(t, times["gradient"])}
                            for name, t in times.items()}
    iters = cfg["iterations"]
    t0 = time.perf_counter()
    # The programs are compiled above (same loss_fn: cached), so the peak is the run's own.
    value, peak = _peak_rise_kib(lambda: float(
        diagnostics.hessian_eigenvalues(loss_fn, params, batch, k=1, max_iter=iters, tol=0.0)[0]))
    seconds = time.perf_counter() - t0
    grad_ms = rows["gradient"]["median_ms"]
    rows[f"lambda_max, Lanczos {iters} iterations (sam_jax)"] = {
        "seconds": seconds, "lambda_max": value, "peak_rss_rise_kib": peak,
        "gradients": 1e3 * seconds / grad_ms, "gradients_per_product": 1e3 * seconds / grad_ms / iters}
    if progress:
        progress.update(1)
    return {"model": f"WRN-{cfg['depth']}-{cfg['width']}", "batch": cfg["batch"], "device": "cpu",
            "compile_s": compile_s, "params": obj.dim, "rows": rows}


def _config(config: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    from benchmarks._common import jax_unavailable, sized

    cfg = dict(sized(config, SIZES)) if "mode" in config else {**SIZES["quick"], **config}
    with_jax = cfg.pop("jax")
    if config.get("repeats"):
        cfg["repeats"] = int(config["repeats"])
    backends = [b for b in ("torch", "jax") if b in config.get("backends", ("torch", "jax"))]
    note = None
    if "jax" in backends:
        note = "not in the smoke run" if not with_jax else jax_unavailable(config)
        if note:
            backends.remove("jax")
    cfg["backends"] = backends
    return cfg, note


def run(config: Mapping[str, Any], progress: Any = None) -> dict[str, Any]:
    """Measure gradients, HVPs and lambda_max runs in each backend; JSON-ready figures."""
    import os

    cfg, note = _config(config)
    threads = int(config.get("threads") or os.environ.get("OMP_NUM_THREADS", "0") or 0) or os.cpu_count()
    result: dict[str, Any] = {
        "config": cfg, "machine": machine_info(threads),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if "mode" in config:
        result["mode"] = config["mode"]
    if note:
        result["jax"] = {"error": note}
    bar = progress.tick(2 * (cfg["repeats"] + 1) + 3, "diagnostics") if hasattr(progress, "tick") else progress
    for backend in cfg["backends"]:
        try:
            result[backend] = run_torch(cfg, bar) if backend == "torch" else run_jax(cfg, bar)
        except ImportError as exc:
            result[backend] = {"error": f"{type(exc).__name__}: {exc}"}
    if bar is not progress and bar is not None:
        bar.close()
    return result


def _fmt(row: dict[str, Any]) -> list[str]:
    if "median_ms" in row:
        r = row["ratio_to_gradient"]
        return [f"{row['median_ms']:.1f} ms", f"{r['median']:.2f}x [{r['ci95_low']:.2f}, {r['ci95_high']:.2f}]", "", ""]
    peak = row.get("peak_rss_rise_kib")
    return [f"{row['seconds']:.2f} s",
            f"{row['gradients']:.1f} gradients ({row['gradients_per_product']:.2f} per product)",
            f"{row['lambda_max']:.4g}", "" if peak is None else f"{peak / 1024:.0f} MiB"]


def report(result: dict[str, Any]) -> list[str]:
    """The section's part of ``report.md``."""
    from benchmarks.report import _table

    lines = []
    for backend in ("torch", "jax"):
        res = result.get(backend)
        if res is None:
            continue
        if "error" in res:
            lines += [f"### {backend}", "", f"not measured: {res['error']}", ""]
            continue
        head = f"### {backend}: {res['model']}, batch {res['batch']}, float32, eval mode"
        if "compile_s" in res:
            head += f" (gradient and HVP compiled in {res['compile_s']:.0f} s, not counted)"
        lines += [head, "", _table(["what", "time", "multiple of one gradient", "lambda_max",
                                    "peak RSS rise"],
                                   [[name, *_fmt(row)] for name, row in res["rows"].items()]), ""]
    for target, measured, holds in targets(result):
        lines.append(f"Target {target}: {measured}, {'holds' if holds else 'missed'}.")
    lines += ["", "Times are medians of interleaved rounds on a shared machine; a ratio's interval is "
              "a 95% bootstrap over rounds. A lambda_max run's multiple includes the Lanczos "
              "host arithmetic and building what the products reuse (the gradient's graph or "
              "linearization: about one gradient). \"Built once\" / \"linearized once\": "
              "what does not depend on the vector is computed once per call of a function over "
              "one batch and each product reuses it (forward, backward and their residuals: "
              "about two gradients per product); \"per product\": each product starts from "
              "the weights (three gradients' worth of passes), as over several batches. "
              "PyHessian's power iteration reuses its graph the same way.", ""]
    return lines


def targets(result: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """One HVP <= 2.5 gradient evaluations, per backend (the default over one batch)."""
    out: list[tuple[str, str, bool | None]] = []
    for backend, name in (("torch", TORCH_ROWS["double_backward"]), ("jax", JAX_ROWS["linearized"])):
        row = result.get(backend, {}).get("rows", {}).get(name)
        if row is None:
            continue
        ratio = row["ratio_to_gradient"]["median"]
        res = result[backend]
        out.append((f"{backend} HVP <= {TARGET_HVP_RATIO}x a gradient ({res['model']}, batch "
                    f"{res['batch']}, CPU)", f"{ratio:.2f}x", ratio <= TARGET_HVP_RATIO))
    return out
