"""AE-SAM (Jiang et al., ICLR 2023): sam_torch.AESAM and sam_jax.ae_sam against a float64
NumPy transcription of the paper's rule, torch against JAX, the SAM fraction the threshold
schedule targets, checkpoint resume and argument errors."""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sam_core
from tests.helpers import jax_x64, max_rel_diff
from tests.reference import SGDRef, init_mlp, make_batches, mlp_loss_and_grad
from tests.variants.reference import _flat, _unflat

LR, MOM, WD, RHO = 0.1, 0.9, 5e-4, 0.05
STEPS, TOTAL = 24, 24
EPS = 1e-12


# -- the reference: Algorithm 1 of the paper, written out on the flat parameter vector -------
def reference(params, batches, *, delta=0.9, c_start=1.0, c_end=-1.0, total_steps=TOTAL):
    """Float64 AE-SAM with SGD(momentum, weight decay).

    Returns (params, decisions, (mu, sigma^2)) after the last step."""
    like = [p.copy() for p in params]
    base = SGDRef(LR, MOM, WD)
    mu, var = 0.0, 0.0  # mu_{-1} = sigma^2_{-1} = 0
    decisions = []
    for t, (x, y) in enumerate(batches):
        g = _flat(mlp_loss_and_grad(params, x, y)[1])
        sq = float(g @ g)
        mu = delta * mu + (1 - delta) * sq
        var = delta * var + (1 - delta) * (sq - mu) ** 2
        frac = min(t, total_steps) / total_steps if total_steps else None
        c = (c_start + c_end) / 2 if frac is None else frac * c_end + (1 - frac) * c_start
        use_sam = sq >= mu + c * math.sqrt(var)
        decisions.append(use_sam)
        if use_sam:
            w = _flat(params) + RHO * g / (np.linalg.norm(g) + EPS)
            u = _flat(mlp_loss_and_grad(_unflat(w, like), x, y)[1])
        else:
            u = g
        params = base.step(params, _unflat(u, like))
    return params, decisions, (mu, var)


@pytest.fixture(scope="module")
def problem():
    params0 = init_mlp()
    batches = make_batches(STEPS, seed=3)
    want, decisions, stats = reference(params0, batches)
    # the test means something only if both kinds of step occur
    assert 0 < sum(decisions) < len(decisions), decisions
    return params0, batches, want, decisions, stats


