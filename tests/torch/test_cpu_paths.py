"""The CPU kernels' size split: small tensors in multi-tensor calls, large ones per tensor.

Every result is checked against float64 NumPy written from the definition, with the size
threshold lowered so that one call mixes both kinds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sam_torch._ops as ops_mod
import sam_torch._sam as sam_mod
from sam_torch import TorchOps

SHAPES = [(7, 5), (3,), (1,), (4, 6), (2,), ()]


def _tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]


@pytest.fixture(params=[1 << 14, 10, 0], ids=["default", "mixed", "all-large"])
def threshold(request, monkeypatch):
    monkeypatch.setattr(ops_mod, "SMALL_NUMEL", request.param)
    monkeypatch.setattr(sam_mod, "SMALL_NUMEL", request.param)
    return request.param


def test_sum_of_squares_mixes_small_and_large_tensors(threshold):
    xs = _tensors(0)
    ops = TorchOps(torch.device("cpu"), torch.float64, foreach=False)
    expected = sum(float(np.sum(x.numpy() ** 2)) for x in xs)
    assert float(ops.sum_of_squares(xs)) == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("alias", ["fresh", "out_is_x", "out_is_y"])
def test_add_scaled_small_tensors_in_one_call_and_aliasing(threshold, alias):
    xs, ys = _tensors(1), _tensors(2)
    x_np = [x.numpy().copy() for x in xs]
    y_np = [y.numpy().copy() for y in ys]
    out = {"fresh": [torch.empty_like(x) for x in xs], "out_is_x": xs, "out_is_y": ys}[alias]
    ops = TorchOps(torch.device("cpu"), torch.float64, foreach=False)
    scale = torch.tensor(-0.37, dtype=torch.float64)
    res = ops.add_scaled(xs, ys, scale, out=out)
    assert all(r is o for r, o in zip(res, out, strict=True))
    for r, a, b in zip(res, x_np, y_np, strict=True):
        np.testing.assert_allclose(r.numpy(), a - 0.37 * b, rtol=1e-15, atol=1e-15)
    untouched = {"fresh": (xs, x_np), "out_is_x": (ys, y_np), "out_is_y": (xs, x_np)}[alias]
    for t, a in zip(*untouched, strict=True):
        np.testing.assert_array_equal(t.numpy(), a)


@pytest.mark.parametrize("where", [0, 1, 5])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_fast_finite_flag_finds_any_non_finite_value(threshold, where, bad):
    ts = _tensors(3)
    assert bool(sam_mod._finite_flag(ts, fast=True))
    assert bool(sam_mod._finite_flag(ts))
    ts[where].view(-1)[0] = bad
    assert not bool(sam_mod._finite_flag(ts, fast=True))
    assert not bool(sam_mod._finite_flag(ts))


def test_fast_finite_flag_may_flag_an_overflow_the_exact_check_clears(threshold):
    ts = _tensors(4)
    ts[0].fill_(1e200)  # finite, but its squares overflow float64
    assert bool(sam_mod._finite_flag(ts))
    fast = bool(sam_mod._finite_flag(ts, fast=True))
    # Large tensors are read (sum of squares: inf here); small ones get the exact check.
    assert fast is (threshold > ts[0].numel())


def _rounded(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float64 values rounded once to ``dtype`` and back (round to nearest even)."""
    return torch.from_numpy(np.asarray(values, dtype=np.float64)).to(dtype).double().numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("use_out", [True, False])
def test_abs_add_square_rounds_like_two_passes(dtype, foreach, use_out):
    """``(|x| + c)^2`` as ``t = |x| + c`` then ``t * t``, each rounded to the dtype, with ``c``
    rounded to the dtype as torch does with a plain number. On CPU float32/float64 this is
    one fused kernel and a cached 0-d constant: the values must not change."""
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(s, generator=g).to(dtype) for s in [(3000,), (7, 5), ()]]
    ops = TorchOps(torch.device("cpu"), dtype, foreach=foreach)
    out = [torch.empty_like(x) for x in xs] if use_out else None
    for c in (0.01, 0.3, 0.01):  # the repeated value comes from the cache
        res = ops.abs_add_square(xs, c, out=out)
        c_rounded = torch.tensor(c, dtype=dtype).item()
        for x, r in zip(xs, res, strict=True):
            a = np.abs(x.double().numpy())
            # Both sums and products are exact in float64 for these dtypes (float64 itself
            # aside, where NumPy rounds the same way), so one rounding each reproduces torch.
            t = a + c if dtype == torch.float64 else _rounded(a + c_rounded, dtype)
            ref = t * t if dtype == torch.float64 else _rounded(t * t, dtype)
            assert r.dtype == dtype
            np.testing.assert_array_equal(r.double().numpy(), ref)
            two_passes = torch.abs(x).add_(c)
            assert torch.equal(r, two_passes.mul_(two_passes))
