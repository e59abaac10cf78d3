"""Property tests of sam_torch.SAM over shapes, dtypes and scales (hypothesis, derandomized).

For random parameters and gradients in float64, float32, bfloat16 and float16, with
gradients that are zero, subnormal, tiny, ordinary or close to the dtype's maximum:

* the perturbed weights are finite;
* :math:`e`, measured in float64 as ``(w + e) - w`` from the parameters, matches the paper's
  formula evaluated in float64 (rescaled by powers of two so that no intermediate under- or
  overflows) element by element, up to the rounding of the parameter dtype;
* :math:`\\lVert e \\rVert \\le \\rho (1 + tol)` for SAM and
  :math:`\\lVert T_w^{-1} e \\rVert \\le \\rho (1 + tol)` for ASAM, plus the rounding of
  :math:`w + e` in the parameter dtype (one or two ulps per element);
* when the norm overflows the accumulation dtype (finite gradients), :math:`e = 0` exactly,
  and only then;
* ``restore()`` gives the original bits back; non-finite gradients skip the step bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

from sam_torch import SAM

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
MANTISSA = {torch.float64: 52, torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
GRAD_SCALES = ["zero", "subnormal", "tiny", "unit", "huge", "mixed"]

SETTINGS = settings(max_examples=200, derandomize=True, deadline=None, database=None)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def ulp(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Spacing of ``dtype`` at |x| (float64 array), at least the smallest subnormal."""
    fi = torch.finfo(dtype)
    mant = MANTISSA[dtype]
    smallest_subnormal = fi.smallest_normal * 2.0**-mant
    ax = np.abs(x)
    with np.errstate(divide="ignore"):
        expo = np.floor(np.log2(np.where(ax > 0, ax, 1.0)))
    return np.maximum(np.exp2(expo - mant), smallest_subnormal)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(INT_VIEW[t.dtype]).clone()


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shapes = draw(
        st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)
    )
    return dict(
        dtype=dtype,
        shapes=shapes,
        seed=draw(st.integers(0, 2**31 - 1)),
        grad_scale=draw(st.sampled_from(GRAD_SCALES)),
        w_scale=draw(st.sampled_from([0.0, 1e-3, 1.0, 300.0])),
        rho=draw(st.sampled_from([0.0, 1e-4, 0.05, 2.0])),
        adaptive=draw(st.booleans()),
        eta=draw(st.sampled_from([0.0, 0.01, 1.0])),
        storage=draw(st.sampled_from(["swap", "copy"])),
        impl=draw(st.sampled_from(["foreach", "per_tensor"])),
    )


def _grad_magnitude(kind: str, dtype: torch.dtype, rng: np.random.Generator) -> float:
    fi = torch.finfo(dtype)
    if kind == "mixed":
        kind = rng.choice(["zero", "subnormal", "tiny", "unit", "huge"])
    return {
        "zero": 0.0,
        "subnormal": fi.smallest_normal * 0.25,
        "tiny": fi.smallest_normal * 64.0,
        "unit": 1.0,
        "huge": fi.max * 0.9,
    }[kind]


def build(case):
    rng = np.random.default_rng(case["seed"])
    dtype = case["dtype"]
    params, grads = [], []
    for shape in case["shapes"]:
        w = torch.from_numpy(np.asarray(rng.standard_normal(shape) * case["w_scale"])).to(dtype)
        # uniform in [-1, 1] times the magnitude: finite in the dtype by construction
        mag = _grad_magnitude(case["grad_scale"], dtype, rng)
        g = torch.from_numpy(np.asarray(rng.uniform(-1.0, 1.0, shape))).to(dtype) * mag if mag else torch.zeros(shape, dtype=dtype)
        assert torch.isfinite(g).all()
        p = nn.Parameter(w)
        p.grad = g.clone()
        params.append(p)
        grads.append(g)
    return params, grads


