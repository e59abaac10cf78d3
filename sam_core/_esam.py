r"""ESAM's two rules, written once: stochastic weight perturbation and data selection.

Du et al., "Efficient Sharpness-aware Minimization for Improved Training of Neural
Networks", ICLR 2022 (official code: github.com/dydjw9/Efficient_SAM, ``utils/Esam.py``).

*Stochastic weight perturbation* (SWP): a random mask :math:`m` keeps each weight with
probability :math:`\beta`, and the perturbation is SAM's (or ASAM's) formed from the masked
gradient with the radius scaled by :math:`1/\beta`:

.. math::

    e = \frac{\rho}{\beta}\, \frac{T_w^2 (m \odot g)}{\lVert T_w (m \odot g) \rVert + \epsilon},
    \qquad m_i \sim \mathrm{Bernoulli}(\beta).

The norm is that of the *masked* gradient, as in the official code (its masked weights
carry a zero clean gradient, so its ``_grad_norm`` sums the kept ones only): the
perturbation has length :math:`\rho / \beta` on the kept weights. The official code draws
one Bernoulli per parameter *tensor* (``random.random() > beta`` per ``p``), which is what
lets it skip those tensors' weight gradients in the clean backward; the paper's formula is
written per weight. Both are this rule: a mask per element, or one 0/1 per tensor.

*Sharpness-sensitive data selection* (SDS): with the per-example losses
:math:`\ell_i(w)` and :math:`\ell_i(w + e)` of the batch, the perturbed gradient is taken on
the :math:`k = \lfloor \gamma B \rfloor` examples (at least one) whose loss rises most,

.. math::

    \mathcal{B}^+ = \operatorname{top-}k_i\, \bigl(\ell_i(w + e) - \ell_i(w)\bigr), \qquad
    u = \nabla_w \frac{1}{k} \sum_{i \in \mathcal{B}^+} \ell_i(w + e).

The official code takes the examples strictly above the :math:`k`-th largest increase
(so :math:`k - 1` of them) and the whole batch when :math:`\gamma \ge 0.99`; here it is
exactly :math:`k` (:func:`sds_count`), and :math:`\gamma = 1` is the whole batch.
:math:`\beta = \gamma = 1` is SAM.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sam_core._math import perturbed_params
from sam_core._ops import ArrayListOps
from sam_core._validation import _concrete_float

__all__ = [
    "esam_perturbed_params",
    "sds_count",
    "sds_select",
    "swp_masked_gradient",
    "swp_rho",
    "validate_esam",
]

A = TypeVar("A")
S = TypeVar("S")


def swp_rho(rho: Any, beta: Any) -> Any:
    r"""SWP's radius :math:`\rho / \beta` (the kept weights carry the whole perturbation)."""
    return rho / beta


def swp_masked_gradient(
    ops: ArrayListOps[A, S],
    grads: Sequence[A],
    masks: Sequence[A],
    out: Sequence[A] | None = None,
) -> list[A]:
    r""":math:`m \odot g`: each gradient times its 0/1 mask (an array of its shape, or one
    value per tensor where the backend broadcasts it; a backend may instead zero the
    gradients of the tensors whose mask is 0, the same rule). ``out`` may alias ``grads``."""
    return ops.mul(grads, masks, out=out)


def esam_perturbed_params(
    ops: ArrayListOps[A, S],
    params: Sequence[A],
    grads: Sequence[A],
    masks: Sequence[A],
    *,
    rho: Any,
    beta: Any,
    adaptive: bool = False,
    eta: Any = 0.01,
    eps: Any = 1e-12,
) -> tuple[list[A], S]:
    r"""SWP's perturbed point :math:`w + e` and the norm :math:`\lVert T_w (m \odot g)
    \rVert`, with :math:`e` as in the module docstring (one group; a backend with several
    sums the squared norms first, as for SAM)."""
    masked = swp_masked_gradient(ops, grads, masks)
    return perturbed_params(
        ops, params, masked, rho=swp_rho(rho, beta), adaptive=adaptive, eta=eta, eps=eps
    )


def sds_count(batch_size: int, gamma: float) -> int:
    r""":math:`k = \max(1, \lfloor \gamma B \rfloor)`, the number of examples SDS keeps.

    The floor is taken with a tolerance of :math:`10^{-9}` so that ``gamma = 0.29`` of 100
    examples keeps 29 (``0.29 * 100`` is ``28.999...`` in binary floating point).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"the batch must hold at least one example (per-example losses of shape (B,), "
            f"B >= 1), got B={batch_size!r}"
        )
    return max(1, min(batch_size, math.floor(gamma * batch_size + 1e-9)))


def sds_select(
    clean_losses: A,
    perturbed_losses: A,
    k: int,
    *,
    top_k: Callable[[A, int], A],
    sort: Callable[[A], A],
) -> A:
    r"""The indices of the :math:`k` examples whose loss rises most from :math:`w` to
    :math:`w + e`, in increasing order.

    ``clean_losses`` and ``perturbed_losses`` are the per-example losses
    :math:`\ell_i(w)`, :math:`\ell_i(w + e)` (shape ``(B,)``); ``top_k(x, k)`` is the
    backend's indices of the ``k`` largest entries (``torch.topk(x, k).indices``,
    ``jax.lax.top_k(x, k)[1]``), ``sort`` its ascending sort, so that the result has a
    fixed shape ``(k,)`` (jit-friendly) and the same order in every backend. Ties are
    broken as the backend's ``top_k`` breaks them.
    """
    return sort(top_k(perturbed_losses - clean_losses, k))


def validate_esam(*, beta: Any, gamma: Any, mask: Any = "tensor", seed: Any = 0) -> None:
    """Raise ``ValueError`` unless ESAM's ``beta`` and ``gamma`` are in (0, 1] and ``mask`` is
    ``"tensor"`` or ``"element"``; ``TypeError`` unless ``seed`` is an int (both backends)."""
    if mask not in ("tensor", "element"):
        raise ValueError(
            f"mask must be 'tensor' (one draw per parameter tensor or pytree leaf, the official "
            f"code's) or 'element' (one per weight), got {mask!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    for name, value in (("beta", beta), ("gamma", gamma)):
        number = _concrete_float(name, value)
        if number is None:
            raise TypeError(f"{name} must be a concrete number in (0, 1], got {value!r}")
        if not (0.0 < number <= 1.0):
            fix = (
                "the fraction of weights perturbed (1: every weight, SAM)"
                if name == "beta"
                else "the fraction of the batch the perturbed gradient is taken on (1: SAM)"
            )
            raise ValueError(f"{name} must be a number in (0, 1], {fix}; got {value!r}")
