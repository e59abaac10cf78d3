"""LookSAM driven as the examples' training loops drive it, against an independent float64
transcription of Liu et al. (CVPR 2022), Algorithm 1, with a per-step rho (a ramp that
starts at 0), in both backends.

The transcription follows the paper's notation: on steps with t % k == 0 a SAM step whose
gradient g_s also gives g_v = g_s - ||g_s|| cos(theta) g / ||g||; on the others
g_s = g + alpha ||g|| / ||g_v|| g_v. With rho = 0 the perturbed point is w, so g_s = g and
g_v = 0 exactly: the reuse steps are then SGD steps.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import max_rel_diff
from tests.reference import SGDRef, init_mlp, make_batches, mlp_loss_and_grad
from tests.variants.reference import _flat, _unflat

LR, MOM, WD, STEPS = 0.1, 0.9, 5e-4, 10


def paper_looksam(params, batches, *, k, alpha, rhos):
    """Algorithm 1 of the LookSAM paper with SGD (momentum, coupled weight decay) as the
    base step; ``rhos[t]`` is step t's rho. Returns the parameters and passes per step."""
    base = SGDRef(LR, MOM, WD)
    w, g_v, passes = _flat(params), None, []
    for t, (x, y) in enumerate(batches):

        def grad(v, x=x, y=y):
            return _flat(mlp_loss_and_grad(_unflat(v, params), x, y)[1])

        g = grad(w)
        if t % k == 0:
            rho = rhos[t]
            g_s = grad(w + rho * g / np.linalg.norm(g)) if rho > 0 else g
            cos = g_s @ g / (np.linalg.norm(g_s) * np.linalg.norm(g))
            g_v = g_s - np.linalg.norm(g_s) * cos * g / np.linalg.norm(g)
            if rho == 0:
                g_v = np.zeros_like(g)  # exactly: the formula's g_s is g
            u = g_s
            passes.append(2)
        else:
            n_v = np.linalg.norm(g_v)
            u = g if n_v == 0 else g + alpha * np.linalg.norm(g) / n_v * g_v
            passes.append(1)
        w = _flat(base.step(_unflat(w, params), _unflat(u, params)))
    return _unflat(w, params), passes


RHO = 0.08
# (k, alpha, warm-up steps): no ramp; a ramp whose first full step has rho = 0 and whose
# second one a partial rho; rho = 0 throughout (LookSAM is then SGD)
CASES = {"no-ramp": (3, 0.7, 0), "ramp": (3, 0.7, 5), "k2-ramp": (2, 0.4, 3)}


def _rhos(warmup, rho=RHO):
    return [rho * min(t, warmup) / warmup if warmup else rho for t in range(STEPS)]


# -- torch: the loop of examples/train_torch.py ---------------------------------------------
torch = pytest.importorskip("torch")
import sam_torch  # noqa: E402
from tests.variants.test_torch_variants import _model  # noqa: E402


def _torch_loop(opt, model, batches, warmup=None):
    """backward at w; a full step by first_step / second_step, a reuse step by step()."""
    passes = []
    for x, y in batches:
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        ((model(xt) - yt) ** 2).mean().backward()
        if opt.is_full_step:
            opt.first_step(zero_grad=True)
            ((model(xt) - yt) ** 2).mean().backward()
            opt.second_step(zero_grad=True)
            passes.append(2)
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
            passes.append(1)
        if warmup is not None:
            warmup.step()
    return [p.detach().numpy() for p in model.parameters()], passes


@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_looksam_in_the_examples_loop_follows_the_paper(case):
    k, alpha, warmup = CASES[case]
    params0, batches = init_mlp(), make_batches(STEPS, seed=4)
    expected, ref_passes = paper_looksam(params0, batches, k=k, alpha=alpha, rhos=_rhos(warmup))
    model = _model(params0)
    opt = sam_torch.LookSAM(
        model.parameters(), torch.optim.SGD, rho=RHO, k=k, alpha=alpha,
        lr=LR, momentum=MOM, weight_decay=WD,
    )
    ramp = sam_torch.RhoWarmup(opt, warmup) if warmup else None
    got, passes = _torch_loop(opt, model, batches, ramp)
    assert passes == ref_passes
    assert max_rel_diff(got, expected) < 1e-10


