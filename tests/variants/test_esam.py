"""ESAM (Du et al., ICLR 2022) in both backends against an independent float64 NumPy
transcription of its two rules, torch == JAX with the same masks, the reduction to SAM,
the selection, the masks' statistics, exact resume and the argument checks."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

import sam_core
from tests.helpers import jax_x64, max_rel_diff
from tests.reference import SGDRef, init_mlp, make_batches

LR, MOM, WD, RHO = 0.1, 0.9, 5e-4, 0.3
STEPS = 5
B = 16


# -- the independent reference -----------------------------------------------------------------
def _forward(params, x):
    w1, b1, w2, b2 = params
    a = np.tanh(x @ w1.T + b1)
    return a, a @ w2.T + b2


def _per_example(params, x, t):
    """l_i = mean_j (y_ij - t_ij)^2."""
    _, y = _forward(params, x)
    return ((y - t) ** 2).mean(axis=1)


def _grad_of_mean(params, x, t):
    """Gradient of mean_i l_i over the rows given, by hand."""
    w2 = params[2]
    a, y = _forward(params, x)
    dy = 2.0 * (y - t) / (t.shape[1] * x.shape[0])
    da = dy @ w2
    dz = da * (1.0 - a * a)
    return [dz.T @ x, dz.sum(0), dy.T @ a, dy.sum(0)]


def _reference_step(params, x, t, masks, *, beta, gamma, eps=1e-12):
    """One ESAM step as the paper and the official code state it (masked norm, rho/beta,
    the k = floor(gamma B) largest increases); returns (update gradient, selected)."""
    clean = _per_example(params, x, t)
    g = _grad_of_mean(params, x, t)
    mg = [gi * np.asarray(mi, np.float64) for gi, mi in zip(g, masks, strict=True)]
    norm = math.sqrt(sum(float(np.sum(v * v)) for v in mg))
    point = [w + (RHO / beta) * v / (norm + eps) for w, v in zip(params, mg, strict=True)]
    rise = _per_example(point, x, t) - clean
    k = max(1, math.floor(gamma * len(rise) + 1e-9))
    selected = np.sort(np.argsort(-rise, kind="stable")[:k])
    return _grad_of_mean(point, x[selected], t[selected]), selected


def _reference_trajectory(params, batches, masks, *, beta, gamma):
    sgd = SGDRef(LR, MOM, WD)
    params = [w.copy() for w in params]
    out, chosen = [], []
    for (x, t), m in zip(batches, masks, strict=True):
        u, sel = _reference_step(params, x, t, m, beta=beta, gamma=gamma)
        params = sgd.step(params, u)
        out.append([w.copy() for w in params])
        chosen.append(sel)
    return out, chosen


def _masks(params, mode, seed=3):
    rng = np.random.default_rng(seed)
    if mode == "tensor":  # at least one kept tensor per step
        steps = []
        for _ in range(STEPS):
            keep = rng.random(len(params)) < 0.5
            keep[rng.integers(len(params))] = True
            steps.append([np.asarray(bool(k)) for k in keep])
        return steps
    return [[rng.random(w.shape) < 0.5 for w in params] for _ in range(STEPS)]


# -- torch ---------------------------------------------------------------------------------------
def _torch_run(params, batches, masks, *, beta, gamma, calls=None, **kw):
    torch = pytest.importorskip("torch")
    import sam_torch

    model = _torch_model(params)
    opt = sam_torch.ESAM(
        model.parameters(), torch.optim.SGD, rho=RHO, beta=beta, gamma=gamma, lr=LR,
        momentum=MOM, weight_decay=WD, **kw,
    )
    out, chosen = [], []
    for i, (x, t) in enumerate(batches):
        xt, tt = torch.from_numpy(x), torch.from_numpy(t)

        def closure(index=None, xt=xt, tt=tt):
            if calls is not None:
                calls.append((None if index is None else index.tolist(), torch.is_grad_enabled()))
            xs, ts = (xt, tt) if index is None else (xt[index], tt[index])
            return ((model(xs) - ts) ** 2).mean(dim=1)

        step_masks = None if masks is None else [torch.as_tensor(m) for m in masks[i]]
        opt.step(closure, masks=step_masks)
        out.append([p.detach().numpy().copy() for p in model.parameters()])
        chosen.append(None if opt.selected is None else opt.selected.numpy())
    return out, chosen, opt, model


def _torch_model(params):
    torch = pytest.importorskip("torch")
    from torch import nn

    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    with torch.no_grad():
        for p, w in zip(model.parameters(), params, strict=True):
            p.copy_(torch.from_numpy(w))
    return model


@pytest.mark.parametrize("mode", ["tensor", "element"])
@pytest.mark.parametrize("gamma", [0.5, 0.25])
def test_torch_matches_reference(mode, gamma):
    params, batches = init_mlp(), make_batches(STEPS, n=B)
    masks = _masks(params, mode)
    want, want_sel = _reference_trajectory(params, batches, masks, beta=0.5, gamma=gamma)
    got, got_sel, _, _ = _torch_run(params, batches, masks, beta=0.5, gamma=gamma, mask=mode)
    for a, b, sa, sb in zip(got, want, got_sel, want_sel, strict=True):
        assert max_rel_diff(a, b) < 1e-12
        np.testing.assert_array_equal(sa, sb)  # SDS picked exactly the largest increases


def test_torch_pass_structure():
    """gamma < 1: closure() with grad at w, closure() without grad at w + e, closure(index)
    with grad on k examples; gamma = 1: two calls, as SAM."""
    params, batches = init_mlp(), make_batches(1, n=B)
    calls: list = []
    _torch_run(params, batches, None, beta=0.5, gamma=0.25, calls=calls)
    assert [(c[0] is None, c[1]) for c in calls] == [(True, True), (True, False), (False, True)]
    assert len(calls[2][0]) == 4 and calls[2][0] == sorted(calls[2][0])
    calls.clear()
    _torch_run(params, batches, None, beta=0.5, gamma=1.0, calls=calls)
    assert calls == [(None, True), (None, True)]


def test_torch_beta_gamma_one_is_sam():
    torch = pytest.importorskip("torch")
    import sam_torch

    params, batches = init_mlp(), make_batches(STEPS, n=B)
    got, sel, _, _ = _torch_run(params, batches, None, beta=1.0, gamma=1.0)
    model = _torch_model(params)
    sam = sam_torch.SAM(
        model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MOM, weight_decay=WD
    )
    for (x, t), step in zip(batches, got, strict=True):
        xt, tt = torch.from_numpy(x), torch.from_numpy(t)

        def closure(xt=xt, tt=tt):
            loss = ((model(xt) - tt) ** 2).mean(dim=1).mean()
            loss.backward()
            return loss

        sam.step(closure)
        for p, w in zip(model.parameters(), step, strict=True):
            np.testing.assert_array_equal(p.detach().numpy(), w)
    assert all(s is None for s in sel)


def test_torch_state_dict_resume_is_exact():
    torch = pytest.importorskip("torch")
    import sam_torch

    params, batches = init_mlp(), make_batches(6, n=B)

    def build(weights):
        model = _torch_model(weights)
        opt = sam_torch.ESAM(
            model.parameters(), torch.optim.SGD, rho=RHO, beta=0.5, gamma=0.5, mask="element",
            seed=7, lr=LR, momentum=MOM,
        )
        return model, opt

    def run(model, opt, chunk):
        for x, t in chunk:
            xt, tt = torch.from_numpy(x), torch.from_numpy(t)
            opt.step(lambda index=None, xt=xt, tt=tt: (
                (model(xt if index is None else xt[index]) - (tt if index is None else tt[index]))
                ** 2).mean(dim=1))

    model, opt = build(params)
    run(model, opt, batches[:3])
    saved = copy.deepcopy(opt.state_dict())
    weights = [p.detach().numpy().copy() for p in model.parameters()]
    run(model, opt, batches[3:])
    model2, opt2 = build(weights)
    opt2.load_state_dict(saved)
    run(model2, opt2, batches[3:])
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_torch_mask_statistics():
    torch = pytest.importorskip("torch")
    import sam_torch

    big = [torch.nn.Parameter(torch.zeros(200, 100)), torch.nn.Parameter(torch.zeros(50))]
    opt = sam_torch.ESAM(big, torch.optim.SGD, lr=0.1, beta=0.3, mask="element", seed=1)
    kept = sum(int(m.sum()) for m in opt.sample_masks())
    n = 200 * 100 + 50
    assert abs(kept / n - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    opt = sam_torch.ESAM(big, torch.optim.SGD, lr=0.1, beta=0.3, seed=1)
    draws = [bool(m) for _ in range(2000) for m in opt.sample_masks()]
    assert abs(np.mean(draws) - 0.3) < 4 * math.sqrt(0.3 * 0.7 / len(draws))
    first, second = opt.sample_masks(), opt.sample_masks()
    assert all(m.ndim == 0 for m in first + second)


def test_torch_errors_name_the_argument():
    torch = pytest.importorskip("torch")
    import sam_torch

    p = [torch.nn.Parameter(torch.zeros(3))]
    for kw, name in [({"beta": 0.0}, "beta"), ({"beta": 1.5}, "beta"), ({"gamma": 0.0}, "gamma"),
                     ({"gamma": float("nan")}, "gamma"), ({"mask": "layer"}, "mask")]:
        with pytest.raises(ValueError, match=name):
            sam_torch.ESAM(p, torch.optim.SGD, lr=0.1, **kw)
    with pytest.raises(TypeError, match="seed"):
        sam_torch.ESAM(p, torch.optim.SGD, lr=0.1, seed="0")
    opt = sam_torch.ESAM(p, torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="per-example"):
        opt.step(lambda index=None: (p[0] ** 2).sum())
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="masks"):
        opt.step(lambda index=None: p[0] ** 2, masks=[True, False])
    assert not opt.is_perturbed


# -- JAX -----------------------------------------------------------------------------------------
def _jax_run(params, batches, masks, *, beta, gamma, jit=False, pass_losses=True, **kw):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import optax

    import sam_jax

    tx = optax.chain(
        sam_jax.esam(RHO, beta=beta, gamma=gamma, **kw),
        optax.add_decayed_weights(WD),
        optax.sgd(LR, momentum=MOM),
    )
    ps = [jnp.asarray(w) for w in params]
    state = tx.init(ps)

    def step(ps, state, x, t, m):
        def loss_fn(q, index=None):
            xs, ts = (x, t) if index is None else (x[index], t[index])
            a = jnp.tanh(xs @ q[0].T + q[1])
            return ((a @ q[2].T + q[3] - ts) ** 2).mean(axis=1)

        (_, losses), grads = jax.value_and_grad(
            lambda q: (lambda v: (v.mean(), v))(loss_fn(q)), has_aux=True
        )(ps)
        extra = {"losses": losses} if pass_losses else {}
        updates, state = tx.update(grads, state, ps, loss_fn=loss_fn, masks=m, **extra)
        return optax.apply_updates(ps, updates), state

    if jit:
        step = jax.jit(step)
    out = []
    for i, (x, t) in enumerate(batches):
        m = None if masks is None else [jnp.asarray(v) for v in masks[i]]
        ps, state = step(ps, state, jnp.asarray(x), jnp.asarray(t), m)
        out.append([np.asarray(w) for w in ps])
    return out, state


@pytest.mark.parametrize("mode", ["tensor", "element"])
@pytest.mark.parametrize("gamma", [0.5, 0.25])
def test_jax_matches_reference_and_torch(mode, gamma):
    params, batches = init_mlp(), make_batches(STEPS, n=B)
    masks = _masks(params, mode)
    want, _ = _reference_trajectory(params, batches, masks, beta=0.5, gamma=gamma)
    with jax_x64():
        got, _ = _jax_run(params, batches, masks, beta=0.5, gamma=gamma, mask=mode)
        jitted, _ = _jax_run(
            params, batches, masks, beta=0.5, gamma=gamma, mask=mode, jit=True, pass_losses=False
        )
    torch_got, _, _, _ = _torch_run(params, batches, masks, beta=0.5, gamma=gamma, mask=mode)
    for a, b, c, d in zip(got, want, jitted, torch_got, strict=True):
        assert max_rel_diff(a, b) < 1e-12
        assert max_rel_diff(c, b) < 1e-12
        assert max_rel_diff(d, a) < 1e-10  # torch == JAX, same masks and selections


def test_jax_beta_gamma_one_is_sam():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import optax

    import sam_jax

    params, batches = init_mlp(), make_batches(STEPS, n=B)
    with jax_x64():
        got, _ = _jax_run(params, batches, None, beta=1.0, gamma=1.0)
        tx = optax.chain(sam_jax.sam(RHO), optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOM))
        ps = [jnp.asarray(w) for w in params]
        state = tx.init(ps)
        for (x, t), want in zip(batches, got, strict=True):
            x, t = jnp.asarray(x), jnp.asarray(t)

            def loss(q, x=x, t=t):
                a = jnp.tanh(x @ q[0].T + q[1])
                return ((a @ q[2].T + q[3] - t) ** 2).mean(axis=1).mean()

            grads = jax.grad(loss)(ps)
            updates, state = tx.update(grads, state, ps, grad_fn=jax.grad(loss))
            ps = optax.apply_updates(ps, updates)
            for a, b in zip(ps, want, strict=True):
                np.testing.assert_array_equal(np.asarray(a), b)


def test_jax_masks_statistics_and_key():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import sam_jax

    params = [jnp.zeros((200, 100)), jnp.zeros(50)]
    m = sam_jax.esam_masks(jax.random.PRNGKey(0), params, 0.3, "element")
    n = 200 * 100 + 50
    kept = sum(int(jnp.sum(v)) for v in m)
    assert abs(kept / n - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    keys = jax.random.split(jax.random.PRNGKey(1), 2000)
    draws = np.asarray(jax.vmap(lambda k: jnp.stack(sam_jax.esam_masks(k, params, 0.3)))(keys))
    assert abs(draws.mean() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / draws.size)
    with jax_x64():
        _, state = _jax_run(init_mlp(), make_batches(2, n=B), None, beta=0.5, gamma=0.5,
                            mask="element")
    assert 0.0 < float(state[0].kept_fraction) < 1.0
    assert int(state[0].count) == 2
    assert np.isfinite(float(state[0].sharpness))


def test_jax_errors_name_the_argument():
    pytest.importorskip("jax")
    import jax.numpy as jnp

    import sam_jax

    for kw, name in [({"beta": 0.0}, "beta"), ({"gamma": 2.0}, "gamma"), ({"mask": "x"}, "mask")]:
        with pytest.raises(ValueError, match=name):
            sam_jax.esam(0.1, **kw)
    with pytest.raises(TypeError, match="seed"):
        sam_jax.esam(0.1, seed=1.5)
    tx = sam_jax.esam(0.1)
    ps = [jnp.ones(3)]
    state = tx.init(ps)
    with pytest.raises(TypeError, match="loss_fn"):
        tx.update(ps, state, ps)
    with pytest.raises(ValueError, match="per-example"):
        tx.update(ps, state, ps, loss_fn=lambda q, index=None: jnp.sum(q[0] ** 2))
    with pytest.raises(ValueError, match="masks"):
        tx.update(ps, state, ps, loss_fn=lambda q, index=None: q[0] ** 2, masks=[jnp.ones(2)])


# -- sam_core ------------------------------------------------------------------------------------
def test_core_selection_and_count():
    rng = np.random.default_rng(0)
    for _ in range(20):
        b = int(rng.integers(1, 40))
        clean, perturbed = rng.standard_normal(b), rng.standard_normal(b)
        gamma = float(rng.uniform(0.01, 1.0))
        k = sam_core.sds_count(b, gamma)
        assert k == max(1, math.floor(gamma * b + 1e-9))
        idx = sam_core.sds_select(
            clean, perturbed, k, top_k=lambda x, n: np.argsort(-x)[:n], sort=np.sort
        )
        rise = perturbed - clean
        assert list(idx) == sorted(idx) and len(set(idx.tolist())) == k
        rest = np.setdiff1d(np.arange(b), idx)
        assert rest.size == 0 or rise[idx].min() >= rise[rest].max()
    assert sam_core.sds_count(100, 0.29) == 29
    assert sam_core.sds_count(10, 0.01) == 1
    with pytest.raises(ValueError, match="batch"):
        sam_core.sds_count(0, 0.5)


def test_core_swp_perturbation_has_radius_rho_over_beta():
    ops = sam_core.NumpyOps()
    rng = np.random.default_rng(2)
    params = [rng.standard_normal((4, 3)), rng.standard_normal(5)]
    grads = [rng.standard_normal((4, 3)), rng.standard_normal(5)]
    masks = [rng.random((4, 3)) < 0.5, np.asarray(0.0)]
    point, norm = sam_core.esam_perturbed_params(ops, params, grads, masks, rho=0.2, beta=0.4)
    e = [p - w for p, w in zip(point, params, strict=True)]
    assert math.isclose(math.sqrt(sum(float(np.sum(v * v)) for v in e)), 0.5, rel_tol=1e-12)
    assert np.all(e[0][~masks[0]] == 0) and np.all(e[1] == 0)
    assert math.isclose(float(norm), float(np.linalg.norm(grads[0][masks[0]])), rel_tol=1e-12)


def test_jax_check_chain_knows_esam():
    pytest.importorskip("jax")
    import jax.numpy as jnp
    import optax

    import sam_jax

    params = [jnp.ones(3)]
    sam_jax.check_chain(optax.chain(sam_jax.esam(0.1), optax.sgd(0.1)), params)
    with pytest.raises(ValueError):
        sam_jax.check_chain(optax.chain(optax.sgd(0.1), sam_jax.esam(0.1)), params)


def test_torch_selection_forward_replays_dropout_and_restores_on_error():
    torch = pytest.importorskip("torch")
    from torch import nn

    import sam_torch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Dropout(0.5), nn.Linear(7, 3)).double()
    opt = sam_torch.ESAM(model.parameters(), torch.optim.SGD, rho=0.0, gamma=0.5, lr=0.1)
    x, t = (torch.from_numpy(a) for a in make_batches(1, n=B)[0])

    def closure(index=None):
        xs, ts = (x, t) if index is None else (x[index], t[index])
        return ((model(xs) - ts) ** 2).mean(dim=1)

    opt.step(closure)
    # rho = 0: w + e = w, so with the clean call's dropout masks the losses are the same
    assert torch.equal(opt.perturbed_loss, opt.loss)
    before = [p.detach().clone() for p in model.parameters()]
    opt = sam_torch.ESAM(model.parameters(), torch.optim.SGD, rho=0.1, gamma=0.5, lr=0.1)

    def failing(index=None):
        if index is not None:
            raise RuntimeError("boom")
        return closure()

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(failing)
    assert not opt.is_perturbed
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_jax_rho_schedule_under_inject_hyperparams_and_jit():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import optax

    import sam_jax

    tx = optax.inject_hyperparams(sam_jax.esam, static_args=("beta", "gamma", "mask", "seed"))(
        rho=optax.linear_schedule(0.0, 0.1, 10), beta=0.5, gamma=0.5
    )
    ps = [jnp.ones((4, 3))]
    x = jnp.arange(24.0).reshape(8, 3) / 10

    def loss_fn(p, index=None):
        xs = x if index is None else x[index]
        return ((xs @ p[0].T) ** 2).mean(1)

    @jax.jit
    def step(ps, state):
        grads = jax.grad(lambda p: loss_fn(p).mean())(ps)
        updates, state = tx.update(grads, state, ps, loss_fn=loss_fn)
        return optax.apply_updates(ps, updates), state

    state = tx.init(ps)
    for _ in range(3):
        ps, state = step(ps, state)
    assert int(state.inner_state.count) == 3
    assert np.isclose(float(state.hyperparams["rho"]), 0.02)  # the third update's rho
    assert np.all(np.isfinite(np.asarray(ps[0])))


def test_torch_batchnorm_statistics_from_the_clean_pass_and_nonfinite_skip():
    torch = pytest.importorskip("torch")
    from torch import nn

    import sam_torch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3)).double()
    reference = copy.deepcopy(model)
    opt = sam_torch.ESAM(model.parameters(), torch.optim.SGD, rho=0.1, gamma=0.5, lr=0.1,
                         model=model)
    x, t = (torch.from_numpy(a) for a in make_batches(1, n=B)[0])

    def closure(index=None, scale=1.0):
        xs, ts = (x, t) if index is None else (x[index], t[index])
        return scale * ((model(xs) - ts) ** 2).mean(dim=1)

    opt.step(closure)
    reference(x)  # one clean forward in training mode
    bn, ref = model[1], reference[1]
    assert torch.equal(bn.running_mean, ref.running_mean)
    assert torch.equal(bn.num_batches_tracked, ref.num_batches_tracked)
    weights = [p.detach().clone() for p in model.parameters()]
    opt.step(lambda index=None: closure(index, scale=float("nan")))
    assert opt.step_skipped
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p, w)


def test_core_selection_property():
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    floats = st.floats(-1e3, 1e3, allow_nan=False)

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(st.lists(st.tuples(floats, floats), min_size=1, max_size=30),
           st.floats(0.01, 1.0))
    def check(pairs, gamma):
        clean = np.array([a for a, _ in pairs])
        perturbed = np.array([b for _, b in pairs])
        k = sam_core.sds_count(len(pairs), gamma)
        idx = sam_core.sds_select(
            clean, perturbed, k, top_k=lambda x, n: np.argsort(-x, kind="stable")[:n],
            sort=np.sort,
        )
        rise = perturbed - clean
        rest = np.setdiff1d(np.arange(len(pairs)), idx)
        assert len(idx) == k == max(1, min(len(pairs), math.floor(gamma * len(pairs) + 1e-9)))
        assert rest.size == 0 or rise[idx].min() >= rise[rest].max()

    check()
