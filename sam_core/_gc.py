r"""Gradient centralization (GC), the ``gc=True`` option of every SAM-family form.

Yong et al., "Gradient Centralization: A New Optimization Technique for Deep Neural
Networks", ECCV 2020: each gradient of two or more dimensions (a weight matrix, a
convolution kernel) loses its mean over all dimensions but the first (the output one),

.. math::

    \Phi(g)_{j, \dots} = g_{j, \dots} - \operatorname{mean}_{i_1, \dots, i_{n-1}}
    g_{j, i_1, \dots, i_{n-1}}

(``g - g.mean(dim=(1, ..., n-1), keepdim=True)``), and one-dimensional gradients (biases,
normalization parameters) and scalars stay as they are. The SAM family applies it as ``pytorch_optimizer``'s GCSAM (``SAM(use_gc=True)``)
does: to the clean gradient, before the perturbation is formed from it, so :math:`e` is
built from :math:`\Phi(g)`; the gradient at :math:`w + e` that the base optimizer applies
is left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from sam_core._ops import ArrayListOps

__all__ = ["centralize", "centralized_axes"]

A = TypeVar("A")
S = TypeVar("S")


def centralized_axes(shape: Sequence[int]) -> tuple[int, ...]:
    """The axes GC averages over for an array of ``shape``: all but the first, or none.

    ``(out, in)`` -> ``(1,)``; ``(out, in, kh, kw)`` -> ``(1, 2, 3)``; ``(n,)`` and ``()`` ->
    ``()`` (left unchanged).
    """
    return tuple(range(1, len(shape))) if len(shape) >= 2 else ()


def centralize(ops: ArrayListOps[A, S], grads: Sequence[A], out: Sequence[A] | None = None) -> list[A]:
    r"""Gradient centralization of each array: :math:`g - \operatorname{mean}_{1..n-1}(g)`.

    Arrays of fewer than two dimensions are returned unchanged. ``out`` may alias
    ``grads`` (in place, as ``pytorch_optimizer``'s ``centralize_gradient``).
    """
    axes = [centralized_axes(tuple(g.shape)) for g in grads]  # type: ignore[attr-defined]
    return ops.subtract_mean(grads, axes, out=out)