# -- sam_core: the rule and the fraction its schedule targets --------------------------------
def _fraction(stream, c_of_t, delta=0.9, burn_in=100):
    mean = var = 0.0
    chosen = []
    for t, x in enumerate(stream):
        mean, var = sam_core.ae_sam_statistics(x, mean, var, delta=delta)
        chosen.append(bool(sam_core.ae_sam_is_sam_step(x, mean, var, c_of_t(t))))
    return np.mean(chosen[burn_in:]), chosen


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    c=st.floats(-1.5, 1.5),
    seed=st.integers(0, 2**16),
    level=st.floats(1.0, 100.0),
    spread=st.floats(0.01, 0.2),
)
def test_constant_threshold_gives_the_normal_models_fraction(c, seed, level, spread):
    """For stationary normal squared norms the SAM fraction is 1 - Phi(c), whatever the scale."""
    stream = level * (1 + spread * np.random.default_rng(seed).standard_normal(6000))
    got, _ = _fraction(stream, lambda t: c)
    assert abs(got - sam_core.ae_sam_target_fraction(c)) < 0.04


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), c_start=st.floats(0.0, 1.5), c_end=st.floats(-1.5, 0.0))
def test_linear_schedule_follows_its_target(seed, c_start, c_end):
    """Over a long run the SAM fraction follows 1 - Phi(c_t): overall and quarter by quarter
    (so it rises through the run as c_t falls)."""
    total = 8000
    stream = 10 * (1 + 0.1 * np.random.default_rng(seed).standard_normal(total))

    def c_of_t(t):
        return sam_core.ae_sam_threshold(t, total_steps=total, c_start=c_start, c_end=c_end)

    _, chosen = _fraction(stream, c_of_t)
    target = [sam_core.ae_sam_target_fraction(c_of_t(t)) for t in range(total)]
    assert abs(np.mean(chosen[100:]) - np.mean(target[100:])) < 0.03
    quarters = [slice(max(100, i * total // 4), (i + 1) * total // 4) for i in range(4)]
    for q in quarters:
        assert abs(np.mean(chosen[q]) - np.mean(target[q])) < 0.05


def test_threshold_schedule_ends_and_default():
    assert sam_core.ae_sam_threshold(0, total_steps=10) == 1.0
    assert sam_core.ae_sam_threshold(5, total_steps=10) == 0.0
    assert sam_core.ae_sam_threshold(10, total_steps=10) == -1.0
    assert sam_core.ae_sam_threshold(50, total_steps=10) == -1.0  # held after T
    assert sam_core.ae_sam_threshold(7, total_steps=None, c_start=2.0, c_end=0.0) == 1.0
    assert sam_core.ae_sam_target_fraction(0.0) == 0.5


# -- sam_torch -------------------------------------------------------------------------------
torch = pytest.importorskip("torch")

import sam_torch  # noqa: E402


def _model(params):
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    model = model.double()
    with torch.no_grad():
        for p, w in zip(model.parameters(), params, strict=True):
            p.copy_(torch.from_numpy(w))
    return model


def _aesam(model, **kw):
    kw.setdefault("total_steps", TOTAL)
    return sam_torch.AESAM(
        model.parameters(), torch.optim.SGD, lr=LR, momentum=MOM, weight_decay=WD, rho=RHO, **kw
    )


def _loss(model, batch):
    x, t = (torch.from_numpy(a) for a in batch)
    return ((model(x) - t) ** 2).mean()


def _run_closure(opt, model, batches):
    calls, decisions = [], []
    for batch in batches:
        n = []

        def closure(batch=batch, n=n):
            n.append(1)
            loss = _loss(model, batch)
            loss.backward()
            return loss

        opt.step(closure)
        calls.append(len(n))
        decisions.append(opt.last_step_was_sam)
    return calls, decisions


def _params(model):
    return [p.detach().numpy().copy() for p in model.parameters()]


def test_torch_step_closure_matches_reference(problem):
    params0, batches, want, decisions, stats = problem
    model = _model(params0)
    opt = _aesam(model)
    calls, got_decisions = _run_closure(opt, model, batches)
    assert got_decisions == decisions
    assert calls == [2 if d else 1 for d in decisions]  # a plain step costs one pass
    assert max_rel_diff(_params(model), want) < 1e-12
    assert opt.sam_steps == sum(decisions) and opt.variant_step == STEPS
    np.testing.assert_allclose((opt.sq_norm_mean, opt.sq_norm_var), stats, rtol=1e-12)


@pytest.mark.parametrize("always_two_passes", [False, True])
def test_torch_two_step_api_matches_reference(problem, always_two_passes):
    params0, batches, want, decisions, stats = problem
    model = _model(params0)
    opt = _aesam(model)
    passes, got_decisions = 0, []
    for batch in batches:
        _loss(model, batch).backward()
        passes += 1
        opt.first_step(zero_grad=always_two_passes)
        got_decisions.append(opt.last_step_was_sam)
        assert opt.is_perturbed == opt.last_step_was_sam
        if always_two_passes or opt.is_perturbed:
            opt.zero_grad()
            _loss(model, batch).backward()
            passes += 1
        opt.second_step(zero_grad=True)
    assert got_decisions == decisions
    assert passes == (2 * STEPS if always_two_passes else STEPS + sum(decisions))
    assert max_rel_diff(_params(model), want) < 1e-12
    np.testing.assert_allclose((opt.sq_norm_mean, opt.sq_norm_var), stats, rtol=1e-12)


def test_torch_state_dict_resume_is_exact(problem):
    params0, batches, *_ = problem
    model = _model(params0)
    opt = _aesam(model)
    _run_closure(opt, model, batches[:10])
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_model = copy.deepcopy(model.state_dict())
    _run_closure(opt, model, batches[10:])
    straight = _params(model)

    resumed = _model(params0)
    resumed.load_state_dict(saved_model)
    opt2 = _aesam(resumed)
    opt2.load_state_dict(saved_opt)
    assert opt2.variant_step == 10
    assert opt2.sq_norm_mean == saved_opt["sam_variant"]["ae_sam"]["sq_norm_mean"]
    _run_closure(opt2, resumed, batches[10:])
    for a, b in zip(_params(resumed), straight, strict=True):
        np.testing.assert_array_equal(a, b)
    assert (opt2.sam_steps, opt2.sq_norm_var) == (opt.sam_steps, opt.sq_norm_var)


def test_torch_nonfinite_gradient_skips_and_keeps_statistics(problem):
    params0, batches, *_ = problem
    model = _model(params0)
    opt = _aesam(model)
    _run_closure(opt, model, batches[:3])
    before = (_params(model), opt.sq_norm_mean, opt.sq_norm_var, opt.variant_step)

    def closure():
        loss = _loss(model, batches[3]) * float("nan")
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.step_skipped and opt.last_step_was_sam is False
    after = (_params(model), opt.sq_norm_mean, opt.sq_norm_var, opt.variant_step)
    assert max_rel_diff(after[0], before[0]) == 0 and after[1:] == before[1:]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(delta=0.0), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(delta=float("nan")), "delta"),
        (dict(c_start=float("inf")), "c_start"),
        (dict(c_end=float("nan")), "c_end"),
        (dict(total_steps=0), "total_steps"),
        (dict(total_steps=2.5), "total_steps"),
    ],
)
def test_torch_errors_name_the_argument(kwargs, name):
    model = _model(init_mlp())
    with pytest.raises((ValueError, TypeError), match=name):
        _aesam(model, **kwargs)


