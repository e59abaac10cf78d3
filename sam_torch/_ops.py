"""The torch adapter of :class:`sam_core.ArrayListOps`.

Two implementations of the same operations, chosen per device like ``torch.optim`` does:

* ``foreach=True``: multi-tensor ``torch._foreach_*`` kernels, a handful of launches per
  operation whatever the number of tensors. The default on CUDA and other accelerators.
  For float16/bfloat16 tensors the products with a scalar (``add_scaled``, ``scale``: the
  perturbation ``w + s * d`` and the variants' combinations) use the per-tensor fused
  kernels instead: the scalar is float32, and ``_foreach_mul(ys, s)`` rounds ``s * y`` to
  half precision before ``_foreach_add_`` rounds the sum again (some elements then differ
  by one ulp), while ``addcmul`` computes ``x + s * y`` in float32 and rounds once. No
  multi-tensor formulation rounds once without float32 copies of the tensors; this way
  both paths give the same numbers, bit for bit, in every dtype.
* ``foreach=False``: one fused kernel per tensor writing straight into the preallocated
  output (``torch.addcmul(..., out=)``), which makes one pass over memory where the
  ``_foreach_*`` formulation needs three (copy, scale, add). On CPU the ``_foreach_*`` ops
  are a loop over tensors anyway, so this is the faster path there and the default.

Both paths keep scalars as 0-d tensors on the parameters' device (no ``.item()``, no host
sync) and reduce in float32 at least, so half/bfloat16 norms do not overflow.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["TorchOps", "accumulation_dtype", "copy_is_non_blocking"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

#: ``mse_loss`` with ``out=`` (``torch._C._nn``: what ``torch.nn.functional.mse_loss`` calls).
_MSE_LOSS = getattr(torch._C._nn, "mse_loss", None)

#: On CPU, tensors below this many elements are handled by multi-tensor calls: for them the
#: per-call Python overhead, not memory traffic, is the cost.
SMALL_NUMEL = 1 << 14


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions and scalars use for parameters of ``dtype`` (float32 for half)."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def copy_is_non_blocking(source: torch.device, target: torch.device) -> bool:
    """Whether a copy of a tensor from ``source`` to ``target`` may be asynchronous.

    Only host to accelerator: such a copy is ordered on the target's stream before any
    kernel that reads it. A copy to the CPU is read by the host (``float()``, ``bool()``),
    and an asynchronous one may not have landed when it is read, so it blocks; so does a
    copy between two accelerators.
    """
    return source.type == "cpu" and target.type != "cpu"


class TorchOps:
    """List-of-tensors operations for one homogeneous (device, dtype) list of parameters."""

    def __init__(
        self, device: torch.device, dtype: torch.dtype, foreach: bool, host_reads: bool | None = None
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.acc_dtype = accumulation_dtype(dtype)
        self.foreach = foreach
        #: Whether a scalar may be read on the host (free on CPU, a pipeline stall elsewhere).
        self.host_reads = device.type == "cpu" if host_reads is None else host_reads
        self._constants: dict[float, Tensor] = {}
        #: float16/bfloat16: products with a scalar go through the per-tensor kernels, which
        #: compute ``x + s * y`` (and ``s * x``) in float32 and round once; the multi-tensor
        #: kernels round ``s * y`` to the parameters' dtype before the sum (see the module
        #: docstring), and foreach and per-tensor must give the same numbers.
        self._rounds_once = self.acc_dtype != dtype
        #: ``(t + c)^2`` as one CPU kernel (float32/float64: the rounding of two passes).
        self._fused_square = (
            _MSE_LOSS is not None and device.type == "cpu" and dtype in (torch.float32, torch.float64)
        )

    # -- reductions -------------------------------------------------------------------
    def _zero(self) -> Tensor:
        return torch.zeros((), device=self.device, dtype=self.acc_dtype)

    def sum_of_squares(self, xs: Sequence[Tensor]) -> Tensor:
        if not xs:
            return self._zero()
        if not self.foreach and self.acc_dtype == self.dtype and all(_plain_contiguous(x) for x in xs):
            # CPU: a BLAS dot per large tensor reads it once at memory speed (``_foreach_norm``
            # is a loop of ``linalg_vector_norm`` kernels there, about 1.8x slower); the small
            # tensors (biases, norms: a few microseconds of Python each) go in one
            # ``_foreach_norm`` call.
            parts = [torch.dot(x.view(-1), x.view(-1)) for x in xs if x.numel() >= SMALL_NUMEL]
            small = [x for x in xs if x.numel() < SMALL_NUMEL]
            if small:
                parts.append(torch.stack(torch._foreach_norm(small)).square().sum())
            return parts[0] if len(parts) == 1 else torch.stack(parts).sum()
        dtype = self.acc_dtype if self.acc_dtype != self.dtype else None
        norms = torch._foreach_norm(list(xs), 2, dtype=dtype)
        return torch.stack(norms).square().sum()

    def dot(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
        if not xs:
            return self._zero()
        parts = []
        for x, y in zip(xs, ys, strict=True):
            if self.acc_dtype != self.dtype:
                # Low precision: accumulate in float32 (a transient per-tensor upcast).
                parts.append(torch.dot(x.reshape(-1).to(self.acc_dtype), y.reshape(-1).to(self.acc_dtype)))
            elif _plain_contiguous(x) and _plain_contiguous(y):
                parts.append(torch.dot(_flat(x), _flat(y)))
            else:  # channels_last (any element order will do), DTensor (no uneven view)
                parts.append(torch.sum(x * y))
        return parts[0] if len(parts) == 1 else torch.stack(parts).sum()

    def sqrt(self, s: Tensor) -> Tensor:
        return torch.sqrt(s)

    # -- element-wise -----------------------------------------------------------------
    def abs_add_square(
        self, xs: Sequence[Tensor], c: float, out: Sequence[Tensor] | None = None
    ) -> list[Tensor]:
        if self.foreach:
            if out is None:
                res = torch._foreach_abs(list(xs))
            else:
                res = list(out)
                _copy_all(res, list(xs))
                torch._foreach_abs_(res)
            torch._foreach_add_(res, c)
            torch._foreach_mul_(res, res)
            return res
        k = self._constant(c)
        if out is None:  # new tensors (autograd can go through them)
            ts = [torch.abs(x).add_(k) for x in xs]
            return [t * t for t in ts]
        neg = self._constant(-c) if self._fused_square else None
        for x, o in zip(xs, out, strict=True):
            torch.abs(x, out=o)
            if neg is not None and type(o) is Tensor:
                # (|x| - (-c))^2 in one pass: mse_loss's element-wise kernel, diff * diff.
                # Bit for bit ``o.add_(c).mul_(o)`` (negating c is exact), one pass fewer.
                _MSE_LOSS(o, neg, 0, out=o)  # reduction 0: none
            else:
                o.add_(k).mul_(o)
        return list(out)

    def mul(self, xs: Sequence[Tensor], ys: Sequence[Tensor], out: Sequence[Tensor] | None = None) -> list[Tensor]:
        if self.foreach:
            if out is None:
                return list(torch._foreach_mul(list(xs), list(ys)))
            res = list(out)
            if not _same(res, xs):
                _copy_all(res, list(xs))
            torch._foreach_mul_(res, list(ys))
            return res
        if out is None:
            return [torch.mul(x, y) for x, y in zip(xs, ys, strict=True)]
        for x, y, o in zip(xs, ys, out, strict=True):
            if o is x:  # in place: cheaper than ``out=`` on an aliased input
                x.mul_(y)
            else:
                torch.mul(x, y, out=o)
        return list(out)

    def add_scaled(
        self,
        xs: Sequence[Tensor],
        ys: Sequence[Tensor],
        scale: Tensor,
        out: Sequence[Tensor] | None = None,
    ) -> list[Tensor]:
        scale = self._scalar(scale)
        if self.foreach and not self._rounds_once:
            if out is None:
                res = list(torch._foreach_mul(list(ys), scale))
            elif _same(out, xs):  # in place, x += scale * y: y must not overwrite x first
                res = list(out)
                torch._foreach_add_(res, torch._foreach_mul(list(ys), scale))
                return res
            else:
                res = list(out)
                if not _same(res, ys):
                    _copy_all(res, list(ys))
                torch._foreach_mul_(res, scale)
            torch._foreach_add_(res, list(xs))
            return res
        if out is None:
            out = [torch.empty_like(x) for x in xs]
        if self.host_reads and self.acc_dtype == self.dtype:
            # CPU, float32/float64: reading the scale costs no device sync, and ``add`` with a
            # scalar ``alpha`` is a cheaper kernel than ``addcmul`` with a broadcast scale.
            # The same value: the 0-d scale has the parameters' dtype, ``alpha`` is cast back.
            alpha = float(scale)
            small = [
                i for i, (x, y, o) in enumerate(zip(xs, ys, out, strict=True))
                if x.numel() < SMALL_NUMEL and type(o) is Tensor
                and o.untyped_storage().data_ptr() != y.untyped_storage().data_ptr()
            ]
            if len(small) < 2:
                small = []  # nothing to batch: the per-tensor loop below does it all
            else:
                # Small tensors: two multi-tensor calls instead of a Python call per tensor.
                so = [out[i] for i in small]
                sx = [xs[i] for i in small]
                if not _same(so, sx):
                    torch._foreach_copy_(so, sx)
                torch._foreach_add_(so, [ys[i] for i in small], alpha=alpha)
            batched = set(small)
            for i, (x, y, o) in enumerate(zip(xs, ys, out, strict=True)):
                if i not in batched:
                    torch.add(x, y, alpha=alpha, out=o)
            return list(out)
        for x, y, o in zip(xs, ys, out, strict=True):
            # One fused pass: o = x + y * scale, computed in the scale's (>= float32) precision.
            torch.addcmul(x, y, scale.expand_as(y), out=o)
        return list(out)

    def scale(self, xs: Sequence[Tensor], s: Tensor, out: Sequence[Tensor] | None = None) -> list[Tensor]:
        s = self._scalar(s)
        if self.foreach and not self._rounds_once:
            if out is None:
                return list(torch._foreach_mul(list(xs), s))
            res = list(out)
            if not _same(res, xs):
                _copy_all(res, list(xs))
            torch._foreach_mul_(res, s)
            return res
        if out is None:
            return [torch.mul(x, s.expand_as(x)).to(x.dtype) for x in xs]
        for x, o in zip(xs, out, strict=True):
            torch.mul(x, s.expand_as(x), out=o)
        return list(out)

    def subtract_mean(
        self,
        xs: Sequence[Tensor],
        axes: Sequence[tuple[int, ...]],
        out: Sequence[Tensor] | None = None,
    ) -> list[Tensor]:
        # Per tensor: there is no multi-tensor mean; GC runs once per step on the gradients.
        res = []
        for i, (x, ax) in enumerate(zip(xs, axes, strict=True)):
            o = None if out is None else out[i]
            if not ax:
                if o is not None and o is not x:
                    o.copy_(x)
                res.append(x if o is None else o)
                continue
            mean = x.mean(dim=ax, keepdim=True, dtype=self.acc_dtype)
            if o is None:
                res.append((x - mean).to(x.dtype))
            elif self.acc_dtype == self.dtype:
                res.append(torch.sub(x, mean, out=o))
            else:  # half precision: subtract in float32, round once
                res.append(o.copy_(x.to(self.acc_dtype) - mean))
        return res

    def _constant(self, c: float | Tensor) -> float | Tensor:
        """``c`` as a 0-d CPU tensor of the parameters' dtype, made once per value and instance.

        The fused square needs its ``-eta`` as a tensor. Where ``add_`` runs instead (half
        precision, DTensors), the tensor is also the cheaper operand: ``x.add_(python_float)``
        wraps the number in a double tensor and converts it on every call, about 3 us of
        dispatch against 1 us, and the cache-blocked direction makes about 80 calls a step
        (``SAM`` builds one ``TorchOps`` per group and step, so that is the cache's reach).
        The result is the same: torch rounds a plain number to the tensor's dtype too (half
        precision then adds in float32 either way). Other devices keep the plain number
        (a 0-d device tensor would be a transfer).
        """
        if self.device.type != "cpu" or not isinstance(c, (int, float)):
            return c
        k = self._constants.get(c)
        if k is None:
            k = self._constants[c] = torch.tensor(c, dtype=self.dtype)
        return k

    def _scalar(self, s: Tensor | float) -> Tensor:
        if not isinstance(s, Tensor):
            return torch.tensor(s, device=self.device, dtype=self.acc_dtype)
        if s.device != self.device:
            s = s.to(self.device, non_blocking=copy_is_non_blocking(s.device, self.device))
        return s


def _copy_all(dst: list[Tensor], src: list[Tensor]) -> None:
    """``torch._foreach_copy_``, per tensor for DTensors (no sharding rule for the foreach op)."""
    if any(type(t) is not Tensor for t in dst):
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)
    else:
        torch._foreach_copy_(dst, src)


def _plain_contiguous(x: Tensor) -> bool:
    """A plain (not DTensor or other subclass) contiguous tensor: ``view(-1)`` is valid."""
    return type(x) is Tensor and x.is_contiguous()


def _flat(x: Tensor) -> Tensor:
    """``x`` as 1-D (itself when it already is: no view to create)."""
    return x if x.ndim == 1 else x.view(-1)


def _same(a: Sequence[Tensor], b: Sequence[Tensor]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))