@SETTINGS
@given(cases())
def test_perturbation_is_finite_bounded_matches_float64_and_restores_exactly(case):
    dtype, rho, adaptive, eta = case["dtype"], case["rho"], case["adaptive"], case["eta"]
    params, grads = build(case)
    sam = SAM(
        params, torch.optim.SGD, lr=0.1, rho=rho, adaptive=adaptive, eta=eta,
        storage=case["storage"], perturb_impl=case["impl"],
    )
    w0 = [p.detach().double().numpy().copy() for p in params]
    g0 = [g.double().numpy() for g in grads]
    w0_bits = [bits(p) for p in params]

    sam.first_step()
    assert sam.is_perturbed and not sam.step_skipped
    w1 = [p.detach().double().numpy().copy() for p in params]
    assert all(np.isfinite(w).all() for w in w1)
    e = [a - b for a, b in zip(w1, w0, strict=True)]

    t = [np.abs(w) + eta if adaptive else np.ones_like(w) for w in w0]
    fi, fi_acc = torch.finfo(dtype), torch.finfo(acc_dtype(dtype))
    log2_norm, true_norm = _reference_norm(t, g0)
    e_ref = _reference_perturbation(t, g0, rho, true_norm, eps=1e-12)
    norm = sam.grad_norm
    if norm is not None and not bool(torch.isfinite(norm)):
        # Documented: a finite gradient whose norm overflows gives e = 0, never NaN. It may only
        # happen where the float64 values show an overflow in the parameter or accumulation dtype.
        t2g = max((float(np.max(ti * (ti * np.abs(gi)))) for ti, gi in zip(t, g0, strict=True) if gi.size), default=0.0)
        t2 = max((float(np.max(ti * ti)) for ti in t if ti.size), default=0.0)
        assert 2 * log2_norm >= math.log2(fi_acc.max) - 2 or (adaptive and max(t2g, t2) >= fi.max / 4)
        assert all(np.all(ei == 0) for ei in e)
        event("norm overflow: e = 0")
        _assert_restores_bits(sam, params, w0_bits)
        return
    assert 2 * log2_norm < math.log2(fi_acc.max) + 1  # finite norm: no overflow was missed
    u = 2.0 ** -(MANTISSA[dtype] + 1)  # unit roundoff of the parameter dtype
    rel = (16 if adaptive else 4) * max(u, 2.0**-24 if dtype != torch.float64 else u)
    slack = [2 * ulp(np.abs(wi) + np.abs(er), dtype) for wi, er in zip(w0, e_ref, strict=True)]
    # ASAM forms T_w^2 g in the parameter dtype: below its smallest normal it underflows
    # (gradually), so only the bound is checked there, not the element-wise match.
    underflow = adaptive and any(
        np.any((d := ti * (ti * np.abs(gi)))[d > 0] < fi.smallest_normal) for ti, gi in zip(t, g0, strict=True)
    )
    event(f"{dtype} {'asam' if adaptive else 'sam'} {'underflow: bound only' if underflow else 'element-wise'}")
    if not underflow:
        for ei, er, sl in zip(e, e_ref, slack, strict=True):
            excess = np.abs(ei - er) - (sl + rel * np.abs(er))
            assert np.all(excess <= 0), excess.max()
        # the norm SAM scaled by, where its square is a normal number of the accumulation dtype
        if 2 * log2_norm > math.log2(fi_acc.smallest_normal) + 20:
            assert abs(float(norm) - true_norm) <= 8 * rel * true_norm
    # the SAM ball (ASAM: the T_w-scaled ball), measured, with the rounding of w + e;
    # where T = 0 (ASAM, eta = 0, w = 0) e = T^2 g / ... must be exactly 0
    assert all(np.all(ei[ti == 0] == 0) for ei, ti in zip(e, t, strict=True))
    measured = math.sqrt(sum(float(np.sum(_safe_div(ei, ti) ** 2)) for ei, ti in zip(e, t, strict=True)))
    rounding = math.sqrt(sum(float(np.sum(_safe_div(si, ti) ** 2)) for si, ti in zip(slack, t, strict=True)))
    assert measured <= rho * (1 + rel) + rounding
    if rho == 0.0 or all(np.all(gi == 0) for gi in g0):
        assert all(np.all(ei == 0) for ei in e)

    _assert_restores_bits(sam, params, w0_bits)


def _assert_restores_bits(sam, params, w0_bits):
    sam.restore()
    assert not sam.is_perturbed
    for p, b in zip(params, w0_bits, strict=True):
        assert torch.equal(bits(p), b)  # bit for bit, signed zeros included


def _reference_norm(t, g):
    """(log2 ||T g||, ||T g||) in float64, rescaled by a power of two so nothing under/overflows."""
    peak = max((float(np.max(np.abs(ti * gi))) for ti, gi in zip(t, g, strict=True) if gi.size), default=0.0)
    if peak == 0.0 or not math.isfinite(peak):
        return (-math.inf, 0.0) if peak == 0.0 else (math.inf, math.inf)
    k = -math.frexp(peak)[1]  # 2**k * peak in [0.5, 1)
    scaled = math.sqrt(sum(float(np.sum((ti * np.ldexp(gi, k)) ** 2)) for ti, gi in zip(t, g, strict=True)))
    return math.log2(scaled) - k, float(np.ldexp(scaled, -k))  # inf past float64's range


def _reference_perturbation(t, g, rho, norm, eps):
    """The paper's e = rho T^2 g / (||T g|| + eps), ordered so no intermediate is subnormal."""
    c = rho / (norm + eps)
    return [ti * (ti * (gi * c)) for ti, gi in zip(t, g, strict=True)]


@SETTINGS
@given(cases(), st.sampled_from([float("nan"), float("inf"), -float("inf")]), st.sampled_from([1, 2]))
def test_nonfinite_gradient_in_either_pass_skips_the_step_bit_for_bit(case, bad, bad_pass):
    params, _ = build(case)
    sizes = [p.numel() for p in params]
    if sum(sizes) == 0:
        params.append(nn.Parameter(torch.ones(1, dtype=case["dtype"])))
        params[-1].grad = torch.ones(1, dtype=case["dtype"])
        sizes.append(1)
    rng = np.random.default_rng(case["seed"] + 1)
    k = int(rng.choice([i for i, n in enumerate(sizes) if n]))
    flat = int(rng.integers(sizes[k]))
    sam = SAM(
        params, torch.optim.SGD, lr=0.1, momentum=0.9, rho=case["rho"], adaptive=case["adaptive"],
        eta=case["eta"], storage=case["storage"], perturb_impl=case["impl"],
        # the default policy checks the clean pass; the perturbed pass needs "both"
        **({"skip_nonfinite": "both"} if bad_pass == 2 else {}),
    )
    w0_bits = [bits(p) for p in params]
    if bad_pass == 1:
        params[k].grad.view(-1)[flat] = bad
    sam.first_step()
    if bad_pass == 2:
        params[k].grad.view(-1)[flat] = bad
    sam.second_step()
    assert sam.step_skipped and not sam.is_perturbed
    assert sam.state_dict()["state"] == {}  # no momentum buffer was created
    for p, b in zip(params, w0_bits, strict=True):
        assert torch.equal(bits(p), b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ulp_helper_matches_nextafter(dtype):
    # The tolerance above rests on this helper: check it against torch.nextafter.
    x = torch.tensor([1.0, 3.0, 1e-3, 200.0, torch.finfo(dtype).smallest_normal], dtype=dtype)
    up = torch.nextafter(x, torch.full_like(x, float("inf")))
    np.testing.assert_array_equal(ulp(x.double().numpy(), dtype), (up - x).double().numpy())
