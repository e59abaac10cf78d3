"""The JAX adapter of :class:`sam_core.ArrayListOps`: pure, jit-friendly, functional.

``out`` arguments are ignored (JAX arrays are immutable; XLA fuses the element-wise ops).
Reductions and the final ``x + scale * y`` run in at least float32 and results keep each
input's dtype, matching ``sam_torch``'s adapter operation for operation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

__all__ = ["JaxOps", "accumulation_dtype"]


def accumulation_dtype(dtype: Any) -> Any:
    """float32 for half/bfloat16 arrays, the array's own dtype otherwise."""
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        return jnp.float32
    return dtype


def _acc(xs: Sequence[Any]) -> Any:
    if not xs:
        return jnp.float32
    return jnp.result_type(*[accumulation_dtype(x.dtype) for x in xs])


class JaxOps:
    """List-of-arrays operations on ``jax.Array`` leaves."""

    def sum_of_squares(self, xs: Sequence[Any]) -> Any:
        acc = _acc(xs)
        if not xs:
            return jnp.zeros((), acc)
        return sum(jnp.sum(jnp.square(x.astype(acc))) for x in xs)

    def dot(self, xs: Sequence[Any], ys: Sequence[Any]) -> Any:
        acc = _acc(xs)
        if not xs:
            return jnp.zeros((), acc)
        return sum(jnp.sum(x.astype(acc) * y.astype(acc)) for x, y in zip(xs, ys, strict=True))

    def sqrt(self, s: Any) -> Any:
        return jnp.sqrt(s)

    def abs_add_square(self, xs: Sequence[Any], c: Any, out: Any = None) -> list[Any]:
        ts = [(jnp.abs(x) + jnp.asarray(c, x.dtype)).astype(x.dtype) for x in xs]
        return [(t * t).astype(t.dtype) for t in ts]

    def mul(self, xs: Sequence[Any], ys: Sequence[Any], out: Any = None) -> list[Any]:
        return [(x * y).astype(x.dtype) for x, y in zip(xs, ys, strict=True)]

    def add_scaled(self, xs: Sequence[Any], ys: Sequence[Any], scale: Any, out: Any = None) -> list[Any]:
        res = []
        for x, y in zip(xs, ys, strict=True):
            acc = jnp.result_type(accumulation_dtype(x.dtype), jnp.asarray(scale).dtype)
            res.append((x.astype(acc) + y.astype(acc) * jnp.asarray(scale, acc)).astype(x.dtype))
        return res

    def scale(self, xs: Sequence[Any], s: Any, out: Any = None) -> list[Any]:
        res = []
        for x in xs:
            acc = jnp.result_type(accumulation_dtype(x.dtype), jnp.asarray(s).dtype)
            res.append((x.astype(acc) * jnp.asarray(s, acc)).astype(x.dtype))
        return res

    def subtract_mean(self, xs: Sequence[Any], axes: Sequence[tuple[int, ...]], out: Any = None) -> list[Any]:
        res = []
        for x, ax in zip(xs, axes, strict=True):
            if not ax:
                res.append(x)
                continue
            acc = accumulation_dtype(x.dtype)
            mean = jnp.mean(x.astype(acc), axis=ax, keepdims=True)
            res.append((x.astype(acc) - mean).astype(x.dtype))
        return res
