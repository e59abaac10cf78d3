r"""SAM and ASAM perturbation math, written once against :class:`~sam_core.ArrayListOps`.

SAM (Foret et al., 2021, "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR) evaluates the gradient at the worst-case point of an L2 ball of
radius :math:`\rho` around the weights, to first order:

.. math::

    e(w) = \rho \, \frac{g}{\lVert g \rVert_2 + \epsilon}, \qquad g = \nabla L(w).

ASAM (Kwon et al., 2021, "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
Learning of Deep Neural Networks", ICML) makes the ball scale-invariant with the
element-wise operator :math:`T_w = |w| + \eta`:

.. math::

    e(w) = \rho \, \frac{T_w^2 \, g}{\lVert T_w \, g \rVert_2 + \epsilon}.

The official ASAM code uses :math:`\eta = 0.01`; :math:`\eta = 0` reproduces the adaptive
mode of the widely used PyTorch wrapper. With several parameter groups the norm is global
(over every group) while :math:`\rho`, the adaptive flag and :math:`\eta` may differ per
group; a group that is not adaptive has :math:`T_w = 1`.

The functions are split so that a backend can combine groups: :func:`direction_and_sq_norm`
per group, one :func:`perturbation_scale` from the summed squares, then
:func:`apply_perturbation` per group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from sam_core._ops import ArrayListOps

__all__ = [
    "apply_perturbation",
    "direction_and_sq_norm",
    "global_norm",
    "perturbation",
    "perturbation_scale",
    "perturbed_params",
]

A = TypeVar("A")
S = TypeVar("S")


def global_norm(ops: ArrayListOps[A, S], xs: Sequence[A]) -> S:
    r"""Global L2 norm over a list of arrays, :math:`\sqrt{\sum_i \lVert x_i \rVert^2}`.

    This is the norm ``torch.nn.utils.clip_grad_norm_`` and ``optax.global_norm`` compute.
    """
    return ops.sqrt(ops.sum_of_squares(xs))


def direction_and_sq_norm(
    ops: ArrayListOps[A, S],
    params: Sequence[A],
    grads: Sequence[A],
    *,
    adaptive: bool,
    eta: Any,
    out: Sequence[A] | None = None,
) -> tuple[list[A], S]:
    r"""The unnormalized ascent direction and its contribution to the squared norm.

    SAM: :math:`d = g` and :math:`\lVert g \rVert^2`.
    ASAM: :math:`d = T_w^2 g` and :math:`\lVert T_w g \rVert^2 = \langle T_w^2 g, g \rangle`
    with :math:`T_w = |w| + \eta`.

    For SAM ``d`` is ``grads`` itself (no copy); for ASAM it is written into ``out`` when given.
    """
    if not adaptive:
        return list(grads), ops.sum_of_squares(grads)
    t = ops.abs_add_square(params, eta, out=out)  # T_w^2 = (|w| + eta)^2
    d = ops.mul(t, grads, out=t)  # T_w^2 g
    # ||T_w g||^2 = <T_w^2 g, g>: one reduction over d and g, no second buffer for T_w g.
    return d, ops.dot(d, grads)


def perturbation_scale(rho: Any, grad_norm: Any, eps: Any) -> Any:
    r""":math:`\rho / (\lVert \cdot \rVert + \epsilon)`.

    A zero gradient gives a finite scale (:math:`\rho / \epsilon`) times a zero direction,
    so the perturbation is exactly zero, never NaN.
    """
    return rho / (grad_norm + eps)


def apply_perturbation(
    ops: ArrayListOps[A, S],
    params: Sequence[A],
    direction: Sequence[A],
    scale: S,
    out: Sequence[A] | None = None,
) -> list[A]:
    r""":math:`w + e` with :math:`e = \text{scale} \cdot d`, written into ``out`` when given."""
    return ops.add_scaled(params, direction, scale, out=out)


def perturbation(
    ops: ArrayListOps[A, S],
    params: Sequence[A],
    grads: Sequence[A],
    *,
    rho: Any,
    adaptive: bool = False,
    eta: Any = 0.01,
    eps: Any = 1e-12,
) -> tuple[list[A], S]:
    r"""The SAM/ASAM perturbation :math:`e(w)` of one group and the norm it was scaled by.

    Returns ``(e, norm)`` with ``norm`` :math:`= \lVert g \rVert` (SAM) or
    :math:`\lVert T_w g \rVert` (ASAM). See the module docstring for the formulas.
    """
    d, sq = direction_and_sq_norm(ops, params, grads, adaptive=adaptive, eta=eta)
    norm = ops.sqrt(sq)
    return ops.scale(d, perturbation_scale(rho, norm, eps)), norm


def perturbed_params(
    ops: ArrayListOps[A, S],
    params: Sequence[A],
    grads: Sequence[A],
    *,
    rho: Any,
    adaptive: bool = False,
    eta: Any = 0.01,
    eps: Any = 1e-12,
    out: Sequence[A] | None = None,
) -> tuple[list[A], S]:
    r"""The perturbed point :math:`w + e(w)` of one group and the norm, in one pass.

    With ``out`` (one preallocated array per parameter) no parameter-sized array is
    allocated: the ASAM direction and then :math:`w + e` are both written into ``out``.
    """
    d, sq = direction_and_sq_norm(ops, params, grads, adaptive=adaptive, eta=eta, out=out)
    norm = ops.sqrt(sq)
    return apply_perturbation(ops, params, d, perturbation_scale(rho, norm, eps), out=out), norm