def test_torch_looksam_with_rho_zero_is_sgd_in_float32():
    # rho = 0: g_v is the projection's rounding error; normalized to alpha ||g|| it turned
    # the reuse steps into g +- 0.7 g
    params0, batches = init_mlp(), make_batches(STEPS, seed=5)
    m1, m2 = _model(params0).float(), _model(params0).float()
    look = sam_torch.LookSAM(m1.parameters(), torch.optim.SGD, rho=0.0, k=3, alpha=0.7,
                             lr=LR, momentum=MOM, weight_decay=WD)
    sgd = torch.optim.SGD(m2.parameters(), lr=LR, momentum=MOM, weight_decay=WD)
    for x, y in batches:
        xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float()
        ((m2(xt) - yt) ** 2).mean().backward()
        sgd.step()
        sgd.zero_grad()

    got, _ = _torch_loop(look, m1, [(x.astype(np.float32), y.astype(np.float32))
                                    for x, y in batches])
    want = [p.detach().numpy() for p in m2.parameters()]
    assert max_rel_diff(got, want) < 1e-5


# -- JAX: the loop of examples/train_jax.py (full_step chosen on the host), and lax.cond ----
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import sam_jax  # noqa: E402
from tests.helpers import jax_x64  # noqa: E402
from tests.variants.test_jax_variants import mlp_loss  # noqa: E402


def _jax_loop(tx, params, batches, k, *, static):
    @jax.jit
    def cond_step(params, state, x, t):
        grads = jax.grad(mlp_loss)(params, x, t)
        updates, state = tx.update(
            grads, state, params, grad_fn=jax.grad(lambda p: mlp_loss(p, x, t))
        )
        return optax.apply_updates(params, updates), state

    def make_static(full):
        @jax.jit
        def step(params, state, x, t):
            grads = jax.grad(mlp_loss)(params, x, t)
            updates, state = tx.update(
                grads, state, params, grad_fn=jax.grad(lambda p: mlp_loss(p, x, t)),
                full_step=full,
            )
            return optax.apply_updates(params, updates), state

        return step

    steps = {True: make_static(True), False: make_static(False)}
    state = tx.init(params)
    for i, (x, t) in enumerate(batches):
        step = steps[i % k == 0] if static else cond_step
        params, state = step(params, state, jnp.asarray(x), jnp.asarray(t))
    return [np.asarray(p) for p in params]


@pytest.mark.parametrize("static", [True, False], ids=["host-choice", "lax.cond"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_jax_looksam_in_the_examples_loop_follows_the_paper(case, static):
    k, alpha, warmup = CASES[case]
    params0, batches = init_mlp(), make_batches(STEPS, seed=4)
    expected, _ = paper_looksam(params0, batches, k=k, alpha=alpha, rhos=_rhos(warmup))
    with jax_x64():
        if warmup:
            first = optax.inject_hyperparams(sam_jax.looksam, static_args=("k",))(
                rho=sam_jax.rho_warmup_schedule(RHO, warmup), k=k, alpha=alpha
            )
        else:
            first = sam_jax.looksam(RHO, k=k, alpha=alpha)
        tx = optax.chain(first, optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOM))
        got = _jax_loop(tx, [jnp.asarray(p) for p in params0], batches, k, static=static)
    assert max_rel_diff(got, expected) < 1e-10


def test_paper_transcription_is_not_sgd():
    # the cases above compare something that differs from plain SGD (g_v is used)
    params0, batches = init_mlp(), make_batches(STEPS, seed=4)
    look, _ = paper_looksam(params0, batches, k=3, alpha=0.7, rhos=_rhos(5))
    sgd, _ = paper_looksam(params0, batches, k=3, alpha=0.7, rhos=[0.0] * STEPS)
    assert max_rel_diff(look, sgd) > 1e-3
