"""Bayesian SAM: sam_torch.BSAM and sam_jax.bsam against a float64 NumPy transcription of
Algorithm 1 of Möllenhoff & Khan (ICLR 2023), torch against JAX, seeds, checkpoints, and
the predictive helpers."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from tests.reference import init_mlp, make_batches, mlp_loss_and_grad

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import sam_jax  # noqa: E402
import sam_torch  # noqa: E402
from tests.helpers import jax_x64, max_rel_diff  # noqa: E402
from tests.variants.test_torch_variants import _model  # noqa: E402

N, LR, BETAS, RHO, DAMPING, WD = 500, 0.05, (0.8, 0.95), 0.03, 0.1, 0.02
STEPS = 6
HP = dict(num_data=N, lr=LR, betas=BETAS, rho=RHO, damping=DAMPING, weight_decay=WD)


# -- the reference: Algorithm 1, element-wise, float64 ------------------------------------------
def _centre(g):
    if g.ndim < 2:
        return g
    rows = g.reshape(g.shape[0], -1)
    return (rows - rows.mean(axis=1, keepdims=True)).reshape(g.shape)


def bsam_reference(params, batches, noises, *, num_data, lr, betas, rho, damping, weight_decay,
                   s_init=1.0, gc=False):
    """omega, s, g_m after len(batches) steps; noises[t][i] is z for parameter i at step t."""
    b1, b2 = betas
    w = [p.astype(np.float64).copy() for p in params]
    s = [np.full_like(p, s_init) for p in w]
    gm = [np.zeros_like(p) for p in w]
    losses = []
    for (x, t), z in zip(batches, noises, strict=True):
        theta = [wi + zi / np.sqrt(num_data * si) for wi, zi, si in zip(w, z, s, strict=True)]
        loss, g = mlp_loss_and_grad(theta, x, t)
        losses.append(loss)
        d = [_centre(gi) for gi in g] if gc else g
        eps = [rho * di / si for di, si in zip(d, s, strict=True)]
        _, ge = mlp_loss_and_grad([wi + ei for wi, ei in zip(w, eps, strict=True)], x, t)
        gm = [b1 * mi + (1 - b1) * (gei + weight_decay * wi) for mi, gei, wi in zip(gm, ge, w, strict=True)]
        s = [
            b2 * si + (1 - b2) * (np.sqrt(si) * np.abs(gi) + weight_decay + damping)
            for si, gi in zip(s, g, strict=True)
        ]
        w = [wi - lr * mi / si for wi, mi, si in zip(w, gm, s, strict=True)]
    return w, s, gm, losses


def _noises(params, steps, seed=7):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(p.shape) for p in params] for _ in range(steps)]


# -- torch ---------------------------------------------------------------------------------------
def _closure(model, x, t, calls):
    def closure():
        calls.append(1)
        loss = ((model(x) - t) ** 2).mean()
        loss.backward()
        return loss

    return closure


def _torch_run(opt, model, batches, noises=None):
    calls, losses = [], []
    for i, (x, t) in enumerate(batches):
        closure = _closure(model, torch.from_numpy(x), torch.from_numpy(t), calls)
        noise = None if noises is None else [torch.from_numpy(z) for z in noises[i]]
        losses.append(float(opt.step(closure, noise=noise).detach()))
    return [p.detach().numpy().copy() for p in model.parameters()], calls, losses


@pytest.mark.parametrize("gc", [False, True])
def test_torch_matches_algorithm_1(gc):
    params0 = init_mlp()
    batches = make_batches(STEPS)
    noises = _noises(params0, STEPS)
    w, s, gm, ref_losses = bsam_reference(params0, batches, noises, gc=gc, **HP)
    model = _model(params0)
    opt = sam_torch.BSAM(model.parameters(), gc=gc, **HP)
    got, calls, losses = _torch_run(opt, model, batches, noises)
    assert len(calls) == 2 * STEPS
    assert max_rel_diff(got, w) < 1e-12
    ps = list(model.parameters())
    assert max_rel_diff([opt.state[p]["precision"].numpy() for p in ps], s) < 1e-12
    assert max_rel_diff([opt.state[p]["momentum"].numpy() for p in ps], gm) < 1e-12
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-12)  # the loss at the sample
    want_std = [1 / np.sqrt(N * si) for si in s]
    assert max_rel_diff([x.numpy() for x in opt.posterior_std()], want_std) < 1e-12


def test_torch_noise_is_the_documented_draw_from_the_seed():
    params0 = init_mlp()
    batches = make_batches(STEPS)
    gen = torch.Generator().manual_seed(11)
    noises = [
        [torch.randn(p.shape, generator=gen, dtype=torch.float64).numpy() for p in params0]
        for _ in range(STEPS)
    ]
    w, *_ = bsam_reference(params0, batches, noises, **HP)
    model = _model(params0)
    got, _, _ = _torch_run(sam_torch.BSAM(model.parameters(), seed=11, **HP), model, batches)
    assert max_rel_diff(got, w) < 1e-12
    model2 = _model(params0)
    other, _, _ = _torch_run(sam_torch.BSAM(model2.parameters(), seed=12, **HP), model2, batches)
    assert max_rel_diff(other, w) > 1e-6


def test_torch_state_dict_resumes_exactly():
    params0 = init_mlp()
    batches = make_batches(2 * 3)
    model = _model(params0)
    opt = sam_torch.BSAM(model.parameters(), seed=5, **HP)
    _torch_run(opt, model, batches[:3])
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_w = [p.detach().numpy().copy() for p in model.parameters()]
    straight, _, _ = _torch_run(opt, model, batches[3:])
    model2 = _model(saved_w)
    opt2 = sam_torch.BSAM(model2.parameters(), seed=5, **HP)
    opt2.load_state_dict(saved_opt)
    resumed, _, _ = _torch_run(opt2, model2, batches[3:])
    for a, b in zip(straight, resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_torch_restores_the_mean_when_the_closure_raises():
    model = _model(init_mlp())
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = sam_torch.BSAM(model.parameters(), seed=0, **HP)
    x, t = (torch.from_numpy(a) for a in make_batches(1)[0])
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        loss = ((model(x) - t) ** 2).mean()
        loss.backward()
        return loss

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0, strict=True))


def test_torch_errors_name_the_argument():
    ps = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="num_data"):
        sam_torch.BSAM(ps, num_data=0)
    with pytest.raises(ValueError, match="betas"):
        sam_torch.BSAM(ps, num_data=10, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="weight_decay \\+ damping"):
        sam_torch.BSAM(ps, num_data=10, damping=0.0, weight_decay=0.0)
    with pytest.raises(ValueError, match="rho"):
        sam_torch.BSAM(ps, num_data=10, rho=-1.0)
    with pytest.raises(RuntimeError, match="closure"):
        sam_torch.BSAM(ps, num_data=10).step()
    with pytest.raises(ValueError, match="noise"):
        sam_torch.BSAM(ps, num_data=10).step(lambda: None, noise=[torch.ones(3)])


def test_torch_predictive_averages_softmax_over_the_documented_samples():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    opt = sam_torch.BSAM(model.parameters(), num_data=20, lr=0.1, seed=1)
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    for _ in range(3):
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y).backward())
    w = [p.detach().clone() for p in model.parameters()]
    probs = sam_torch.predictive(model, opt, x, samples=5, seed=3)
    assert all(torch.equal(p, wi) for p, wi in zip(model.parameters(), w, strict=True))
    torch.testing.assert_close(probs, sam_torch.predictive(model, opt, x, samples=5, seed=3), rtol=0, atol=0)
    # the reference: S draws in parameter order from a generator seeded with `seed`
    gen = torch.Generator().manual_seed(3)
    s = [opt.state[p]["precision"].numpy() for p in model.parameters()]
    total = np.zeros((6, 3))
    for _ in range(5):
        theta = [
            wi.numpy() + torch.randn(wi.shape, generator=gen, dtype=torch.float64).numpy() / np.sqrt(20 * si)
            for wi, si in zip(w, s, strict=True)
        ]
        h = np.tanh(x.numpy() @ theta[0].T + theta[1])
        logits = h @ theta[2].T + theta[3]
        e = np.exp(logits - logits.max(1, keepdims=True))
        total += e / e.sum(1, keepdims=True)
    np.testing.assert_allclose(probs.numpy(), total / 5, rtol=1e-12)
    np.testing.assert_allclose(probs.sum(-1).numpy(), 1.0, rtol=1e-12)
    mean_probs = model(x).softmax(-1)
    assert not torch.allclose(probs, mean_probs)  # samples are not the mean
    with pytest.raises(TypeError, match="BSAM"):
        sam_torch.predictive(model, torch.optim.SGD(model.parameters(), lr=0.1), x)


# -- JAX -----------------------------------------------------------------------------------------
def mlp_loss(params, x, t):
    w1, b1, w2, b2 = params
    return jnp.mean((jnp.tanh(x @ w1.T + b1) @ w2.T + b2 - t) ** 2)


def _jax_run(tx, params, batches, noises=None):
    @jax.jit
    def step(params, state, x, t, noise):
        grad_fn = jax.value_and_grad(lambda p: mlp_loss(p, x, t))
        updates, state = tx.update(None, state, params, grad_fn=grad_fn, noise=noise)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    values = []
    for i, (x, t) in enumerate(batches):
        noise = None if noises is None else [jnp.asarray(z) for z in noises[i]]
        params, state = step(params, state, jnp.asarray(x), jnp.asarray(t), noise)
        values.append(float(state.value))
    return [np.asarray(p) for p in params], state, values


@pytest.mark.parametrize("gc", [False, True])
def test_jax_matches_algorithm_1_and_torch(gc):
    params0 = init_mlp()
    batches = make_batches(STEPS)
    noises = _noises(params0, STEPS)
    w, s, gm, ref_losses = bsam_reference(params0, batches, noises, gc=gc, **HP)
    with jax_x64():
        got, state, values = _jax_run(sam_jax.bsam(gc=gc, **HP), [jnp.asarray(p) for p in params0], batches, noises)
    assert max_rel_diff(got, w) < 1e-12
    assert max_rel_diff([np.asarray(x) for x in state.precision], s) < 1e-12
    assert max_rel_diff([np.asarray(x) for x in state.momentum], gm) < 1e-12
    np.testing.assert_allclose(values, ref_losses, rtol=1e-12)
    model = _model(params0)  # the same noise through sam_torch
    torch_w, _, _ = _torch_run(sam_torch.BSAM(model.parameters(), gc=gc, **HP), model, batches, noises)
    assert max_rel_diff(got, torch_w) < 1e-12


def test_jax_noise_comes_from_the_state_key_reproducibly():
    params0 = [jnp.asarray(p, jnp.float32) for p in init_mlp()]
    batches = make_batches(3)
    a, _, _ = _jax_run(sam_jax.bsam(seed=2, **HP), params0, batches)
    b, _, _ = _jax_run(sam_jax.bsam(seed=2, **HP), params0, batches)
    c, _, _ = _jax_run(sam_jax.bsam(seed=3, **HP), params0, batches)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert max_rel_diff(a, c) > 1e-6
    with jax_x64():  # the documented draw: bsam_noise(split(state.key)[1], params)
        p64 = [jnp.asarray(p) for p in init_mlp()]
        tx = sam_jax.bsam(seed=4, **HP)
        key = tx.init(p64).key
        noises = []
        for _ in batches:
            key, sub = jax.random.split(key)
            noises.append([np.asarray(z) for z in sam_jax.bsam_noise(sub, p64)])
        auto, _, _ = _jax_run(tx, p64, batches)
        given, _, _ = _jax_run(tx, p64, batches, noises)
    assert max_rel_diff(auto, given) < 1e-14


def test_jax_predictive_averages_softmax_over_samples():
    with jax_x64():
        rng = np.random.default_rng(0)
        params = [jnp.asarray(rng.standard_normal(s) * 0.5) for s in [(5, 4), (5,), (3, 5), (3,)]]

        def apply_fn(p, x):
            return jnp.tanh(x @ p[0].T + p[1]) @ p[2].T + p[3]

        x = jnp.asarray(rng.standard_normal((6, 4)))
        y = jnp.asarray(rng.integers(0, 3, 6))
        tx = sam_jax.bsam(num_data=20, lr=0.1, seed=1)
        state = tx.init(params)

        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()

        for _ in range(3):
            u, state = tx.update(None, state, params, grad_fn=jax.value_and_grad(loss))
            params = optax.apply_updates(params, u)
        key = jax.random.PRNGKey(9)
        chained = (state, optax.EmptyState())
        probs = sam_jax.predictive(apply_fn, params, chained, x, key=key, samples=4)
        total = 0.0
        for k in jax.random.split(key, 4):
            z = sam_jax.bsam_noise(k, params)
            theta = [w + zi / jnp.sqrt(20.0 * s) for w, zi, s in zip(params, z, state.precision, strict=True)]
            total = total + jax.nn.softmax(apply_fn(theta, x))
        np.testing.assert_allclose(np.asarray(probs), np.asarray(total) / 4, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-12)
    with pytest.raises(TypeError, match="BSAMState"):
        sam_jax.predictive(apply_fn, params, optax.EmptyState(), x, key=key)


def test_jax_errors():
    with pytest.raises(ValueError, match="num_data"):
        sam_jax.bsam(num_data=-1)
    with pytest.raises(TypeError, match="gc"):
        sam_jax.bsam(num_data=10, gc=1)
    tx = sam_jax.bsam(num_data=10)
    state = tx.init([jnp.ones(2)])
    with pytest.raises(TypeError, match="grad_fn"):
        tx.update(None, state, [jnp.ones(2)])
