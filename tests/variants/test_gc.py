"""Gradient centralization (``gc=True``) in sam_core, every sam_torch SAM-family class and
every sam_jax transformation, against the centring formula written out in NumPy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sam_core
from tests.helpers import max_rel_diff
from tests.reference import SGDRef, init_mlp, make_batches
from tests.variants.reference import trajectory

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import sam_jax  # noqa: E402
import sam_torch  # noqa: E402
from sam_jax import JaxOps  # noqa: E402
from sam_torch import TorchOps  # noqa: E402
from tests.helpers import jax_x64  # noqa: E402
from tests.variants.test_jax_variants import _run as jax_run  # noqa: E402
from tests.variants.test_torch_variants import _model  # noqa: E402
from tests.variants.test_torch_variants import _run as torch_run  # noqa: E402

LR, MOM, WD, STEPS = 0.1, 0.9, 5e-4, 7
SHAPES = [(), (6,), (4, 3), (3, 2, 5), (4, 3, 2, 2)]


def _formula(g: np.ndarray) -> np.ndarray:
    """g - g.mean(dim=(1, ..., n-1), keepdim=True) written per output row; 1-D unchanged."""
    if g.ndim < 2:
        return g.copy()
    out = np.empty_like(g)
    for j in range(g.shape[0]):
        out[j] = g[j] - g[j].sum() / g[j].size
    return out


def _arrays(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) + 3.0 for s in SHAPES]  # offset: a mean to remove


def test_axes_are_all_but_the_first():
    assert [sam_core.centralized_axes(s) for s in SHAPES] == [(), (), (1,), (1, 2), (1, 2, 3)]


def test_numpy_adapter_matches_the_formula():
    xs = _arrays()
    for got, x in zip(sam_core.centralize(sam_core.NumpyOps(), xs), xs, strict=True):
        np.testing.assert_allclose(got, _formula(x), rtol=0, atol=1e-13)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-13), (torch.float32, 3e-6)])
def test_torch_adapter_matches_the_formula(foreach, in_place, dtype, tol):
    xs = _arrays()
    ts = [torch.tensor(x, dtype=dtype) for x in xs]
    ops = TorchOps(torch.device("cpu"), dtype, foreach=foreach)
    got = sam_core.centralize(ops, ts, out=ts if in_place else None)
    for g, x in zip(got, xs, strict=True):
        assert g.dtype == dtype
        np.testing.assert_allclose(g.double().numpy(), _formula(x), rtol=0, atol=tol)
    if in_place:
        assert all(g is t for g, t in zip(got, ts, strict=True))


def test_torch_adapter_bfloat16_rounds_once_from_a_float32_mean():
    xs = _arrays()
    ts = [torch.tensor(x, dtype=torch.bfloat16) for x in xs]
    ops = TorchOps(torch.device("cpu"), torch.bfloat16, foreach=False)
    got = sam_core.centralize(ops, [t.clone() for t in ts], out=None)
    for g, t in zip(got, ts, strict=True):
        want = torch.from_numpy(_formula(t.double().numpy())).to(torch.bfloat16)
        assert g.dtype == torch.bfloat16
        assert torch.allclose(g.float(), want.float(), atol=0.02, rtol=0.01)


@pytest.mark.parametrize(("x64", "tol"), [(True, 1e-13), (False, 3e-6)])
def test_jax_adapter_matches_the_formula(x64, tol):
    xs = _arrays()
    if x64:
        with jax_x64():
            got = sam_core.centralize(JaxOps(), [jnp.asarray(x) for x in xs])
            got = [np.asarray(g) for g in got]
    else:
        got = [np.asarray(g) for g in sam_core.centralize(JaxOps(), [jnp.asarray(x, jnp.float32) for x in xs])]
    for g, x in zip(got, xs, strict=True):
        np.testing.assert_allclose(g, _formula(x), rtol=0, atol=tol)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=2, max_size=4).map(tuple),
    shift=st.floats(-100, 100),
    seed=st.integers(0, 2**16),
)
def test_rows_have_zero_mean_and_a_row_constant_is_removed(shape, shift, seed):
    g = np.random.default_rng(seed).standard_normal(shape)
    row_constant = np.random.default_rng(seed + 1).standard_normal((shape[0],) + (1,) * (len(shape) - 1))
    ops = sam_core.NumpyOps()
    (c,) = sam_core.centralize(ops, [g])
    (c_shifted,) = sam_core.centralize(ops, [g + shift + row_constant])
    assert np.allclose(c.reshape(shape[0], -1).mean(1), 0.0, atol=1e-12)
    np.testing.assert_allclose(c_shifted, c, atol=1e-9 * (1 + abs(shift)))
    (cc,) = sam_core.centralize(ops, [c])  # idempotent
    np.testing.assert_allclose(cc, c, atol=1e-12)


# -- sam_torch: every SAM-family class ----------------------------------------------------------
TORCH = {
    "sam": (sam_torch.SAM, dict(rho=0.1), dict(rho=0.1)),
    "gsam": (sam_torch.GSAM, dict(rho=0.1, alpha=0.3), dict(rho=0.1, alpha=0.3)),
    "samon": (None, dict(rho=0.2), dict(rho=0.2, mask=[True, False, True, False])),
    "friendly": (
        sam_torch.FriendlySAM, dict(rho=0.1, sigma=0.8, lmbda=0.6), dict(rho=0.1, sigma=0.8, lmbda=0.6)
    ),
    "vasso": (sam_torch.VaSSO, dict(rho=0.1, theta=0.4), dict(rho=0.1, theta=0.4)),
    "looksam": (sam_torch.LookSAM, dict(rho=0.1, k=3, alpha=0.7), dict(rho=0.1, k=3, alpha=0.7)),
    "everyk": (sam_torch.EveryKSAM, dict(rho=0.1, k=3), dict(rho=0.1, k=3)),
    "wsam": (sam_torch.WSAM, dict(rho=0.1, gamma=0.8), dict(rho=0.1, gamma=0.8, decouple=True, lr=LR)),
    "wsam-coupled": (
        sam_torch.WSAM, dict(rho=0.1, gamma=0.6, decouple=False), dict(rho=0.1, gamma=0.6, decouple=False)
    ),
    "msam": (sam_torch.MomentumSAM, dict(rho=0.3), dict(rho=0.3)),
}


@pytest.mark.parametrize("name", sorted(TORCH))
def test_torch_trajectory_matches_the_gc_reference(name):
    cls, kwargs, hp = TORCH[name]
    params0 = init_mlp()
    batches = make_batches(STEPS)
    wd = 0.0 if name == "msam" else WD
    expected, _ = trajectory(name.split("-")[0], params0, batches, SGDRef(LR, MOM, wd), gc=True, **hp)
    plain, _ = trajectory(name.split("-")[0], params0, batches, SGDRef(LR, MOM, wd), **hp)
    assert max_rel_diff(plain, expected) > 1e-4  # gc changes this trajectory
    model = _model(params0)
    ps = list(model.parameters())
    if cls is None:
        opt = sam_torch.SAMON(
            ps, torch.optim.SGD, norm_params=[ps[0], ps[2]], gc=True, lr=LR, momentum=MOM,
            weight_decay=wd, **kwargs,
        )
    else:
        opt = cls(ps, torch.optim.SGD, gc=True, lr=LR, momentum=MOM, weight_decay=wd, **kwargs)
    got, _ = torch_run(opt, model, batches)
    assert max_rel_diff(got, expected) < 1e-10


def test_torch_first_step_centralizes_grad_in_place_and_perturbs_along_it():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2)
    ).double()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, rho=0.2, gc=True, lr=0.1)
    model(x).square().mean().backward()
    raw = [p.grad.detach().numpy().copy() for p in model.parameters()]
    w = [p.detach().numpy().copy() for p in model.parameters()]
    opt.first_step()
    want = [_formula(g) for g in raw]
    norm = np.sqrt(sum(np.sum(g * g) for g in want))
    for p, g, c, w0 in zip(model.parameters(), raw, want, w, strict=True):
        np.testing.assert_allclose(p.grad.numpy(), c, rtol=0, atol=1e-15)  # in .grad
        np.testing.assert_allclose(p.detach().numpy() - w0, 0.2 * c / (norm + 1e-12), atol=1e-14)
        if g.ndim == 1:
            np.testing.assert_array_equal(p.grad.numpy(), g)  # biases untouched
    opt.restore()
    assert all(np.array_equal(p.detach().numpy(), w0) for p, w0 in zip(model.parameters(), w, strict=True))


def test_torch_gc_is_off_by_default_and_validated():
    p = [torch.nn.Parameter(torch.ones(2, 3))]
    assert sam_torch.SAM(p, torch.optim.SGD, lr=0.1).gc is False
    with pytest.raises(TypeError, match="gc"):
        sam_torch.SAM(p, torch.optim.SGD, lr=0.1, gc="yes")
    with pytest.raises(TypeError, match="gc"):
        sam_torch.GSAM(p, torch.optim.SGD, lr=0.1, gc=1)


def test_torch_m_sharpness_with_gc_runs_the_loop_and_refuses_vmap():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    batch = (torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64))

    def loss_fn(m, chunk):
        return (m(chunk[0]) - chunk[1]).square().mean()

    w0 = [p.detach().clone() for p in model.parameters()]
    opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, rho=0.3, gc=True, lr=0.1)
    with pytest.raises(ValueError, match="gc=True"):
        sam_torch.m_sharpness_step(opt, model, loss_fn, batch, m=4, vectorize=True)
    sam_torch.m_sharpness_step(opt, model, loss_fn, batch, m=4)
    # the definition: mean over chunks of the gradient at w + e(centralized chunk gradient)
    ref = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    total = [torch.zeros_like(w) for w in w0]
    for c in range(2):
        chunk = (batch[0][4 * c : 4 * c + 4], batch[1][4 * c : 4 * c + 4])
        with torch.no_grad():
            for p, w in zip(ref.parameters(), w0, strict=True):
                p.copy_(w)
        ref.zero_grad()
        loss_fn(ref, chunk).backward()
        g = [torch.from_numpy(_formula(p.grad.numpy())) for p in ref.parameters()]
        norm = torch.sqrt(sum((x * x).sum() for x in g))
        with torch.no_grad():
            for p, x in zip(ref.parameters(), g, strict=True):
                p.add_(0.3 * x / (norm + 1e-12))
        ref.zero_grad()
        loss_fn(ref, chunk).backward()
        total = [t + p.grad / 2 for t, p in zip(total, ref.parameters(), strict=True)]
    for p, w, t in zip(model.parameters(), w0, total, strict=True):
        torch.testing.assert_close(p.detach(), w - 0.1 * t, rtol=1e-12, atol=1e-14)


# -- sam_jax: every transformation ---------------------------------------------------------------
JAX = {
    "sam": lambda: sam_jax.sam(0.1, gc=True),
    "gsam": lambda: sam_jax.gsam(0.1, alpha=0.3, gc=True),
    "samon": lambda: sam_jax.samon(0.2, mask=[True, False, True, False], gc=True),
    "friendly": lambda: sam_jax.friendly_sam(0.1, sigma=0.8, lmbda=0.6, gc=True),
    "vasso": lambda: sam_jax.vasso(0.1, theta=0.4, gc=True),
    "looksam": lambda: sam_jax.looksam(0.1, k=3, alpha=0.7, gc=True),
    "everyk": lambda: sam_jax.every_k_sam(0.1, k=3, gc=True),
    "wsam-coupled": lambda: sam_jax.wsam(0.1, gamma=0.6, gc=True),
    "msam": lambda: sam_jax.momentum_sam(0.3, momentum=MOM, gc=True),
}


@pytest.mark.parametrize("name", [*sorted(JAX), "wsam"])
def test_jax_trajectory_matches_the_gc_reference(name):
    hp = TORCH[name][2]
    params0 = init_mlp()
    batches = make_batches(STEPS)
    wd = 0.0 if name == "msam" else WD
    expected, _ = trajectory(name.split("-")[0], params0, batches, SGDRef(LR, MOM, wd), gc=True, **hp)
    base = optax.chain(optax.add_decayed_weights(wd), optax.sgd(LR, momentum=MOM))
    with jax_x64():
        if name == "wsam":
            tx = sam_jax.wsam(0.1, gamma=0.8, base=base, learning_rate=LR, gc=True)
        else:
            tx = optax.chain(JAX[name](), base)
        got, _, _ = jax_run(tx, [jnp.asarray(p) for p in params0], batches)
    assert max_rel_diff(got, expected) < 1e-10


@pytest.mark.parametrize(
    "factory",
    [sam_jax.sam, sam_jax.gsam, sam_jax.wsam, sam_jax.samon, sam_jax.friendly_sam, sam_jax.vasso,
     sam_jax.looksam, sam_jax.every_k_sam, sam_jax.momentum_sam],
)
def test_jax_gc_is_validated(factory):
    with pytest.raises(TypeError, match="gc"):
        factory(gc="yes")
