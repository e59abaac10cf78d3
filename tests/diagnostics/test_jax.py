"""sam_jax.diagnostics against exact float64 references, and torch == JAX on converted weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_jax
from tests import helpers
from tests.diagnostics import common

D = sam_jax.diagnostics  # the lazy submodule, reached from the package


@pytest.fixture(autouse=True)
def _x64():
    with helpers.jax_x64():
        yield


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_top_eigenvalues_match_the_exact_hessian(kind):
    loss_fn, params, batch, model = common.jax_problem(kind)
    # The exact Hessian of the torch twin (same weights, torch's parameter order and layout:
    # the same eigenvalues), built column by column; jax.hessian of the conv net would
    # compile for tens of seconds on CPU.
    _, torch_loss, torch_batch = common.torch_problem(kind)
    exact = np.linalg.eigvalsh(common.torch_exact_hessian(model, torch_loss, torch_batch))
    got = D.hessian_eigenvalues(loss_fn, params, batch, k=3)
    assert got.shape == (3,)
    assert common.rel(got, common.top(exact, 3)) < 1e-6
    if kind == "mlp":
        power = D.hessian_eigenvalues(loss_fn, params, batch, k=1, method="power", max_iter=500, tol=1e-12)
        assert common.rel(np.abs(power), [np.max(np.abs(exact))]) < 1e-6


def test_hutchinson_and_batches():
    loss_fn, params, (x, y), model = common.jax_problem("mlp")
    _, torch_loss, torch_batch = common.torch_problem("mlp")
    exact = float(np.trace(common.torch_exact_hessian(model, torch_loss, torch_batch)))
    estimate = D.hessian_trace(loss_fn, params, (x, y), probes=60, seed=0)
    assert abs(estimate - exact) < 3 * estimate.std_error
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    split = D.hessian_trace(loss_fn, params, batches, probes=60, seed=0)
    assert common.rel(split.samples, estimate.samples) < 1e-10


def test_linearized_and_per_product_hvps_agree():
    """The one-batch operator (gradient linearized once, reused) against a fresh jvp of grad
    per product, over one batch and over two, for several vectors in a row."""
    loss_fn, params, (x, y), _ = common.jax_problem("conv")
    obj = D._Objective(loss_fn, params)
    linearized = obj.flat_hvp([(x, y)])
    split = obj.flat_hvp([(x[:5], y[:5]), (x[5:], y[5:])])
    rng = np.random.default_rng(0)
    for _ in range(3):
        v = rng.standard_normal(obj.dim)
        fresh = obj.to_host(obj.hvp(obj.split(v), [(x, y)]))
        assert common.rel(linearized(v), fresh) < 1e-12
        assert common.rel(split(v), fresh) < 1e-10


def test_torch_and_jax_give_the_same_numbers():
    """Float64, converted weights: eigenvalues, the trace with the same probes, landscapes, sharpness."""
    import torch

    import sam_torch

    T = sam_torch.diagnostics
    for kind in ("mlp", "conv"):
        loss_fn, params, batch, model = common.jax_problem(kind)
        _, torch_loss, torch_batch = common.torch_problem(kind)
        ej = D.hessian_eigenvalues(loss_fn, params, batch, k=3)
        et = T.hessian_eigenvalues(model, torch_loss, torch_batch, k=3)
        assert common.rel(ej, et) < 1e-9, kind

        rng = np.random.default_rng(5)
        probes_j = [jax.tree.map(lambda p, rng=rng: jnp.asarray(rng.choice([-1.0, 1.0], size=p.shape)), params)
                    for _ in range(3)]
        probes_t = [common.to_torch_layout(kind, z) for z in probes_j]
        tj = D.hessian_trace(loss_fn, params, batch, probes=probes_j)
        tt = T.hessian_trace(model, torch_loss, torch_batch, probes=probes_t)
        assert common.rel(tj.samples, tt.samples) < 1e-9, kind

        dirs_j = [jax.tree.map(lambda p, rng=rng: jnp.asarray(rng.standard_normal(p.shape)) * 0.3, params)
                  for _ in range(2)]
        dirs_t = [common.to_torch_layout(kind, d) for d in dirs_j]
        lj = D.loss_landscape(loss_fn, params, batch, dims=2, steps=3, directions=dirs_j)
        lt = T.loss_landscape(model, torch_loss, torch_batch, dims=2, steps=3, directions=dirs_t)
        assert common.rel(lj.loss, lt.loss) < 1e-9, kind

        for adaptive in (False, True):
            sj = D.sharpness(loss_fn, params, batch, rho=0.1, adaptive=adaptive, m=6, steps=8)
            st = T.sharpness(model, torch_loss, torch_batch, rho=0.1, adaptive=adaptive, m=6, steps=8)
            assert common.rel(sj.per_chunk, st.per_chunk) < 1e-9, (kind, adaptive)
        assert isinstance(torch_batch[0], torch.Tensor)


def test_random_landscape_is_filter_normalized_along_the_last_axis():
    loss_fn, params, batch, _ = common.jax_problem("conv")
    land = D.loss_landscape(loss_fn, params, batch, steps=3)
    leaves = jax.tree.leaves(params)
    for w, d in zip(leaves, land.directions[0], strict=True):
        w, d = np.asarray(w), np.asarray(d)
        if w.ndim > 1:
            axes = tuple(range(w.ndim - 1))
            assert np.allclose(np.sqrt((d**2).sum(axes)), np.sqrt((w**2).sum(axes)), rtol=1e-12)
        else:
            assert not np.any(d)
    assert abs(land.loss[1] - float(loss_fn(params, batch))) < 1e-12


def _quadratic(hessian, center, gradient):
    h, c, g = (jnp.asarray(a) for a in (hessian, center, gradient))

    def loss_fn(params, _batch):
        d = params["w"] - c
        return 0.5 * d @ h @ d + g @ d

    return loss_fn


@pytest.mark.parametrize("adaptive", [False, True])
def test_worst_case_at_a_stationary_point_is_the_closed_form(adaptive):
    n, rho, eta = 6, 0.1, 0.05
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    hessian = (q * rng.uniform(0.5, 3.0, n)) @ q.T
    w = np.random.default_rng(1).uniform(0.5, 2.0, n) * np.array([1, -1, 1, -1, 1, 1])
    loss_fn = _quadratic(hessian, w, np.zeros(n))
    t = np.abs(w) + eta if adaptive else np.ones(n)
    expected = 0.5 * rho**2 * np.linalg.eigvalsh(t[:, None] * hessian * t[None, :])[-1]
    got = D.sharpness(loss_fn, {"w": jnp.asarray(w)}, jnp.zeros(1), rho=rho, adaptive=adaptive, eta=eta)
    assert abs(got - expected) < 1e-4 * expected
    average = D.sharpness(loss_fn, {"w": jnp.asarray(w)}, jnp.zeros(1), rho=rho, kind="average",
                          adaptive=adaptive, eta=eta)
    assert 0 <= average <= got


def test_params_untouched_and_errors():
    loss_fn, params, batch, _ = common.jax_problem("mlp")
    before = jax.tree.map(np.array, params)
    D.sharpness(loss_fn, params, batch, rho=0.1, steps=3)
    D.loss_landscape(loss_fn, params, batch, steps=3)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in
               zip(jax.tree.leaves(before), jax.tree.leaves(params), strict=True))
    with pytest.raises(ValueError, match="no floating-point leaves"):
        D.hessian_eigenvalues(loss_fn, {"step": jnp.zeros((), jnp.int32)}, batch)
    with pytest.raises(ValueError, match="scalar"):
        D.hessian_trace(lambda p, b: jnp.ones(3) * jax.tree.leaves(p)[0].sum(), params, batch, probes=2)
    with pytest.raises(ValueError, match="dims"):
        D.loss_landscape(loss_fn, params, batch, dims=0)
    with pytest.raises(ValueError, match="kind"):
        D.sharpness(loss_fn, params, batch, rho=0.1, kind="best")
    # Integer leaves are held fixed, not differentiated.
    mixed = {"p": params, "count": jnp.asarray(3)}
    values = D.hessian_eigenvalues(lambda q, b: loss_fn(q["p"], b), mixed, batch, k=2)
    assert common.rel(values, D.hessian_eigenvalues(loss_fn, params, batch, k=2)) < 1e-9
