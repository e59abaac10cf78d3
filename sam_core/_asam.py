r"""ASAM with a per-parameter choice of neighbourhood: the official ASAM recipe's perturbation.

The official ASAM code (Kwon et al., ICML 2021, SamsungLabs/ASAM) scales the gradient by
:math:`T_w = |w| + \eta` only for the parameters it treats as weights (those whose name
contains ``"weight"``) and keeps :math:`T_w = 1` for the others (biases), all under one
norm:

.. math::

    e_i = \rho \frac{T_i^2 g_i}{\lVert T g \rVert_2 + \epsilon}, \qquad
    T_i = \begin{cases} |w_i| + \eta & i \text{ adaptive} \\ 1 & \text{otherwise,} \end{cases}

with the norm over every parameter (the official code adds :math:`\epsilon = 10^{-16}`).
Which parameters are adaptive is the backends' business (``sam_torch.asam_param_groups``,
``sam_jax.asam_mask``); this is the math, as SAM's param groups compute it in torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from sam_core._math import apply_perturbation, direction_and_sq_norm, perturbation_scale
from sam_core._ops import ArrayListOps

__all__ = ["perturbed_params_mixed"]

A = TypeVar("A")
S = TypeVar("S")


def perturbed_params_mixed(
    ops: ArrayListOps[A, S],
    params: Sequence[A],
    grads: Sequence[A],
    adaptive: Sequence[bool],
    *,
    rho: Any,
    eta: Any = 0.01,
    eps: Any = 1e-12,
) -> tuple[list[A], S]:
    """:math:`w + e` with ASAM's :math:`T_w` on the ``adaptive`` parameters, SAM's on the
    others, one global norm; returns ``(w + e, norm)`` (``adaptive``: a Python bool per
    parameter)."""
    if len(adaptive) != len(params):
        raise ValueError(
            f"adaptive must hold one bool per parameter, got {len(adaptive)} for {len(params)}"
        )
    parts = []
    sq = None
    for flag in (True, False):
        idx = [i for i, a in enumerate(adaptive) if bool(a) is flag]
        if not idx:
            continue
        d, part_sq = direction_and_sq_norm(
            ops, [params[i] for i in idx], [grads[i] for i in idx], adaptive=flag, eta=eta
        )
        parts.append((idx, d))
        sq = part_sq if sq is None else sq + part_sq
    if sq is None:
        return list(params), ops.sum_of_squares([])
    norm = ops.sqrt(sq)
    scale = perturbation_scale(rho, norm, eps)
    out: list[Any] = list(params)
    for idx, d in parts:
        moved = apply_perturbation(ops, [params[i] for i in idx], d, scale)
        for i, x in zip(idx, moved, strict=True):
            out[i] = x
    return out, norm
