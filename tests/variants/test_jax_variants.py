"""sam_jax's SAM family: float64 trajectories against the NumPy reference and against
sam_torch, grad_fn call counts under jit, the SAM-ON mask, the rho schedule and errors."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import sam_jax  # noqa: E402
from tests.helpers import jax_x64, max_rel_diff  # noqa: E402
from tests.reference import SGDRef, init_mlp, make_batches  # noqa: E402
from tests.variants.reference import trajectory  # noqa: E402

LR, MOM, WD = 0.1, 0.9, 5e-4
STEPS = 8


def mlp_loss(params, x, t):
    w1, b1, w2, b2 = params
    a = jnp.tanh(x @ w1.T + b1)
    return jnp.mean((a @ w2.T + b2 - t) ** 2)


FACTORIES = {
    "gsam": (lambda: sam_jax.gsam(0.05, alpha=0.2), dict(alpha=0.2)),
    "friendly": (
        lambda: sam_jax.friendly_sam(0.1, sigma=1.0, lmbda=0.9),
        dict(rho=0.1, sigma=1.0, lmbda=0.9),
    ),
    "looksam": (lambda: sam_jax.looksam(0.05, k=3, alpha=0.7), dict(k=3, alpha=0.7)),
    "everyk": (lambda: sam_jax.every_k_sam(0.05, k=3), dict(k=3)),
    "samon": (
        lambda: sam_jax.samon(0.2, mask=[False, True, False, True]),
        dict(rho=0.2, mask=[False, True, False, True]),
    ),
    "msam": (lambda: sam_jax.momentum_sam(0.3, momentum=MOM), dict(rho=0.3)),
    "vasso": (lambda: sam_jax.vasso(0.1, theta=0.4), dict(rho=0.1, theta=0.4)),
    "wsam-coupled": (lambda: sam_jax.wsam(0.05, gamma=0.6), dict(gamma=0.6, decouple=False)),
}


def _chain(name, wd):
    """The optimizer: the variant first, then weight decay and SGD with momentum."""
    base = optax.chain(optax.add_decayed_weights(wd), optax.sgd(LR, momentum=MOM))
    if name == "wsam":  # the decoupled form wraps the base optimizer
        return sam_jax.wsam(0.05, gamma=0.88, base=base, learning_rate=LR)
    return optax.chain(FACTORIES[name][0](), base)


def _run(tx, params, batches, *, count_calls=False):
    """Jitted train loop; returns final params and the number of grad_fn evaluations."""
    calls = []

    def counted_loss(p, x, t):
        if count_calls:
            jax.debug.callback(lambda: calls.append(1))
        return mlp_loss(p, x, t)

    @jax.jit
    def step(params, state, x, t):
        grads = jax.grad(mlp_loss)(params, x, t)
        grad_fn = jax.value_and_grad(lambda p: counted_loss(p, x, t))
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for x, t in batches:
        params, state = step(params, state, jnp.asarray(x), jnp.asarray(t))
    jax.effects_barrier()
    return [np.asarray(p) for p in params], len(calls), state


@pytest.mark.parametrize("name", [*sorted(FACTORIES), "wsam"])
def test_trajectory_matches_numpy_reference(name):
    hp = FACTORIES[name][1] if name in FACTORIES else dict(gamma=0.88, decouple=True, lr=LR)
    params0 = init_mlp()
    batches = make_batches(STEPS)
    wd = 0.0 if name == "msam" else WD  # the JAX trace holds raw gradients (see momentum_sam)
    expected, ref_calls = trajectory(
        name.split("-")[0], params0, batches, SGDRef(LR, MOM, wd), **hp
    )
    with jax_x64():
        tx = _chain(name, wd)
        got, n_calls, _ = _run(tx, [jnp.asarray(p) for p in params0], batches, count_calls=True)
    assert max_rel_diff(got, expected) < 1e-10
    # grad_fn runs on full steps only; the caller's clean pass is the other one (not for MSAM)
    clean = 0 if name == "msam" else STEPS
    assert n_calls + clean == sum(ref_calls)


def test_grad_fn_call_counts_under_jit():
    params0 = [jnp.asarray(p, jnp.float32) for p in init_mlp()]
    batches = make_batches(10)
    _, n, state = _run(sam_jax.looksam(k=5), params0, batches, count_calls=True)
    assert n == 2 and int(state.count) == 10  # steps 0 and 5
    _, n, _ = _run(sam_jax.every_k_sam(k=5), params0, batches, count_calls=True)
    assert n == 2  # steps 4 and 9
    _, n, _ = _run(sam_jax.momentum_sam(), params0, batches, count_calls=True)
    assert n == 10
    _, n, _ = _run(sam_jax.gsam(), params0, batches[:3], count_calls=True)
    assert n == 3


@pytest.mark.parametrize("name", ["looksam", "everyk"])
def test_eager_update_calls_grad_fn_on_full_steps_only_and_matches_jit(name):
    # Outside jit a plain Python counter sees every grad_fn call (lax.cond would trace the
    # full branch, calling grad_fn, on cheap steps too); the numbers equal the jitted run's.
    variant = {"looksam": sam_jax.looksam, "everyk": sam_jax.every_k_sam}[name]

    def make():
        return optax.chain(variant(k=5), optax.sgd(LR, momentum=MOM))

    batches = make_batches(10)
    with jax_x64():
        params0 = [jnp.asarray(p, jnp.float64) for p in init_mlp()]
        jitted, n_jit, _ = _run(make(), params0, batches, count_calls=True)
        tx = make()
        params, state, calls = list(params0), tx.init(params0), []
        step = []
        for x, t in batches:
            x, t = jnp.asarray(x), jnp.asarray(t)

            def grad_fn(p, x=x, t=t):
                calls.append(len(step))
                return jax.value_and_grad(mlp_loss)(p, x, t)

            grads = jax.grad(mlp_loss)(params, x, t)
            updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
            params = optax.apply_updates(params, updates)
            step.append(1)
    assert calls == ([0, 5] if name == "looksam" else [4, 9]) and n_jit == 2
    assert max_rel_diff([np.asarray(p) for p in params], jitted) < 1e-12


def test_momentum_sam_needs_no_clean_gradient():
    params = [jnp.asarray(p, jnp.float32) for p in init_mlp()]
    x, t = (jnp.asarray(a, jnp.float32) for a in make_batches(1)[0])
    tx = optax.chain(sam_jax.momentum_sam(0.3), optax.sgd(LR, momentum=MOM))
    state = tx.init(params)
    grad_fn = jax.value_and_grad(lambda p: mlp_loss(p, x, t))
    updates, state = tx.update(None, state, params, grad_fn=grad_fn)
    # first step: no momentum yet, so the gradient is the clean one
    np.testing.assert_allclose(updates[0], -LR * jax.grad(mlp_loss)(params, x, t)[0], rtol=1e-6)
    assert np.isfinite(float(state[0].perturbed_value))


def test_states_keep_structure_dtype_and_no_retrace():
    params = [jnp.asarray(p, jnp.bfloat16) for p in init_mlp()]
    x, t = (jnp.asarray(a, jnp.bfloat16) for a in make_batches(1)[0])
    traces = []
    factories = (
        sam_jax.gsam,
        sam_jax.looksam,
        sam_jax.every_k_sam,
        sam_jax.friendly_sam,
        sam_jax.momentum_sam,
        sam_jax.vasso,
        sam_jax.wsam,
    )
    for factory in factories:
        tx = factory()

        @jax.jit
        def step(params, state, tx=tx):
            traces.append(1)
            grads = jax.grad(mlp_loss)(params, x, t)
            grad_fn = jax.grad(lambda q: mlp_loss(q, x, t))
            updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
            return optax.apply_updates(params, updates), state

        state = tx.init(params)
        p = params
        for _ in range(3):
            p, state = step(p, state)
        assert all(a.dtype == jnp.bfloat16 for a in p)
        assert all(np.all(np.isfinite(np.asarray(a, np.float32))) for a in p)
    assert len(traces) == len(factories)  # one trace per transformation, none on later steps


def test_normalization_mask_on_flax_params():
    nn = pytest.importorskip("flax.linen")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = True):
            x = nn.Dense(4)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.LayerNorm()(x)
            x = nn.GroupNorm(num_groups=2)(x)
            return nn.Dense(2)(x)

    variables = Net().init(jax.random.PRNGKey(0), jnp.ones((3, 5)))
    mask = sam_jax.normalization_mask(variables["params"])
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): v
        for path, v in jax.tree_util.tree_leaves_with_path(mask)
    }
    assert flat == {
        "Dense_0/bias": False,
        "Dense_0/kernel": False,
        "BatchNorm_0/bias": True,
        "BatchNorm_0/scale": True,
        "LayerNorm_0/bias": True,
        "LayerNorm_0/scale": True,
        "GroupNorm_0/bias": True,
        "GroupNorm_0/scale": True,
        "Dense_1/bias": False,
        "Dense_1/kernel": False,
    }
    custom = sam_jax.normalization_mask(variables["params"], lambda path, _: path[0] == "Dense_1")
    assert sum(jax.tree.leaves(custom)) == 2


def test_samon_perturbs_only_masked_leaves_and_errors():
    params = [jnp.asarray(p, jnp.float32) for p in init_mlp()]
    x, t = (jnp.asarray(a, jnp.float32) for a in make_batches(1)[0])
    seen = []

    def grad_fn(p):
        seen.append(p)
        return jax.grad(mlp_loss)(p, x, t)

    tx = sam_jax.samon(0.1, mask=[False, True, False, True])
    grads = jax.grad(mlp_loss)(params, x, t)
    tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
    moved = [not np.array_equal(a, b) for a, b in zip(seen[0], params, strict=True)]
    assert moved == [False, True, False, True]
    e = np.concatenate([np.ravel(seen[0][i] - params[i]) for i in (1, 3)])
    assert np.linalg.norm(e) == pytest.approx(0.1, rel=1e-5)
    with pytest.raises(ValueError, match="selects no parameter"):
        sam_jax.samon().update(grads, tx.init(params), params, grad_fn=grad_fn)  # no norm names
    with pytest.raises(ValueError, match="structure of params"):
        sam_jax.samon(mask=[True]).update(grads, tx.init(params), params, grad_fn=grad_fn)


def test_proportional_rho_schedule_with_inject_hyperparams():
    lr = optax.cosine_decay_schedule(0.1, 10)
    rho = sam_jax.proportional_rho_schedule(lr, rho_max=0.08, rho_min=0.02, lr_max=0.1)
    for step in range(11):
        expected = 0.02 + 0.06 * float(lr(step)) / 0.1
        assert float(rho(step)) == pytest.approx(expected, rel=1e-6, abs=1e-8)
    tx = optax.chain(optax.inject_hyperparams(sam_jax.gsam)(rho=rho, alpha=0.2), optax.sgd(lr))
    params = [jnp.asarray(p, jnp.float32) for p in init_mlp()]
    state = tx.init(params)
    seen = []
    for x, t in make_batches(4):
        x, t = jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32)
        grads = jax.grad(mlp_loss)(params, x, t)
        updates, state = tx.update(
            grads, state, params, grad_fn=jax.grad(lambda p, x=x, t=t: mlp_loss(p, x, t))
        )
        params = optax.apply_updates(params, updates)
        seen.append(float(state[0].hyperparams["rho"]))
    # update i used rho(lr(i)), the learning rate optax.sgd(lr) applies in that update
    expected = [0.02 + 0.06 * float(lr(i)) / 0.1 for i in range(4)]
    np.testing.assert_allclose(seen, expected, rtol=1e-6)


def test_error_messages():
    params = [jnp.ones(2)]
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 2.0"):
        sam_jax.gsam(alpha=2.0)
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        sam_jax.looksam(k=0)
    with pytest.raises(TypeError, match="k must be an int >= 1"):
        sam_jax.every_k_sam(k=1.5)
    with pytest.raises(ValueError, match=r"lmbda must be in \[0, 1\)"):
        sam_jax.friendly_sam(lmbda=1.0)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        sam_jax.momentum_sam(momentum=1.0)
    tx = sam_jax.gsam()
    with pytest.raises(TypeError, match="needs grad_fn"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(ValueError, match="params=None"):
        tx.update(params, tx.init(params), None, grad_fn=lambda p: p)
    with pytest.raises(ValueError, match=r"theta must be in \[0, 1\], got 1.5"):
        sam_jax.vasso(theta=1.5)
    with pytest.raises(ValueError, match="needs both base"):
        sam_jax.wsam(base=optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\)"):
        sam_jax.wsam(gamma=1.0)
    with pytest.raises(ValueError, match="rho_max must be >= rho_min"):
        sam_jax.proportional_rho_schedule(0.1, rho_max=0.01, rho_min=0.1, lr_max=0.1)


def test_looksam_and_every_k_accept_injected_k():
    # inject_hyperparams turns numeric arguments (k included) into arrays, traced under jit
    params = [jnp.asarray(p, jnp.float32) for p in init_mlp()]
    batches = make_batches(6)
    for factory, expected in ((sam_jax.looksam, 2), (sam_jax.every_k_sam, 2)):
        tx = optax.inject_hyperparams(factory)(rho=0.05, k=3)
        _, n, _ = _run(tx, params, batches, count_calls=True)
        assert n == expected
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        optax.inject_hyperparams(sam_jax.looksam)(k=0).init(params)


@pytest.mark.parametrize("name", ["looksam", "everyk"])
def test_static_full_step_matches_the_cond_schedule(name):
    # full_step chosen in Python (two jitted step functions) == the lax.cond version
    k = FACTORIES[name][1]["k"]
    batches = make_batches(6)
    with jax_x64():
        params0 = [jnp.asarray(p) for p in init_mlp()]
        tx = _chain(name, WD)
        by_cond, n_cond, _ = _run(tx, params0, batches, count_calls=True)
        calls = []

        def make_step(full):
            @jax.jit
            def step(params, state, x, t):
                def loss(p):
                    jax.debug.callback(lambda: calls.append(1))
                    return mlp_loss(p, x, t)

                grads = jax.grad(mlp_loss)(params, x, t)
                updates, state = tx.update(
                    grads, state, params, grad_fn=jax.grad(loss), full_step=full
                )
                return optax.apply_updates(params, updates), state

            return step

        steps = {True: make_step(True), False: make_step(False)}
        params, state = params0, tx.init(params0)
        for i, (x, t) in enumerate(batches):
            full = i % k == 0 if name == "looksam" else (i + 1) % k == 0
            params, state = steps[full](params, state, jnp.asarray(x), jnp.asarray(t))
        jax.effects_barrier()
    assert max_rel_diff(params, by_cond) < 1e-13  # XLA may fuse the two forms differently
    assert len(calls) == n_cond == 2
    small = [jnp.ones(2)]
    with pytest.raises(TypeError, match="full_step must be a Python bool"):
        tx = sam_jax.looksam()
        tx.update(small, tx.init(small), small, grad_fn=lambda p: p, full_step=jnp.asarray(True))


def test_states_record_value_perturbed_value_and_sharpness():
    params = [jnp.asarray(p, jnp.float32) for p in init_mlp()]
    x, t = (jnp.asarray(a, jnp.float32) for a in make_batches(1)[0])
    loss_fn = lambda p: mlp_loss(p, x, t)  # noqa: E731
    grad_fn = jax.value_and_grad(loss_fn)
    loss, grads = grad_fn(params)
    for tx in (sam_jax.gsam(0.1), sam_jax.looksam(0.1, k=2), sam_jax.every_k_sam(0.1, k=1)):
        state = tx.init(params)
        assert np.isnan(float(state.sharpness))
        _, state = tx.update(grads, state, params, grad_fn=grad_fn, value=loss)
        e_norm = float(state.grad_norm)
        assert e_norm == pytest.approx(float(optax.tree.norm(grads)), rel=1e-5)
        assert float(state.value) == pytest.approx(float(loss), rel=1e-6)
        point = [w + 0.1 * g / e_norm for w, g in zip(params, grads, strict=True)]
        assert float(state.perturbed_value) == pytest.approx(float(loss_fn(point)), rel=1e-5)
        assert float(state.sharpness) == pytest.approx(float(loss_fn(point) - loss), rel=1e-4)
    # a LookSAM reuse step keeps the figures of the last full step
    before = state = sam_jax.looksam(0.1, k=2).init(params)
    tx = sam_jax.looksam(0.1, k=2)
    _, before = tx.update(grads, state, params, grad_fn=grad_fn, value=loss)
    _, after = tx.update(grads, before, params, grad_fn=grad_fn, value=loss + 1)
    assert float(after.sharpness) == float(before.sharpness)
    assert float(after.value) == float(loss)
