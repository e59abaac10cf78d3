"""Linear rho warm-up: sam_core.rho_warmup's formula, sam_torch.RhoWarmup and
sam_jax.rho_warmup_schedule against a float64 NumPy SAM trajectory with a per-step rho, and
against each other."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sam_core
from tests.reference import (
    SGDRef,
    init_mlp,
    make_batches,
    mlp_loss_and_grad,
    sam_perturbation,
)

LR, MOM, WD, RHO, WARMUP, STEPS = 0.1, 0.9, 5e-4, 0.2, 4, 7


def reference(params, batches, rho_of_step):
    """SAM + SGD(momentum, weight decay) in float64 with rho_t = rho_of_step(t)."""
    params = [p.copy() for p in params]
    base = SGDRef(LR, MOM, WD)
    for t, (x, y) in enumerate(batches):
        _, g = mlp_loss_and_grad(params, x, y)
        e = sam_perturbation(params, g, rho_of_step(t))
        _, g_adv = mlp_loss_and_grad([w + ei for w, ei in zip(params, e, strict=True)], x, y)
        params = base.step(params, g_adv)
    return params


def ramp(t: int) -> float:  # the formula, written out
    return RHO * min(t, WARMUP) / WARMUP


# -- sam_core ------------------------------------------------------------------------------------
@given(
    step=st.integers(0, 10_000),
    warmup=st.integers(1, 5_000),
    rho=st.floats(0.0, 10.0, allow_nan=False),
)
def test_rho_warmup_is_a_linear_ramp_then_constant(step, warmup, rho):
    got = sam_core.rho_warmup(step, rho=rho, warmup_steps=warmup)
    assert got == pytest.approx(rho * min(step, warmup) / warmup, rel=1e-12, abs=1e-300)
    assert 0.0 <= got <= rho
    after = sam_core.rho_warmup(step + 1, rho=rho, warmup_steps=warmup)
    assert after >= got  # non-decreasing
    if step >= warmup:
        assert got == rho  # exactly, not rho * (1 + ulp)


def test_rho_warmup_endpoints_and_no_warmup():
    assert sam_core.rho_warmup(0, rho=0.3, warmup_steps=3) == 0.0
    assert [sam_core.rho_warmup(t, rho=0.2, warmup_steps=3) for t in (3, 4, 99)] == [0.2] * 3
    assert sam_core.rho_warmup(0, rho=0.3, warmup_steps=0) == 0.3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rho=-0.1, warmup_steps=3), "rho must be a finite number >= 0, got -0.1"),
        (dict(rho=0.1, warmup_steps=-1), r"warmup_steps must be an int >= 0 \(0: no warm-up\), got -1"),
        (dict(rho=0.1, warmup_steps=2.5), "warmup_steps must be an int >= 0 .*got 2.5"),
        (dict(rho=0.1, warmup_steps=True), "warmup_steps must be an int >= 0 .*got True"),
    ],
)
def test_validate_rho_warmup(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sam_core.validate_rho_warmup(**kwargs)


# -- torch ---------------------------------------------------------------------------------------
torch = pytest.importorskip("torch")
import sam_torch  # noqa: E402


def _torch_model(params):
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)
    ).double()
    with torch.no_grad():
        for p, w in zip(model.parameters(), params, strict=True):
            p.copy_(torch.from_numpy(w))
    return model


def _torch_sam(model):
    return sam_torch.SAM(
        model.parameters(), torch.optim.SGD, lr=LR, momentum=MOM, weight_decay=WD, rho=RHO
    )


def _torch_run(model, opt, warmup, batches):
    rhos = []
    for x, y in batches:
        x, y = torch.from_numpy(x), torch.from_numpy(y)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        rhos.append(opt.param_groups[0]["rho"])
        opt.step(closure)
        warmup.step()
    return rhos


def test_torch_rho_warmup_matches_the_float64_reference():
    params, batches = init_mlp(), make_batches(STEPS)
    model = _torch_model(params)
    opt = _torch_sam(model)
    warmup = sam_torch.RhoWarmup(opt, WARMUP)
    rhos = _torch_run(model, opt, warmup, batches)
    assert rhos == [ramp(t) for t in range(STEPS)]
    assert opt.param_groups[0]["initial_rho"] == RHO
    want = reference(params, batches, ramp)
    for p, w in zip(model.parameters(), want, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-12, atol=1e-14)
    # without the ramp the trajectory differs (the test can fail)
    const = reference(params, batches, lambda t: RHO)
    assert max(np.abs(a - b).max() for a, b in zip(want, const, strict=True)) > 1e-4


def test_torch_first_warmup_step_is_plain_sgd():
    params, (batch,) = init_mlp(), make_batches(1)
    model = _torch_model(params)
    opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOM, rho=0.5)
    _torch_run(model, opt, sam_torch.RhoWarmup(opt, 10), [batch])
    _, g = mlp_loss_and_grad(params, *batch)
    want = SGDRef(LR, MOM).step(params, g)
    for p, w in zip(model.parameters(), want, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-12, atol=1e-14)


def test_torch_rho_warmup_resumes_from_its_state_dict():
    params, batches = init_mlp(), make_batches(STEPS)
    model = _torch_model(params)
    opt = _torch_sam(model)
    warmup = sam_torch.RhoWarmup(opt, WARMUP)
    _torch_run(model, opt, warmup, batches[:2])
    saved = (
        {k: v.clone() for k, v in model.state_dict().items()},
        opt.state_dict(),
        warmup.state_dict(),
    )
    assert saved[2] == {"warmup_steps": WARMUP, "last_step": 2}
    # a fresh process: new model, optimizer and warm-up, loaded from the checkpoint
    model2 = _torch_model(params)
    model2.load_state_dict(saved[0])
    opt2 = _torch_sam(model2)
    opt2.load_state_dict(saved[1])
    warmup2 = sam_torch.RhoWarmup(opt2, WARMUP)
    warmup2.load_state_dict(saved[2])
    assert opt2.param_groups[0]["rho"] == ramp(2)
    _torch_run(model2, opt2, warmup2, batches[2:])
    want = reference(params, batches, ramp)
    for p, w in zip(model2.parameters(), want, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-12, atol=1e-14)


def test_torch_rho_warmup_per_group_and_added_groups():
    a, b, c = (torch.nn.Parameter(torch.ones(2, dtype=torch.float64)) for _ in range(3))
    opt = sam_torch.SAM(
        [{"params": [a], "rho": 0.1}, {"params": [b], "rho": 0.4}], torch.optim.SGD, lr=0.1
    )
    warmup = sam_torch.RhoWarmup(opt, 4)
    assert warmup.last_rho == [0.0, 0.0]
    assert warmup.step() == pytest.approx([0.025, 0.1])
    opt.add_param_group({"params": [c], "rho": 0.8})
    assert warmup.step() == pytest.approx([0.05, 0.2, 0.4])  # ramps at the shared step count
    assert [g["initial_rho"] for g in opt.param_groups] == [0.1, 0.4, 0.8]
    for _ in range(5):
        warmup.step()
    assert [g["rho"] for g in opt.param_groups] == [0.1, 0.4, 0.8]


def test_torch_rho_warmup_errors():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(TypeError, match=r"RhoWarmup needs a SAM-family optimizer .*got SGD"):
        sam_torch.RhoWarmup(torch.optim.SGD([p], lr=0.1), 3)
    opt = sam_torch.SAM([p], torch.optim.SGD, lr=0.1, rho=0.05)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0"):
        sam_torch.RhoWarmup(opt, -2)
    assert opt.param_groups[0]["rho"] == 0.05  # nothing changed by the failed construction


# -- JAX -----------------------------------------------------------------------------------------
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import sam_jax  # noqa: E402
from tests.helpers import jax_x64  # noqa: E402


def _mlp_loss(params, x, t):
    w1, b1, w2, b2 = params
    return jnp.mean((jnp.tanh(x @ w1.T + b1) @ w2.T + b2 - t) ** 2)


def test_jax_schedule_is_the_core_formula_and_optax_linear_schedule():
    sched = sam_jax.rho_warmup_schedule(RHO, WARMUP)
    linear = optax.linear_schedule(0.0, RHO, WARMUP)
    jitted = jax.jit(sched)
    for t in range(WARMUP + 3):
        assert float(sched(t)) == pytest.approx(ramp(t), rel=1e-6, abs=1e-9)
        assert float(jitted(jnp.int32(t))) == pytest.approx(float(linear(t)), rel=1e-6, abs=1e-9)
    assert float(sam_jax.rho_warmup_schedule(0.3, 0)(5)) == pytest.approx(0.3)
    # a ramp longer than int32 counts (a warm-up "for ever")
    assert float(sam_jax.rho_warmup_schedule(0.3, 10**10)(10**4)) == pytest.approx(3e-7)
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0"):
        sam_jax.rho_warmup_schedule(0.1, 1.5)
    with pytest.raises(ValueError, match="rho must be a finite number >= 0, got -1"):
        sam_jax.rho_warmup_schedule(-1, 3)


def test_jax_rho_warmup_matches_the_reference_and_torch():
    params, batches = init_mlp(), make_batches(STEPS)
    want = reference(params, batches, ramp)
    with jax_x64():
        tx = optax.chain(
            optax.inject_hyperparams(sam_jax.sam)(rho=sam_jax.rho_warmup_schedule(RHO, WARMUP)),
            optax.add_decayed_weights(WD),
            optax.sgd(LR, momentum=MOM),
        )
        p = [jnp.asarray(w) for w in params]
        state = tx.init(p)
        seen = []

        @jax.jit
        def step(p, state, x, y):
            grads = jax.grad(_mlp_loss)(p, x, y)
            updates, state = tx.update(
                grads, state, p, grad_fn=lambda q: jax.grad(_mlp_loss)(q, x, y)
            )
            return optax.apply_updates(p, updates), state

        for x, y in batches:
            seen.append(float(state[0].hyperparams["rho"]))
            p, state = step(p, state, jnp.asarray(x), jnp.asarray(y))
        got = [np.asarray(w) for w in p]
    # the rho the update used (hyperparams show the schedule at the update's count)
    np.testing.assert_allclose(seen[1:], [ramp(t) for t in range(STEPS - 1)], rtol=1e-12)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)
    # and torch's RhoWarmup takes the same trajectory
    model = _torch_model(params)
    opt = _torch_sam(model)
    _torch_run(model, opt, sam_torch.RhoWarmup(opt, WARMUP), batches)
    for t_param, g in zip(model.parameters(), got, strict=True):
        np.testing.assert_allclose(t_param.detach().numpy(), g, rtol=1e-10, atol=1e-12)


def test_jax_scheduled_rho_works_with_m_sharpness_and_check_chain():
    params = [jnp.asarray(w, jnp.float32) for w in init_mlp()]
    x, y = (jnp.asarray(a, jnp.float32) for a in make_batches(1)[0])
    scheduled = optax.chain(
        optax.inject_hyperparams(sam_jax.sam)(rho=sam_jax.rho_warmup_schedule(0.1, 2)),
        optax.sgd(0.1),
    )
    constant = optax.chain(sam_jax.sam(0.1), optax.sgd(0.1))
    sam_jax.check_chain(scheduled, params)

    def loss_fn(p, batch):
        return _mlp_loss(p, *batch)

    state_s, state_c = scheduled.init(params), constant.init(params)
    for count in range(3):
        up_s, state_s, _, _ = sam_jax.m_sharpness_update(
            scheduled, loss_fn, params, state_s, (x, y), m=4
        )
        up_c, state_c, _, _ = sam_jax.m_sharpness_update(
            constant, loss_fn, params, state_c, (x, y), m=4
        )
        diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(up_s, up_c, strict=True))
        # count 0: rho 0 (plain gradient), 1: rho 0.05, 2: rho 0.1 (the constant chain's)
        assert (diff < 1e-7) == (count == 2), (count, diff)
        assert int(state_s[0].count) == count + 1  # one count per step, not per chunk
