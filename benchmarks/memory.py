"""Section 3, memory: the parameter-sized buffers each SAM keeps beyond its base optimizer.

Torch: every tensor storage reachable from the optimizer object that is not a parameter or a
gradient, after a step and between ``first_step`` and ``second_step``, less the base SGD's.
JAX: the optimizer-state leaves beyond ``optax.sgd``'s. Deterministic: no repeats, and the
quick run measures the same parameter set as the full one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from benchmarks import overhead
from benchmarks._common import LR, RHO, jax_side, jax_unavailable, pytorch_optimizer, torch_wrn

TITLE = "3. Memory"
ESTIMATE_S = {"smoke": 3, "quick": 5, "full": 5}


def _held_bytes(opt: Any, exclude: set[int]) -> int:
    """Bytes of distinct tensor storages reachable from the optimizer (not params/grads)."""
    seen: set[int] = set(exclude)
    seen_obj: set[int] = set()
    total = 0
    stack: list[Any] = [opt]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            if st.data_ptr() not in seen and st.nbytes() > 0:
                seen.add(st.data_ptr())
                total += st.nbytes()
            continue
        if id(obj) in seen_obj:
            continue
        seen_obj.add(id(obj))
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif isinstance(obj, torch.optim.Optimizer):
            stack.extend(vars(obj).values())
    return total


def _param_ptrs(params: list[torch.Tensor]) -> set[int]:
    ptrs = set()
    for p in params:
        ptrs.add(p.untyped_storage().data_ptr())
        if p.grad is not None:
            ptrs.add(p.grad.untyped_storage().data_ptr())
    return ptrs


def memory_torch(config: Mapping[str, Any], progress: Any) -> dict[str, Any]:
    s = overhead.sizes(config)
    po, _ = pytorch_optimizer()
    model, _ = torch_wrn(s["depth"], s["width"])
    shapes = [p.shape for p in model.parameters()]
    del model
    param_bytes = sum(math.prod(sh) for sh in shapes) * 4
    rows: dict[str, Any] = {}
    base_persist = None
    bar = progress(total=2 * len(overhead.overhead_impls(po, False)), desc="optimizers")
    for adaptive in (False, True):
        builders = overhead.overhead_impls(po, adaptive)
        for name, build in builders.items():
            bar.update()
            if adaptive and name == "base SGD step":
                continue
            params = overhead.param_set(shapes, seed=0)
            opt = build(params)
            step = overhead.one_step(opt)
            step()  # persistent state exists after the first step
            persist = _held_bytes(opt, _param_ptrs(params))
            perturbed = None
            if hasattr(opt, "first_step"):
                opt.first_step()
                perturbed = _held_bytes(opt, _param_ptrs(params))
                opt.second_step()
            key = f"{name} ({'ASAM' if adaptive else 'SAM'})" if name != "base SGD step" else name
            if name == "base SGD step":
                base_persist = persist
            rows[key] = {"held_bytes": persist, "held_while_perturbed_bytes": perturbed}
            del opt, params, step
    bar.close()
    assert base_persist is not None
    for row in rows.values():
        row["extra_buffers"] = (row["held_bytes"] - base_persist) / param_bytes
        if row["held_while_perturbed_bytes"] is not None:
            row["extra_buffers_while_perturbed"] = (
                row["held_while_perturbed_bytes"] - base_persist) / param_bytes
    return {"parameter_bytes": param_bytes, "rows": rows}


def memory_jax(config: Mapping[str, Any]) -> dict[str, Any]:
    s = overhead.sizes(config)
    J = jax_side()
    jax = J.jax
    model = J.WideResNet(s["depth"], s["width"])
    variables = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), J.jnp.zeros((1, 32, 32, 3)), train=False))
    params = variables["params"]

    def nbytes(tree: Any) -> int:
        return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))

    param_bytes = nbytes(params)
    steps = J.steps(model, RHO, False, LR)
    base = nbytes(jax.eval_shape(steps["optax.sgd:tx"].init, params))
    rows = {}
    for name in ("sam_jax", "optax.contrib.sam opaque", "optax.contrib.sam alternating"):
        if name + ":tx" in steps:
            held = nbytes(jax.eval_shape(steps[name + ":tx"].init, params))
            rows[name] = {"state_bytes": held, "extra_buffers": (held - base) / param_bytes}
    return {"parameter_bytes": param_bytes, "base_state_bytes": base, "rows": rows,
            "note": "optimizer-state leaves only; the perturbed parameters w + e are a "
                    "temporary inside the jitted step for every implementation"}


def run(config: Mapping[str, Any], progress: Any) -> dict[str, Any]:
    """``{"torch": ..., "jax": ...}``, each ``{"parameter_bytes", "rows"}`` or ``{"skipped"}``."""
    out: dict[str, Any] = {}
    if "torch" in config.get("backends", ("torch", "jax")):
        out["torch"] = memory_torch(config, progress)
    else:
        out["torch"] = {"skipped": "--backends jax"}
    why = jax_unavailable(config)
    out["jax"] = {"skipped": why} if why else memory_jax(config)
    return out
