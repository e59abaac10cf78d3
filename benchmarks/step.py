"""Section 2, the whole training step on a WideResNet with a CIFAR-shaped random batch:
SAM against SGD in torch (sam_torch, ``pytorch_optimizer.SAM``) and in JAX (sam_jax,
``optax.contrib.sam`` opaque and alternating, and an A/A control: the opaque step compiled a
second time, whose distance from the first copy is the noise floor of the comparison).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import sam_torch
from benchmarks._common import (
    AA_CONTROL,
    LR,
    MOMENTUM,
    RHO,
    WEIGHT_DECAY,
    device_of,
    jax_side,
    jax_unavailable,
    pytorch_optimizer,
    sized,
    sync_for,
    torch_wrn,
)
from benchmarks._timing import interleaved_times, paired_ratio, summarize

TITLE = "2. Whole training step"
#: WRN depth and width, batch, timed rounds (``--repeats N`` sets N/2, at least 3). On a GPU
#: the CPU's WRN-16-2 at batch 64 would time kernel launches, not the step: the whole step is
#: measured on WRN-16-8 at batch 128, the CIFAR recipe's model and batch.
SIZES = {
    "smoke": {"depth": 10, "width": 1, "batch": 8, "repeats": 2},
    "quick": {"depth": 10, "width": 2, "batch": 32, "repeats": 4},
    "full": {"depth": 16, "width": 2, "batch": 64, "repeats": 20},
    "gpu": {"depth": 16, "width": 8, "batch": 128, "repeats": 30},
}
ESTIMATE_S = {"smoke": 25, "quick": 45, "full": 160}
WARMUP = 2


def sizes(config: Mapping[str, Any]) -> dict[str, int]:
    s = dict(sized(config, SIZES))
    if config.get("repeats"):
        s["repeats"] = max(3, int(config["repeats"]) // 2)
    return s


STEP_NAMES = ("optax.sgd", "sam_jax", "optax.contrib.sam opaque", AA_CONTROL,
              "optax.contrib.sam alternating")


def _torch_batch(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return x, y


def _rows_against(times: Mapping[str, Any], base: str) -> dict[str, dict[str, Any]]:
    """Each step's timing summary with ``ratio_to_sgd``, its median over ``base``'s."""
    base_ms = summarize(times[base])["median_ms"]
    rows = {}
    for name, ts in times.items():
        r = summarize(ts)
        r["ratio_to_sgd"] = r["median_ms"] / base_ms
        rows[name] = r
    return rows


def step_torch(config: Mapping[str, Any], progress: Any) -> dict[str, Any]:
    s = sizes(config)
    device = device_of(config)
    po, _ = pytorch_optimizer()
    torch.manual_seed(0)
    model0, source = torch_wrn(s["depth"], s["width"])
    model0 = model0.to(device)
    x, y = (t.to(device) for t in _torch_batch(s["batch"]))
    kw = dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def loss_of(m: torch.nn.Module) -> torch.Tensor:
        return F.cross_entropy(m(x), y)

    fns: dict[str, Callable[[], Any]] = {}
    m_sgd = copy.deepcopy(model0)
    sgd = torch.optim.SGD(m_sgd.parameters(), foreach=True, **kw)

    def sgd_step() -> None:
        sgd.zero_grad()
        loss_of(m_sgd).backward()
        sgd.step()

    fns["torch SGD"] = sgd_step

    def sam_step_fn(m: torch.nn.Module, opt: Any) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad()
            loss_of(m).backward()
            opt.first_step(zero_grad=True)
            with sam_torch.disable_running_stats(m):
                loss_of(m).backward()
            opt.second_step(zero_grad=True)
        return run

    m_ours = copy.deepcopy(model0)
    fns["sam_torch"] = sam_step_fn(
        m_ours, sam_torch.SAM(m_ours.parameters(), torch.optim.SGD, rho=RHO, foreach=True, **kw))
    if po is not None:
        m_po = copy.deepcopy(model0)
        fns["pytorch_optimizer.SAM foreach=True"] = sam_step_fn(
            m_po, po.SAM(m_po.parameters(), torch.optim.SGD, rho=RHO, foreach=True, **kw))
    bar = progress.tick(WARMUP + s["repeats"], f"torch step, {len(fns)} optimizers")
    times = interleaved_times(fns, repeats=s["repeats"], warmup=WARMUP, sync=sync_for(device),
                              on_round=bar.update)
    bar.close()
    rows = _rows_against(times, "torch SGD")
    return {"model": f"WRN-{s['depth']}-{s['width']} ({source})",
            "batch": s["batch"], "repeats": min(len(ts) for ts in times.values()),
            "device": str(device), "rows": rows}


def step_jax(config: Mapping[str, Any], progress: Any) -> dict[str, Any]:
    s = sizes(config)
    J = jax_side()
    jax, jnp = J.jax, J.jnp
    model = J.WideResNet(s["depth"], s["width"])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((s["batch"], 32, 32, 3), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 10, s["batch"]))
    variables = model.init(jax.random.PRNGKey(0), x[:1], train=False)
    steps = J.steps(model, RHO, False, LR, WEIGHT_DECAY, names=STEP_NAMES)
    fns: dict[str, Callable[[], Any]] = {}
    work = {}
    names = [n for n in STEP_NAMES if n in steps]
    compiling = progress.tick(len(names), f"JAX step, compiling {len(names)} steps")
    for name in names:
        step, tx = steps[name], steps[name + ":tx"]
        carry = [variables["params"], variables["batch_stats"], tx.init(variables["params"])]
        # Compiled here, once: the executable that is timed is the one cost-analysed.
        step = step.lower(*carry, x, y).compile()
        if name in ("sam_jax", "optax.contrib.sam opaque"):
            work[name] = _compiled_cost(step)
        calls = 2 if name.endswith("alternating") else 1  # one SAM step = two calls there

        def run(step: Any = step, carry: list[Any] = carry, calls: int = calls) -> Any:
            for _ in range(calls):
                p, s, st, value = step(carry[0], carry[1], carry[2], x, y)
                carry[:] = [p, s, st]
            return value, p  # block on the new parameters too, not only on the loss

        fns[name] = run
        compiling.update(1)
    compiling.close()
    bar = progress.tick(WARMUP + s["repeats"], f"JAX step, {len(fns)} steps")
    times = interleaved_times(fns, repeats=s["repeats"], warmup=WARMUP,
                              sync=jax.block_until_ready, on_round=bar.update)
    bar.close()
    rows = _rows_against(times, "optax.sgd")
    if "optax.contrib.sam opaque" in rows and "sam_jax" in rows:
        rows["sam_jax"]["ratio_to_optax_opaque"] = (
            rows["sam_jax"]["median_ms"] / rows["optax.contrib.sam opaque"]["median_ms"])
        # Round i of both ran back to back: the per-round ratio cancels load drift.
        rows["sam_jax"]["paired_ratio_to_optax_opaque"] = paired_ratio(
            times["sam_jax"], times["optax.contrib.sam opaque"])
        if AA_CONTROL in rows:
            rows[AA_CONTROL]["paired_ratio_to_optax_opaque"] = paired_ratio(
                times[AA_CONTROL], times["optax.contrib.sam opaque"])
    out = {"model": f"WRN-{s['depth']}-{s['width']} (examples.wrn_flax)",
           "batch": s["batch"], "repeats": min(len(ts) for ts in times.values()),
           "device": str(jax.devices()[0]),
           "rows": rows}
    if len(work) == 2 and all(work.values()):
        a, b = work["sam_jax"], work["optax.contrib.sam opaque"]
        out["compiled_work"] = {"sam_jax": a, "optax.contrib.sam opaque": b,
                                "flops_ratio": a["flops"] / b["flops"],
                                "bytes_ratio": a["bytes accessed"] / b["bytes accessed"]}
    return out


def _compiled_cost(compiled: Any) -> dict[str, float] | None:
    """XLA's cost analysis of a compiled step (flops, bytes accessed): the work it compiles
    to, a deterministic figure beside the timings; ``None`` where the backend gives none."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # an optional figure: the timings do not depend on it
        return None
    cost = cost[0] if isinstance(cost, list) else cost
    if not cost or "flops" not in cost or "bytes accessed" not in cost:
        return None
    return {"flops": float(cost["flops"]), "bytes accessed": float(cost["bytes accessed"])}


def run(config: Mapping[str, Any], progress: Any) -> dict[str, Any]:
    """``{"torch": ..., "jax": ...}``, each ``{"model", "batch", "rows", ...}`` or
    ``{"skipped"}``."""
    out: dict[str, Any] = {}
    if "torch" in config.get("backends", ("torch", "jax")):
        out["torch"] = step_torch(config, progress)
    else:
        out["torch"] = {"skipped": "--backends jax"}
    why = jax_unavailable(config)
    out["jax"] = {"skipped": why} if why else step_jax(config, progress)
    return out
