r"""SAM's perturbation fused by ``torch.compile``: sam_core's formulas in two kernels per tensor.

Eager PyTorch runs the element-wise operations of the ASAM direction
:math:`d = T_w^2 g` (``abs``, the square of ``+ eta``, ``mul``, ``dot``) as passes of
their own. Here the same :mod:`sam_core` functions are traced by ``torch.compile`` over a
:class:`FusibleOps` adapter (functional, reductions written as ``sum`` of products), so
Inductor fuses them into

1. one reduction reading :math:`w` and :math:`g`: :math:`\sum \langle d, g \rangle`
   (:math:`d` is never stored), and
2. one element-wise kernel reading :math:`w` and :math:`g` and writing :math:`w + s\,d`
   into the spare buffer.

The math is not re-derived: both traced functions call
:func:`sam_core.direction_and_sq_norm` and :func:`sam_core.apply_perturbation`.
The first call of a parameter set compiles (seconds to tens of seconds on CPU, a C++
compiler is needed there); if compilation fails, SAM warns once and runs the eager adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

import sam_core

__all__ = ["CompiledPerturbation", "FusibleOps"]


class FusibleOps:
    """Functional list-of-tensors operations in the form a compiler can fuse.

    No ``out=`` buffers, no BLAS calls: a reduction is the ``sum`` of an element-wise
    product, so the compiler can merge it with the element-wise work that feeds it.
    Reductions accumulate in float32 at least, like :class:`~sam_torch.TorchOps`.
    """

    def __init__(self, acc_dtype: torch.dtype) -> None:
        self.acc_dtype = acc_dtype

    def _acc(self, x: Tensor) -> Tensor:
        return x if x.dtype == self.acc_dtype else x.to(self.acc_dtype)

    def sum_of_squares(self, xs: Sequence[Tensor]) -> Tensor:
        return torch.stack([self._acc(x).square().sum() for x in xs]).sum()

    def dot(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
        return torch.stack(
            [(self._acc(x) * self._acc(y)).sum() for x, y in zip(xs, ys, strict=True)]
        ).sum()

    def sqrt(self, s: Tensor) -> Tensor:
        return torch.sqrt(s)

    def abs_add_square(self, xs: Sequence[Tensor], c: Any, out: Any = None) -> list[Tensor]:
        ts = [torch.abs(x) + c for x in xs]
        return [t * t for t in ts]

    def mul(self, xs: Sequence[Tensor], ys: Sequence[Tensor], out: Any = None) -> list[Tensor]:
        return [x * y for x, y in zip(xs, ys, strict=True)]

    def add_scaled(
        self, xs: Sequence[Tensor], ys: Sequence[Tensor], scale: Tensor, out: Any = None
    ) -> list[Tensor]:
        return [(x + scale * y).to(x.dtype) for x, y in zip(xs, ys, strict=True)]

    def scale(self, xs: Sequence[Tensor], s: Tensor, out: Any = None) -> list[Tensor]:
        return [(s * x).to(x.dtype) for x in xs]


def _sq_norm(
    params: list[Tensor], grads: list[Tensor], adaptive: bool, eta: float, acc_dtype: torch.dtype
) -> Tensor:
    ops = FusibleOps(acc_dtype)
    _, sq = sam_core.direction_and_sq_norm(ops, params, grads, adaptive=adaptive, eta=eta)
    return sq


def _perturb_into(
    params: list[Tensor],
    grads: list[Tensor],
    out: list[Tensor],
    scale: Tensor,
    adaptive: bool,
    eta: float,
    acc_dtype: torch.dtype,
) -> None:
    ops = FusibleOps(acc_dtype)
    d, _ = sam_core.direction_and_sq_norm(ops, params, grads, adaptive=adaptive, eta=eta)
    for o, v in zip(out, sam_core.apply_perturbation(ops, params, d, scale), strict=True):
        o.copy_(v)


class CompiledPerturbation:
    """The two compiled halves of SAM's ``first_step`` (one instance per optimizer).

    Compiled functions are cached by ``torch.compile`` per parameter set (shapes, dtypes,
    ``adaptive``, ``eta``); a changed set recompiles.
    """

    def __init__(self) -> None:
        self._sq_norm = torch.compile(_sq_norm, dynamic=False, fullgraph=True)
        self._perturb_into = torch.compile(_perturb_into, dynamic=False, fullgraph=True)

    def sq_norm(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        *,
        adaptive: bool,
        eta: float,
        acc_dtype: torch.dtype,
    ) -> Tensor:
        r""":math:`\lVert g \rVert^2` (SAM) or :math:`\lVert T_w g \rVert^2` (ASAM) of a group."""
        return self._sq_norm(params, grads, adaptive, float(eta), acc_dtype)

    def perturb_into(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        out: list[Tensor],
        scale: Tensor,
        *,
        adaptive: bool,
        eta: float,
        acc_dtype: torch.dtype,
    ) -> list[Tensor]:
        r"""Write :math:`w + \text{scale} \cdot d` into ``out`` and return it."""
        self._perturb_into(params, grads, out, scale, adaptive, float(eta), acc_dtype)
        return out