# -- sam_jax ---------------------------------------------------------------------------------
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import sam_jax  # noqa: E402


def _mlp_loss(params, x, t):
    w1, b1, w2, b2 = params
    a = jnp.tanh(x @ w1.T + b1)
    return jnp.mean((a @ w2.T + b2 - t) ** 2)


def _jax_run(params, batches, *, jit=True, **kw):
    kw.setdefault("total_steps", TOTAL)
    tx = optax.chain(
        sam_jax.ae_sam(RHO, **kw), optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOM)
    )
    calls = []

    def step(params, state, x, t):
        grads = jax.grad(_mlp_loss)(params, x, t)

        def grad_fn(p):
            calls.append(1)  # traced once per jit compile, once per call eagerly
            return jax.value_and_grad(_mlp_loss)(p, x, t)

        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step) if jit else step
    state = tx.init(params)
    decisions = []
    for x, t in batches:
        params, state = step(params, state, jnp.asarray(x), jnp.asarray(t))
        decisions.append(bool(state[0].is_sam_step))
    return [np.asarray(p) for p in params], decisions, state[0], len(calls)


@pytest.mark.parametrize("jit", [True, False])
def test_jax_matches_reference(problem, jit):
    params0, batches, want, decisions, stats = problem
    if not jit:  # eager dispatch is slow: the first steps (both kinds occur in them)
        batches = batches[:10]
        want, decisions, stats = reference(params0, batches)
        assert 0 < sum(decisions) < len(decisions)
    with jax_x64():
        got, got_decisions, state, calls = _jax_run(
            [jnp.asarray(p) for p in params0], batches, jit=jit
        )
    assert got_decisions == decisions
    assert max_rel_diff(got, want) < 1e-10
    assert int(state.count) == len(batches) and int(state.sam_count) == sum(decisions)
    np.testing.assert_allclose(
        (float(state.sq_norm_mean), float(state.sq_norm_var)), stats, rtol=1e-10
    )
    if not jit:  # eagerly grad_fn runs on SAM steps only
        assert calls == sum(decisions)


def test_jax_host_chosen_full_step_matches_reference(problem):
    """``full_step=`` as a loop chooses it on the host (examples/train_jax.py): a jitted
    update whose grad_fn evaluates nothing gives the rule's decision; on a SAM step the
    update is repeated from the same state with ``full_step=True``. The float64 trajectory
    is the reference's, with no lax.cond around the loss."""
    params0, batches, want, decisions, stats = problem
    tx = optax.chain(
        sam_jax.ae_sam(RHO, total_steps=TOTAL), optax.add_decayed_weights(WD),
        optax.sgd(LR, momentum=MOM),
    )

    @jax.jit
    def decide(params, state, x, t):
        grads = jax.grad(_mlp_loss)(params, x, t)
        nothing = lambda p: (jnp.zeros(()), jax.tree.map(jnp.zeros_like, p))  # noqa: E731
        updates, new_state = tx.update(grads, state, params, grad_fn=nothing)
        return optax.apply_updates(params, updates), new_state, grads

    @functools.partial(jax.jit, static_argnames="full_step")
    def step(params, state, grads, x, t, full_step):
        grad_fn = jax.value_and_grad(lambda p: _mlp_loss(p, x, t))
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn, full_step=full_step)
        return optax.apply_updates(params, updates), state

    with jax_x64():
        params = [jnp.asarray(p) for p in params0]
        state = tx.init(params)
        got_decisions = []
        for x, t in batches:
            x, t = jnp.asarray(x), jnp.asarray(t)
            plain, plain_state, grads = decide(params, state, x, t)
            sam = bool(plain_state[0].is_sam_step)
            got_decisions.append(sam)
            params, state = step(params, state, grads, x, t, True) if sam else (plain, plain_state)
        got = [np.asarray(p) for p in params]
        _, forced_state = step(params, state, grads, x, t, False)  # a forced plain step
        with pytest.raises(TypeError, match="full_step must be a Python bool"):
            tx.update(grads, state, params, grad_fn=lambda p: (0.0, p), full_step=1)
    assert got_decisions == decisions and 0 < sum(decisions) < len(decisions)
    assert max_rel_diff(got, want) < 1e-10
    assert int(state[0].sam_count) == sum(decisions)
    np.testing.assert_allclose(
        (float(state[0].sq_norm_mean), float(state[0].sq_norm_var)), stats, rtol=1e-10
    )
    assert not bool(forced_state[0].is_sam_step)  # records the branch taken
    assert int(forced_state[0].sam_count) == sum(decisions)


