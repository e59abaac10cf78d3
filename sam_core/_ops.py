"""The list-of-arrays operations the math is written against, and the NumPy adapter.

Every formula in :mod:`sam_core` is written once against :class:`ArrayListOps`: a handful
of element-wise operations on *lists* of arrays plus two reductions to a scalar. Each
backend supplies one adapter (``sam_torch`` on ``torch._foreach_*`` / fused per-tensor
kernels, ``sam_jax`` on ``jax.numpy``); :class:`NumpyOps` here computes in float64 and is
the oracle the tests compare the other adapters with.

Conventions every adapter follows:

* Scalars (norms, scales) stay the backend's array type (a 0-d tensor on the device, a
  JAX scalar): formulas combine them with ``+``, ``/`` and :meth:`ArrayListOps.sqrt`,
  never with Python ``float()``, so nothing forces a host sync or breaks tracing.
* ``out``, when given, is a list of preallocated arrays the result may be written into
  (it may alias an input; the result is then ``out`` itself). Functional backends ignore
  it and return new arrays. Callers always use the return value.
* Reductions accumulate in at least float32 (half/bfloat16 inputs are upcast).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

import numpy as np

__all__ = ["ArrayListOps", "NumpyOps"]

A = TypeVar("A")
S = TypeVar("S")


class ArrayListOps(Protocol[A, S]):  # pragma: no cover - a protocol has no body
    """Element-wise operations on lists of arrays of type ``A`` with scalars of type ``S``."""

    def sum_of_squares(self, xs: Sequence[A]) -> S:
        r""":math:`\sum_i \lVert x_i \rVert_2^2` over every array of the list."""
        ...

    def dot(self, xs: Sequence[A], ys: Sequence[A]) -> S:
        r""":math:`\sum_i \langle x_i, y_i \rangle`."""
        ...

    def sqrt(self, s: S) -> S:
        """Square root of a scalar."""
        ...

    def abs_add_square(self, xs: Sequence[A], c: Any, out: Sequence[A] | None = None) -> list[A]:
        """``(|x| + c)^2`` for each array (ASAM's :math:`T_w^2`), rounded as ``t = |x| + c``
        then ``t * t`` in the arrays' dtype."""
        ...

    def mul(self, xs: Sequence[A], ys: Sequence[A], out: Sequence[A] | None = None) -> list[A]:
        """``x * y`` for each pair."""
        ...

    def add_scaled(
        self, xs: Sequence[A], ys: Sequence[A], scale: S, out: Sequence[A] | None = None
    ) -> list[A]:
        """``x + scale * y`` for each pair; ``scale`` is a scalar."""
        ...

    def scale(self, xs: Sequence[A], s: S, out: Sequence[A] | None = None) -> list[A]:
        """``s * x`` for each array."""
        ...

    def subtract_mean(
        self, xs: Sequence[A], axes: Sequence[tuple[int, ...]], out: Sequence[A] | None = None
    ) -> list[A]:
        """``x - x.mean(axes, keepdims=True)`` for each array and its tuple of axes (``x``
        unchanged where the tuple is empty); the mean accumulates in at least float32."""
        ...


class NumpyOps:
    """Float64 NumPy adapter: slow, obviously correct, and the tests' oracle.

    Inputs are converted to float64 arrays; results are float64 whatever the input dtype.
    """

    @staticmethod
    def _f64(xs: Sequence[Any]) -> list[np.ndarray]:
        return [np.asarray(x, dtype=np.float64) for x in xs]

    def sum_of_squares(self, xs: Sequence[Any]) -> np.float64:
        return np.float64(sum(float(np.sum(x * x)) for x in self._f64(xs)))

    def dot(self, xs: Sequence[Any], ys: Sequence[Any]) -> np.float64:
        return np.float64(
            sum(float(np.sum(x * y)) for x, y in zip(self._f64(xs), self._f64(ys), strict=True))
        )

    def sqrt(self, s: Any) -> np.float64:
        return np.float64(np.sqrt(s))

    def abs_add_square(self, xs: Sequence[Any], c: Any, out: Any = None) -> list[np.ndarray]:
        ts = [np.abs(x) + np.float64(c) for x in self._f64(xs)]
        return [t * t for t in ts]

    def mul(self, xs: Sequence[Any], ys: Sequence[Any], out: Any = None) -> list[np.ndarray]:
        return [x * y for x, y in zip(self._f64(xs), self._f64(ys), strict=True)]

    def add_scaled(
        self, xs: Sequence[Any], ys: Sequence[Any], scale: Any, out: Any = None
    ) -> list[np.ndarray]:
        s = np.float64(scale)
        return [x + s * y for x, y in zip(self._f64(xs), self._f64(ys), strict=True)]

    def scale(self, xs: Sequence[Any], s: Any, out: Any = None) -> list[np.ndarray]:
        return [np.float64(s) * x for x in self._f64(xs)]

    def subtract_mean(
        self, xs: Sequence[Any], axes: Sequence[tuple[int, ...]], out: Any = None
    ) -> list[np.ndarray]:
        return [
            x - x.mean(axis=ax, keepdims=True) if ax else x
            for x, ax in zip(self._f64(xs), axes, strict=True)
        ]
