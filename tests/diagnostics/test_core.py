"""sam_core's Krylov methods on explicit symmetric matrices, against NumPy and SciPy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sam_core import _diagnostics as core


def _symmetric(n, seed, spectrum=None):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    values = rng.standard_normal(n) if spectrum is None else np.asarray(spectrum, dtype=np.float64)
    return (q * values) @ q.T


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 30), k=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_lanczos_matches_eigvalsh(n, k, seed):
    k = min(k, n)
    a = _symmetric(n, seed)
    start = np.random.default_rng(seed + 1).standard_normal(n)
    exact = np.linalg.eigvalsh(a)
    values, vectors, _ = core.lanczos(lambda v: a @ v, start, k=k, return_vectors=True)
    assert np.allclose(values, exact[::-1][:k], rtol=1e-8, atol=1e-10)
    for value, vector in zip(values, vectors, strict=True):
        assert np.linalg.norm(a @ vector - value * vector) < 1e-7
    smallest, _, _ = core.lanczos(lambda v: a @ v, start, k=k, which="smallest")
    assert np.allclose(smallest, exact[:k], rtol=1e-8, atol=1e-10)


def test_lanczos_against_scipy_eigsh_on_a_larger_operator():
    sla = pytest.importorskip("scipy.sparse.linalg")
    n = 300
    a = _symmetric(n, 0, spectrum=np.concatenate([[9.0, 7.5, 7.0, 6.0], np.linspace(-2, 2, n - 4)]))
    reference = np.sort(sla.eigsh(sla.LinearOperator((n, n), matvec=lambda v: a @ v), k=4, which="LA")[0])[::-1]
    values, _, products = core.lanczos(lambda v: a @ v, np.ones(n), k=4, max_iter=100)
    assert np.allclose(values, reference, rtol=1e-9)
    assert products < 100  # stopped on its residual test, not the budget


def test_repeated_eigenvalues_are_found_by_restarting():
    a = np.diag([5.0, 5.0, 5.0, 2.0, 1.0, 0.5])
    rng = np.random.default_rng(0)
    values, _, _ = core.lanczos(lambda v: a @ v, rng.standard_normal(6), k=4,
                                restart=lambda: rng.standard_normal(6))
    assert np.allclose(values, [5.0, 5.0, 5.0, 2.0])


def test_power_iteration_with_deflation():
    a = _symmetric(20, 3, spectrum=np.concatenate([[10.0, -8.0, 6.0], np.linspace(-1, 1, 17)]))
    rng = np.random.default_rng(1)
    values, _, _ = core.power_iteration(lambda v: a @ v, lambda: rng.standard_normal(20), k=3,
                                        max_iter=2000, tol=1e-14)
    assert np.allclose(values, [10.0, -8.0, 6.0], rtol=1e-8)


def test_hutchinson_is_exact_for_a_diagonal_matrix_and_errors():
    a = np.diag(np.arange(1.0, 7.0))
    rng = np.random.default_rng(0)
    estimate = core.hutchinson(lambda v: a @ v, (core.flat(core.rademacher_vector([(6,)], rng)) for _ in range(5)))
    assert float(estimate) == 21.0 and estimate.std_error == 0.0
    with pytest.raises(ValueError, match="at least one probe"):
        core.hutchinson(lambda v: v, [])
    with pytest.raises(ValueError, match="which"):
        core.lanczos(lambda v: v, np.ones(3), which="top")


def test_filter_normalization_and_axes():
    rng = np.random.default_rng(0)
    w = [rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)]
    d = core.filter_normalize(core.gaussian_vector([x.shape for x in w], rng), w)
    assert np.allclose(np.linalg.norm(d[0].reshape(4, -1), axis=1), np.linalg.norm(w[0].reshape(4, -1), axis=1))
    assert not d[1].any()
    layer = core.filter_normalize(core.gaussian_vector([x.shape for x in w], rng), w,
                                  normalization="layer", ignore_1d=False)
    assert np.isclose(np.linalg.norm(layer[0]), np.linalg.norm(w[0]))
    assert np.isclose(np.linalg.norm(layer[1]), np.linalg.norm(w[1]))
    assert np.allclose(core.landscape_axes(1, 5, 2.0)[0], [-2, -1, 0, 1, 2])
    with pytest.raises(ValueError, match="steps"):
        core.landscape_axes(1, 1, 1.0)
    with pytest.raises(ValueError, match="span"):
        core.landscape_axes(2, 3, (1.0, 0.0))
