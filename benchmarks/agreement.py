"""Section 4, cross-backend agreement: sam_torch and sam_jax from the same weights (converted
with ``examples.convert``) on the same batches, after a few SAM/ASAM steps, in float32 and
float64, with the float32 rounding of one backend alone as the scale to judge float32 by.

JAX's float64 is switched on for this section and back off when it ends.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import sam_torch
from benchmarks._common import (
    AGREE_LR,
    ASAM_RHO,
    MOMENTUM,
    RHO,
    jax_side,
    jax_unavailable,
    sized,
    torch_wrn,
)

TITLE = "4. Cross-backend agreement"
#: SAM steps per case, batch, and the (adaptive, dtype) cases: each case compiles a step, so
#: the smoke run covers each mode and each dtype once.
_ALL = ((False, "float32"), (False, "float64"), (True, "float32"), (True, "float64"))
SIZES = {
    "smoke": {"steps": 2, "batch": 4, "cases": ((False, "float64"), (True, "float32"))},
    "quick": {"steps": 3, "batch": 16, "cases": _ALL},
    "full": {"steps": 5, "batch": 16, "cases": _ALL},
}
ESTIMATE_S = {"smoke": 10, "quick": 20, "full": 25}


def run(config: Mapping[str, Any], progress: Any) -> dict[str, Any]:
    if "torch" not in config.get("backends", ("torch", "jax")):
        return {"skipped": "needs both backends: --backends jax"}
    why = jax_unavailable(config)
    if why:
        return {"skipped": f"needs both backends: {why}"}
    jax = jax_side().jax
    was_x64 = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    try:
        return agreement(config, progress)
    finally:  # the sections after this one time float32 programs
        jax.config.update("jax_enable_x64", was_x64)


def agreement(config: Mapping[str, Any], progress: Any) -> dict[str, Any]:
    """The comparison itself (JAX's float64 must be on)."""
    from examples.convert import torch_to_flax

    s = sized(config, SIZES)
    J = jax_side()
    jax, jnp = J.jax, J.jnp
    rows: dict[str, Any] = {}
    finals: dict[tuple[str, str], list[np.ndarray]] = {}
    for adaptive, dtype_name in progress(s["cases"], desc="cases (each compiles a step)"):
        tdtype, ndtype = getattr(torch, dtype_name), getattr(np, dtype_name)
        torch.manual_seed(1)
        model, _ = torch_wrn(10, 1)
        model = model.to(tdtype)
        flax_vars = torch_to_flax(model, dtype=ndtype)
        rho = ASAM_RHO if adaptive else RHO
        opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive,
                            lr=AGREE_LR, momentum=MOMENTUM)
        fmodel = J.WideResNet(10, 1)
        steps = J.steps(fmodel, rho, adaptive, AGREE_LR)
        step, tx = steps["sam_jax"], steps["sam_jax:tx"]
        params = jax.tree.map(jnp.asarray, flax_vars["params"])
        stats = jax.tree.map(jnp.asarray, flax_vars["batch_stats"])
        state = tx.init(params)
        rng = np.random.default_rng(2)
        for _ in range(s["steps"]):
            xb = rng.standard_normal((s["batch"], 32, 32, 3)).astype(ndtype)
            yb = rng.integers(0, 10, s["batch"])
            xt = torch.from_numpy(np.ascontiguousarray(xb.transpose(0, 3, 1, 2)))
            yt = torch.from_numpy(yb)
            opt.zero_grad()
            F.cross_entropy(model(xt), yt).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(xt), yt).backward()
            opt.second_step(zero_grad=True)
            params, stats, state, _ = step(params, stats, state, jnp.asarray(xb),
                                           jnp.asarray(yb))
        ref = [np.asarray(a, np.float64) for a in jax.tree.leaves(torch_to_flax(model)["params"])]
        got = [np.asarray(b, np.float64) for b in jax.tree.leaves(params)]
        mode = "ASAM" if adaptive else "SAM"
        finals[(mode, dtype_name)] = ref
        rows[f"{mode} {dtype_name}"] = {**_param_diffs(ref, got), "steps": s["steps"]}
    for mode in ("SAM", "ASAM"):
        if (mode, "float32") in finals and (mode, "float64") in finals:
            # The float32 rounding noise of one backend alone: the scale to judge float32 by.
            rows[f"{mode} float32: torch float32 vs torch float64"] = {
                **_param_diffs(finals[(mode, "float64")], finals[(mode, "float32")]),
                "steps": s["steps"]}
    return {"model": "WRN-10-1, random CIFAR-shaped data", "batch": s["batch"],
            "rows": rows,
            "definition": "`per tensor`: max over tensors of max|w_torch - w_jax| / "
                          "max|w_torch| (dominated by near-zero tensors such as biases); "
                          "`global`: ||w_torch - w_jax||_2 / ||w_torch||_2 over all parameters"}


def _param_diffs(ref: list[np.ndarray], got: list[np.ndarray]) -> dict[str, float]:
    per_tensor = max(float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))
                     for a, b in zip(ref, got, strict=True))
    num = math.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(ref, got, strict=True)))
    den = math.sqrt(sum(float(np.sum(a**2)) for a in ref))
    return {"max_rel_param_diff": per_tensor, "global_rel_l2_diff": num / max(den, 1e-300)}


