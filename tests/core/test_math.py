"""sam_core's math against formulas written out by hand in float64 NumPy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import sam_core
from sam_core import NumpyOps

OPS = NumpyOps()


def _tensors(seed: int, shapes=((3, 4), (5,), (2, 3, 2))):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in shapes]


def _flat(xs):
    return np.concatenate([np.ravel(x) for x in xs])


def test_global_norm_is_the_norm_of_the_concatenation():
    xs = _tensors(0)
    assert sam_core.global_norm(OPS, xs) == pytest.approx(np.linalg.norm(_flat(xs)), rel=1e-15)


@pytest.mark.parametrize("rho", [0.0, 0.05, 2.0])
def test_sam_perturbation_matches_formula(rho):
    w, g = _tensors(1), _tensors(2)
    eps = 1e-12
    norm = np.sqrt(sum(np.sum(x**2) for x in g))
    expected = [rho * x / (norm + eps) for x in g]
    e, n = sam_core.perturbation(OPS, w, g, rho=rho, eps=eps)
    assert n == pytest.approx(norm, rel=1e-15)
    for a, b in zip(e, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=0)


@pytest.mark.parametrize("eta", [0.0, 0.01, 1.0])
def test_asam_perturbation_matches_formula(eta):
    w, g = _tensors(3), _tensors(4)
    rho, eps = 0.5, 1e-12
    t = [np.abs(x) + eta for x in w]
    norm = np.sqrt(sum(np.sum((ti * gi) ** 2) for ti, gi in zip(t, g, strict=True)))
    expected = [rho * ti**2 * gi / (norm + eps) for ti, gi in zip(t, g, strict=True)]
    e, n = sam_core.perturbation(OPS, w, g, rho=rho, adaptive=True, eta=eta, eps=eps)
    assert n == pytest.approx(norm, rel=1e-14)
    for a, b in zip(e, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=0)


@pytest.mark.parametrize("adaptive", [False, True])
def test_perturbed_params_is_w_plus_e(adaptive):
    w, g = _tensors(5), _tensors(6)
    e, n1 = sam_core.perturbation(OPS, w, g, rho=0.1, adaptive=adaptive, eta=0.01)
    wp, n2 = sam_core.perturbed_params(OPS, w, g, rho=0.1, adaptive=adaptive, eta=0.01)
    assert n1 == n2
    for a, b, c in zip(wp, w, e, strict=True):
        np.testing.assert_allclose(a, b + c, rtol=1e-15, atol=1e-17)


@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_gives_zero_perturbation_not_nan(adaptive):
    w = _tensors(7)
    g = [np.zeros_like(x) for x in w]
    e, n = sam_core.perturbation(OPS, w, g, rho=0.05, adaptive=adaptive)
    assert n == 0.0
    for x in e:
        assert np.all(x == 0.0)


def test_direction_and_sq_norm_sums_over_groups():
    # Two groups combined through the squared norms equal one group with everything.
    w, g = _tensors(8), _tensors(9)
    d1, s1 = sam_core.direction_and_sq_norm(OPS, w[:1], g[:1], adaptive=True, eta=0.01)
    d2, s2 = sam_core.direction_and_sq_norm(OPS, w[1:], g[1:], adaptive=False, eta=0.01)
    t0 = np.abs(w[0]) + 0.01
    expected = np.sum((t0 * g[0]) ** 2) + sum(np.sum(x**2) for x in g[1:])
    assert s1 + s2 == pytest.approx(expected, rel=1e-14)
    np.testing.assert_allclose(d1[0], t0**2 * g[0], rtol=1e-15)
    assert d2[0] is g[1]  # SAM's direction is the gradient itself, no copy


_finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)


def _scaled_norm(a: np.ndarray) -> float:
    """||a||, scaled by max |a| first: np.linalg.norm of a vector is a plain sum of squares,
    which underflows to 0 for tiny entries (|a| ~ 1e-168)."""
    peak = float(np.max(np.abs(a)))
    return peak * float(np.linalg.norm(a / peak)) if peak > 0 else 0.0


@settings(max_examples=60, deadline=None)
@given(
    g=hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, max_side=5), elements=_finite),
    rho=st.floats(1e-3, 10.0),
)
def test_sam_perturbation_norm_is_rho(g, rho):
    e, n = sam_core.perturbation(OPS, [np.zeros_like(g)], [g], rho=rho)
    norm_e = _scaled_norm(e[0])
    # ||e|| = rho * ||g|| / (||g|| + eps): rho whenever eps is negligible, never more.
    true_norm = _scaled_norm(g)
    assert norm_e == pytest.approx(rho * true_norm / (true_norm + 1e-12), rel=1e-9, abs=1e-300)
    if n > 1e-3:
        assert norm_e == pytest.approx(rho, rel=1e-9)
    assert norm_e <= rho * (1 + 1e-12)


@settings(max_examples=60, deadline=None)
@given(
    w=hnp.arrays(np.float64, (6,), elements=st.floats(-10, 10, width=64)),
    g=hnp.arrays(np.float64, (6,), elements=st.floats(-10, 10, width=64)),
    c=st.floats(0.1, 10.0),
)
def test_asam_is_scale_invariant(w, g, c):
    """With eta = 0, rescaling w -> c w and g -> g / c (what a scale symmetry of the network
    does to the gradient) rescales the perturbation to c e: the relative neighbourhood is the same.
    And ||T^-1 e|| = rho."""
    rho = 0.5
    e, n = sam_core.perturbation(OPS, [w], [g], rho=rho, adaptive=True, eta=0.0)
    e_c, n_c = sam_core.perturbation(OPS, [c * w], [g / c], rho=rho, adaptive=True, eta=0.0)
    assert n_c == pytest.approx(n, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(e_c[0], c * e[0], rtol=1e-9, atol=1e-12)
    if n > 1e-6:
        mask = w != 0
        t_inv_e = e[0][mask] / np.abs(w[mask])
        assert np.linalg.norm(t_inv_e) == pytest.approx(rho * n / (n + 1e-12), rel=1e-9)
