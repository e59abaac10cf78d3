"""SAF and MESA (Du et al., NeurIPS 2022) in both backends against an independent float64
NumPy transcription of the paper's rules (the tempered KL and its gradient by hand, the EMA,
the official code's memory of lag + 1 epochs written before it is read), torch == JAX on
an MLP trained for several epochs with the indices handed out, the start-epoch gate, exact
resume and the argument checks."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import sam_core
from tests.helpers import jax_x64

N, C, D, H, B = 12, 3, 5, 6, 4
LR, MOM = 0.2, 0.9
EPOCHS = 6


# -- the independent reference -----------------------------------------------------------------
def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _kl_loss(z, ref, tau, lam):
    """lam * tau^2 * mean_i sum_c p log(p / q), p = softmax(ref/tau), q = softmax(z/tau)."""
    p, q = _softmax(ref / tau), _softmax(z / tau)
    return lam * tau**2 * np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))


def _kl_grad(z, ref, tau, lam):
    """d/dz of _kl_loss: lam * tau / B * (q - p)."""
    return lam * tau / z.shape[0] * (_softmax(z / tau) - _softmax(ref / tau))


def _init(seed=0):
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal((H, D)) * 0.8,
        rng.standard_normal(H) * 0.1,
        rng.standard_normal((C, H)) * 0.8,
        rng.standard_normal(C) * 0.1,
    ]


def _data(seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D))
    y = rng.integers(0, C, N)
    orders = [rng.permutation(N) for _ in range(EPOCHS)]
    return x, y, orders


def _forward(params, x):
    w1, b1, w2, b2 = params
    a = np.tanh(x @ w1.T + b1)
    return a, a @ w2.T + b2


def _backward(params, x, a, dz):
    w2 = params[2]
    da = dz @ w2 * (1 - a**2)
    return [da.T @ x, da.sum(0), dz.T @ a, dz.sum(0)]


def _reference_run(form, *, lam, tau, start, lag=2, decay=0.5, end=None):
    """SGD with momentum on CE + the trajectory loss, every formula by hand; returns the
    parameters after each epoch and the trajectory losses of every step."""
    params = _init()
    x, y, orders = _data()
    bufs = [np.zeros_like(p) for p in params]
    ema = [p.copy() for p in params]
    ring = np.zeros((N, lag + 1, C))  # the official code's: write slot e % (lag+1), read (e-lag) % (lag+1)
    history, losses = [], []
    for e in range(EPOCHS):
        for b in range(N // B):
            idx = orders[e][b * B:(b + 1) * B]
            a, z = _forward(params, x[idx])
            onehot = np.eye(C)[y[idx]]
            dz = (_softmax(z) - onehot) / B
            on = e > start and (end is None or e < end)
            if form == "saf":
                ring[idx, e % (lag + 1)] = z
                ref = ring[idx, (e - lag) % (lag + 1)]
            else:
                ref = _forward(ema, x[idx])[1]
            losses.append(_kl_loss(z, ref, tau, lam) if on else 0.0)
            if on:
                dz = dz + _kl_grad(z, ref, tau, lam)
            grads = _backward(params, x[idx], a, dz)
            for p, g, m in zip(params, grads, bufs, strict=True):
                m *= MOM
                m += g
                p -= LR * m
            ema = [decay * m + (1 - decay) * p for m, p in zip(ema, params, strict=True)]
        history.append([p.copy() for p in params])
    return history, losses


# -- torch -------------------------------------------------------------------------------------
def _torch_model():
    import torch

    w1, b1, w2, b2 = (torch.tensor(p) for p in _init())
    model = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, C)).double()
    with torch.no_grad():
        model[0].weight.copy_(w1)
        model[0].bias.copy_(b1)
        model[2].weight.copy_(w2)
        model[2].bias.copy_(b2)
    return model


def _torch_params(model):
    return [p.detach().numpy().copy() for p in model.parameters()]


def _torch_epochs(model, opt, form, epochs, *, closure=False):
    import torch
    import torch.nn.functional as F

    x, y, orders = _data()
    xt, yt = torch.tensor(x), torch.tensor(y)
    history, losses = [], []
    for e in epochs:
        for b in range(N // B):
            idx = torch.tensor(orders[e][b * B:(b + 1) * B])

            def compute(idx=idx, e=e):
                logits = model(xt[idx])
                if form == "saf":
                    traj = opt.trajectory_loss(logits, idx, e)
                else:
                    ema_logits = opt.ema_outputs(model, xt[idx]) if opt.active(e) else None
                    traj = opt.trajectory_loss(logits, ema_logits, e)
                losses.append(float(traj.detach()))
                return F.cross_entropy(logits, yt[idx]) + traj

            if closure:
                def step_closure(compute=compute):
                    opt.zero_grad()
                    loss = compute()
                    loss.backward()
                    return loss

                opt.step(step_closure)
            else:
                loss = compute()
                opt.zero_grad()
                loss.backward()
                opt.step()
        history.append(_torch_params(model))
    return history, losses


def _torch_opt(form, model, **hp):
    import torch

    import sam_torch

    if form == "saf":
        return sam_torch.SAF(model.parameters(), torch.optim.SGD, num_examples=N, lr=LR, momentum=MOM, **hp)
    return sam_torch.MESA(model, torch.optim.SGD, lr=LR, momentum=MOM, **hp)


# -- JAX ---------------------------------------------------------------------------------------
def _jax_run(form, **hp):
    import jax
    import jax.numpy as jnp
    import optax

    import sam_jax

    x, y, orders = _data()
    x, y = jnp.asarray(x), jnp.asarray(y)
    params = [jnp.asarray(p) for p in _init()]

    def apply(p, xb):
        w1, b1, w2, b2 = p
        return jnp.tanh(xb @ w1.T + b1) @ w2.T + b2

    if form == "saf":
        opt = sam_jax.saf(optax.sgd(LR, momentum=MOM), num_examples=N, num_classes=C,
                          memory_dtype=jnp.float64, **hp)
    else:
        opt = sam_jax.mesa(optax.sgd(LR, momentum=MOM), **hp)
    state = opt.init(params)

    @jax.jit
    def step(params, state, idx, epoch):
        def loss_fn(p):
            logits = apply(p, x[idx])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()
            if form == "saf":
                traj = state.trajectory_loss(logits, idx, epoch)
            else:
                traj = state.trajectory_loss(logits, apply(state.ema, x[idx]), epoch)
            return ce + traj, (logits, traj)

        (_, (logits, traj)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        extra = {"logits": logits, "indices": idx, "epoch": epoch} if form == "saf" else {}
        updates, state = opt.update(g, state, params, **extra)
        return optax.apply_updates(params, updates), state, traj

    history, losses = [], []
    for e in range(EPOCHS):
        for b in range(N // B):
            idx = jnp.asarray(orders[e][b * B:(b + 1) * B])
            params, state, traj = step(params, state, idx, jnp.asarray(e, jnp.int32))
            losses.append(float(traj))
        history.append([np.asarray(p) for p in params])
    return history, losses


def _close(a, b, tol=1e-10):
    for xs, ys in zip(a, b, strict=True):
        for u, v in zip(xs, ys, strict=True):
            np.testing.assert_allclose(u, v, rtol=tol, atol=tol)


CASES = {
    "saf": dict(lmbda=0.7, temperature=2.0, start_epoch=1, lag_epochs=2),
    "mesa": dict(lmbda=0.9, temperature=3.0, start_epoch=1, decay=0.5),
}


def _ref_kwargs(form):
    hp = CASES[form]
    kw = dict(lam=hp["lmbda"], tau=hp["temperature"], start=hp["start_epoch"])
    if form == "saf":
        kw["lag"] = hp["lag_epochs"]
    else:
        kw["decay"] = hp["decay"]
    return kw


# -- the rule ----------------------------------------------------------------------------------
def test_core_loss_and_gradient_match_the_formula():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    z, ref = rng.standard_normal((5, 4)) * 3, rng.standard_normal((5, 4)) * 3
    zt = torch.tensor(z, requires_grad=True)
    loss = sam_core.trajectory_loss(
        zt, torch.tensor(ref), temperature=5.0, lmbda=0.3,
        log_softmax=lambda v: torch.log_softmax(v, -1), exp=torch.exp,
    )
    loss.backward()
    np.testing.assert_allclose(float(loss.detach()), _kl_loss(z, ref, 5.0, 0.3), rtol=1e-13)
    np.testing.assert_allclose(zt.grad.numpy(), _kl_grad(z, ref, 5.0, 0.3), rtol=1e-12, atol=1e-15)
    # the divergence of a reference from itself is 0, and it is >= 0
    same = sam_core.trajectory_loss(
        torch.tensor(z), torch.tensor(z), temperature=2.0, lmbda=1.0,
        log_softmax=lambda v: torch.log_softmax(v, -1), exp=torch.exp,
    )
    assert abs(float(same)) < 1e-15 and float(loss.detach()) > 0


def test_gate_and_slot():
    assert [bool(sam_core.trajectory_active(e, 2)) for e in range(5)] == [False, False, False, True, True]
    assert [bool(sam_core.trajectory_active(e, 1, 4)) for e in range(6)] == [False, False, True, True, False, False]
    assert [sam_core.saf_slot(e, 3) for e in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert sam_core.SAF_DEFAULTS == {"lmbda": 0.3, "temperature": 5.0, "start_epoch": 5, "lag_epochs": 3}
    assert sam_core.MESA_DEFAULTS == {"lmbda": 0.8, "temperature": 5.0, "start_epoch": 5, "decay": 0.9998}


# -- whole runs against the reference ------------------------------------------------------------
@pytest.mark.parametrize("form", ["saf", "mesa"])
def test_torch_matches_reference(form):
    pytest.importorskip("torch")
    ref_hist, ref_losses = _reference_run(form, **_ref_kwargs(form))
    model = _torch_model()
    hist, losses = _torch_epochs(model, _torch_opt(form, model, **CASES[form]), form, range(EPOCHS))
    _close(hist, ref_hist)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-10, atol=1e-14)
    steps = N // B
    # gate: exactly 0 through start_epoch, then on (and the run is not SGD's)
    assert losses[: steps * 2] == [0.0] * (steps * 2)
    assert min(losses[steps * 2:]) > 1e-6


@pytest.mark.parametrize("form", ["saf", "mesa"])
def test_jax_matches_reference_and_torch(form):
    pytest.importorskip("jax")
    ref_hist, ref_losses = _reference_run(form, **_ref_kwargs(form))
    with jax_x64():
        hist, losses = _jax_run(form, **CASES[form])
    _close(hist, ref_hist)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-10, atol=1e-14)
    if pytest.importorskip("torch"):
        model = _torch_model()
        torch_hist, torch_losses = _torch_epochs(model, _torch_opt(form, model, **CASES[form]), form, range(EPOCHS))
        _close(hist, torch_hist, tol=1e-12)
        np.testing.assert_allclose(losses, torch_losses, rtol=1e-12, atol=1e-15)


def test_end_epoch_turns_it_off():
    pytest.importorskip("torch")
    hp = dict(CASES["saf"], end_epoch=4)
    ref_hist, ref_losses = _reference_run("saf", **_ref_kwargs("saf"), end=4)
    assert ref_losses[: 2 * (N // B)] == [0.0] * (2 * (N // B))
    model = _torch_model()
    hist, losses = _torch_epochs(model, _torch_opt("saf", model, **hp), "saf", range(EPOCHS))
    _close(hist, ref_hist)
    steps = N // B
    assert losses[steps * 4:] == [0.0] * (steps * 2) and min(losses[steps * 2: steps * 4]) > 0


@pytest.mark.parametrize("form", ["saf", "mesa"])
def test_step_closure_is_the_same_run(form):
    pytest.importorskip("torch")
    model = _torch_model()
    plain, _ = _torch_epochs(model, _torch_opt(form, model, **CASES[form]), form, range(4))
    model = _torch_model()
    closed, _ = _torch_epochs(model, _torch_opt(form, model, **CASES[form]), form, range(4), closure=True)
    _close(plain, closed, tol=0)


@pytest.mark.parametrize("form", ["saf", "mesa"])
def test_state_dict_resume_is_exact(form):
    torch = pytest.importorskip("torch")
    model = _torch_model()
    opt = _torch_opt(form, model, **CASES[form])
    _torch_epochs(model, opt, form, range(3))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    straight, _ = _torch_epochs(model, opt, form, range(3, EPOCHS))

    model2 = _torch_model()
    opt2 = _torch_opt(form, model2, **CASES[form])
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    resumed, _ = _torch_epochs(model2, opt2, form, range(3, EPOCHS))
    _close(straight, resumed, tol=0)
    if form == "saf":
        assert torch.equal(opt.memory, opt2.memory)
    else:
        assert all(torch.equal(a, b) for a, b in zip(opt.ema, opt2.ema, strict=True))
    with pytest.raises(KeyError, match=form):
        opt2.load_state_dict(opt2.base_optimizer.state_dict())


def test_mesa_with_adam_and_ema_outputs_leave_the_model_alone():
    torch = pytest.importorskip("torch")
    import sam_torch

    model = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Dropout(0.5), torch.nn.Linear(H, C)).double()
    opt = sam_torch.MESA(model, torch.optim.Adam, lr=0.01, decay=0.9, start_epoch=0)
    x = torch.randn(B, D, dtype=torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    out = opt.ema_outputs(None, x)
    assert model.training and out.grad_fn is None
    model.eval()
    np.testing.assert_allclose(out.numpy(), model(x).detach().numpy(), rtol=0, atol=0)  # ema == w at start
    model.train()
    ema = [b.clone() for b in before]
    for _ in range(3):
        logits = model(x)
        loss = logits.square().mean() + opt.trajectory_loss(logits, opt.ema_outputs(model, x), 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema = [0.9 * e + 0.1 * p.detach() for e, p in zip(ema, model.parameters(), strict=True)]
    # the EMA it holds is the recursion by hand over the parameters after each step
    for got, want in zip(opt.ema, ema, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-14, atol=1e-15)
    assert not all(torch.equal(e, p) for e, p in zip(opt.ema, model.parameters(), strict=True))


# -- argument checks -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(lmbda=-0.1), ValueError, "lmbda must be a finite number >= 0"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(start_epoch=1.5), TypeError, "start_epoch must be an int"),
        (dict(start_epoch=-1), ValueError, "start_epoch must be an int >= 0"),
        (dict(start_epoch=3, end_epoch=4), ValueError, "end_epoch=4 leaves no epoch"),
        (dict(lag_epochs=0), ValueError, "lag_epochs must be an int >= 1"),
        (dict(start_epoch=1, lag_epochs=3), ValueError, "lag_epochs=3 is more than start_epoch"),
        (dict(num_examples=0), ValueError, "num_examples must be an int >= 1"),
    ],
)
def test_saf_arguments(kwargs, error, match):
    torch = pytest.importorskip("torch")
    import sam_torch

    kw = dict(num_examples=N) | kwargs
    with pytest.raises(error, match=match):
        sam_torch.SAF([torch.zeros(2, requires_grad=True)], torch.optim.SGD, lr=0.1, **kw)
    pytest.importorskip("jax")
    import optax

    import sam_jax

    with pytest.raises(error, match=match):
        sam_jax.saf(optax.sgd(0.1), num_classes=C, **kw)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(decay=1.0), ValueError, "decay must be in \\[0, 1\\)"),
        (dict(decay=-0.5), ValueError, "decay must be in"),
        (dict(lmbda=float("inf")), ValueError, "lmbda must be a finite"),
        (dict(temperature=True), TypeError, "temperature must be a real number"),
    ],
)
def test_mesa_arguments(kwargs, error, match):
    torch = pytest.importorskip("torch")
    import sam_torch

    with pytest.raises(error, match=match):
        sam_torch.MESA([torch.zeros(2, requires_grad=True)], torch.optim.SGD, lr=0.1, **kwargs)
    pytest.importorskip("jax")
    import optax

    import sam_jax

    with pytest.raises(error, match=match):
        sam_jax.mesa(optax.sgd(0.1), **kwargs)


def test_call_errors_name_the_fix():
    torch = pytest.importorskip("torch")
    import sam_torch

    p = torch.zeros(2, requires_grad=True)
    saf = sam_torch.SAF([p], torch.optim.SGD, num_examples=N, lr=0.1)
    logits = torch.zeros(B, C)
    with pytest.raises(ValueError, match="one training-set index per row"):
        saf.trajectory_loss(logits, torch.arange(B + 1), 0)
    with pytest.raises(ValueError, match=r"indices must be training-set positions in \[0, num_examples=12\)"):
        saf.trajectory_loss(logits, torch.arange(B) + N - 1, 0)
    with pytest.raises(TypeError, match="epoch must be the zero-based epoch"):
        saf.trajectory_loss(logits, torch.arange(B), 0.5)
    with pytest.raises(ValueError, match="logits must be the model's outputs of shape"):
        saf.trajectory_loss(torch.zeros(B), torch.arange(B), 0)
    mesa = sam_torch.MESA([p], torch.optim.SGD, lr=0.1, start_epoch=0)
    with pytest.raises(ValueError, match=r"pass opt\.ema_outputs"):
        mesa.trajectory_loss(logits, None, 1)
    with pytest.raises(TypeError, match="ema_outputs needs the model"):
        mesa.ema_outputs(None, logits)
    with pytest.raises(TypeError, match="base_optimizer must be an optimizer class"):
        sam_torch.MESA([p], torch.optim.SGD([p], lr=0.1))


def test_jax_call_errors():
    pytest.importorskip("jax")
    import jax.numpy as jnp
    import optax

    import sam_jax

    opt = sam_jax.saf(optax.sgd(0.1), num_examples=N, num_classes=C)
    state = opt.init([jnp.zeros(2)])
    logits = jnp.zeros((B, C))
    with pytest.raises(ValueError, match="indices must be training-set positions"):
        state.trajectory_loss(logits, jnp.arange(B) + N, 0)
    with pytest.raises(ValueError, match="pass them"):
        opt.update([jnp.zeros(2)], state, [jnp.zeros(2)])
    mesa = sam_jax.mesa(optax.sgd(0.1))
    with pytest.raises(ValueError, match="pass params to update"):
        mesa.update([jnp.zeros(2)], mesa.init([jnp.zeros(2)]))


def test_property_shift_invariance_and_nonnegativity():
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    torch = pytest.importorskip("torch")

    def loss(z, r, tau):
        return float(sam_core.trajectory_loss(
            torch.tensor(z), torch.tensor(r), temperature=tau, lmbda=1.0,
            log_softmax=lambda v: torch.log_softmax(v, -1), exp=torch.exp,
        ))

    @hypothesis.settings(max_examples=20, deadline=None)
    @hypothesis.given(st.integers(0, 2**31 - 1), st.floats(0.5, 10.0), st.floats(-50.0, 50.0))
    def check(seed, tau, shift):
        rng = np.random.default_rng(seed)
        z, r = rng.standard_normal((3, 4)) * 4, rng.standard_normal((3, 4)) * 4
        base = loss(z, r, tau)
        assert base >= -1e-12
        np.testing.assert_allclose(base, _kl_loss(z, r, tau, 1.0), rtol=1e-9, atol=1e-12)
        # softmax ignores a per-row shift of either side's logits
        np.testing.assert_allclose(loss(z + shift, r - shift, tau), base, rtol=1e-9, atol=1e-11)
        assert abs(loss(r + shift, r, tau)) < 1e-11

    check()