def test_torch_and_jax_trajectories_agree(problem):
    params0, batches, *_ = problem
    model = _model(params0)
    opt = _aesam(model, delta=0.8, c_start=0.5, c_end=-0.5, total_steps=16)
    _, torch_decisions = _run_closure(opt, model, batches)
    with jax_x64():
        got, jax_decisions, state, _ = _jax_run(
            [jnp.asarray(p) for p in params0], batches,
            delta=0.8, c_start=0.5, c_end=-0.5, total_steps=16,
        )
    assert jax_decisions == torch_decisions
    assert 0 < sum(torch_decisions) < STEPS
    assert max_rel_diff(got, _params(model)) < 1e-10
    assert abs(float(state.sq_norm_mean) - opt.sq_norm_mean) <= 1e-12 * opt.sq_norm_mean
    assert max_rel_diff(_params(model), params0) > 1e-3  # the trajectory moved


def test_jax_nonfinite_gradient_keeps_statistics():
    tx = sam_jax.ae_sam(RHO, total_steps=10)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    grad_fn = lambda p: {"w": p["w"]}  # noqa: E731
    _, state = tx.update({"w": jnp.full(3, 2.0)}, state, params, grad_fn=grad_fn)
    _, state2 = tx.update({"w": jnp.full(3, jnp.nan)}, state, params, grad_fn=grad_fn)
    assert float(state2.sq_norm_mean) == float(state.sq_norm_mean)
    assert float(state2.sq_norm_var) == float(state.sq_norm_var)
    assert not bool(state2.is_sam_step) and int(state2.count) == 2


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(delta=0.0), "delta"),
        (dict(delta=1.5), "delta"),
        (dict(c_start=float("inf")), "c_start"),
        (dict(total_steps=-1), "total_steps"),
        (dict(rho=-0.1), "rho"),
    ],
)
def test_jax_errors_name_the_argument(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        sam_jax.ae_sam(**kwargs)


@pytest.mark.parametrize("cls", ["SAM", "AESAM"])
@pytest.mark.parametrize("loop", ["caller_backward", "dropout_fresh"])
def test_step_closure_without_a_replay_runs(problem, cls, loop):
    """step(closure) after the caller's own backward (the popular wrapper's loop), or with
    dropout="fresh", has no generator state to replay: it runs, and AE-SAM's plain steps
    still cost the caller's pass only."""
    params0, batches, *_ = problem
    model = _model(params0)
    kw = dict(dropout="fresh") if loop == "dropout_fresh" else {}
    if cls == "SAM":
        opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=LR, rho=RHO, **kw)
    else:
        opt = _aesam(model, **kw)
    for batch in batches[:6]:
        n = []

        def closure(batch=batch, n=n):
            n.append(1)
            loss = _loss(model, batch)
            loss.backward()
            return loss

        if loop == "caller_backward":
            _loss(model, batch).backward()
        opt.step(closure)
        sam_step = cls == "SAM" or opt.last_step_was_sam
        assert len(n) == int(sam_step) + (loop == "dropout_fresh")
        opt.zero_grad()


def test_jax_works_with_inject_hyperparams():
    """Numeric arguments become arrays under optax.inject_hyperparams: validated, and the
    update jits with them."""
    tx = optax.inject_hyperparams(sam_jax.ae_sam)(rho=0.05, delta=0.9, total_steps=10)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    step = jax.jit(lambda s: tx.update({"w": jnp.full(3, 2.0)}, s, params, grad_fn=lambda p: p))
    _, state = step(state)
    assert bool(state.inner_state.is_sam_step)  # the first step: mu is still warming up
    np.testing.assert_allclose(float(state.inner_state.sq_norm_mean), 0.1 * 12.0, rtol=1e-6)
    with pytest.raises(ValueError, match="total_steps"):
        optax.inject_hyperparams(sam_jax.ae_sam)(rho=0.05, total_steps=0).init(params)
