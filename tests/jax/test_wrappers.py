"""sam_jax inside the Optax wrappers: MultiSteps, apply_if_finite, reduce_on_plateau,
inject_hyperparams, masked / partition, for batch SAM and m_sharpness_update, and what
check_chain accepts before sam.

Every number is compared in float64 with a NumPy reference written from the formulas
(``tests/reference.py``'s hand-derived MLP gradient), which perturbs only the selected leaves
where a mask is involved.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_jax
from tests import helpers
from tests import reference as ref
from tests.msharpness import reference as msref

RHO, LR, MOMENTUM, WD, ETA, EPS = 0.05, 0.1, 0.9, 1e-3, 0.01, 1e-12
B = 8
#: the NumPy reference's parameter list [w1, b1, w2, b2], as a nested tree
NAMES = (("fc1", "w"), ("fc1", "b"), ("fc2", "w"), ("fc2", "b"))


@pytest.fixture(autouse=True)
def _x64():
    with helpers.jax_x64():
        yield


def to_tree(ws):
    tree: dict = {"fc1": {}, "fc2": {}}
    for (layer, name), w in zip(NAMES, ws, strict=True):
        tree[layer][name] = jnp.asarray(w, jnp.float64)
    return tree


def to_list(tree):
    return [np.asarray(tree[layer][name]) for layer, name in NAMES]


def loss_fn(p, chunk):
    x, t = chunk
    a = jnp.tanh(x @ p["fc1"]["w"].T + p["fc1"]["b"])
    return jnp.mean((a @ p["fc2"]["w"].T + p["fc2"]["b"] - t) ** 2)


def batches(n, seed=1):
    return [(jnp.asarray(x), jnp.asarray(t)) for x, t in ref.make_batches(n, n=B, seed=seed)]


def np_sam_gradient(w, x, t, selected, rho=RHO, adaptive=False, samon=False):
    """One (chunk's) SAM gradient perturbing only the ``selected`` leaves, with the norm over
    those: ``grad L(w_S + e_S, w_rest)`` on S, the clean gradient elsewhere (SAM-ON,
    ``samon=True``: the perturbed gradient everywhere).
    Returns (gradient, loss, perturbed loss, norm)."""
    loss, g = ref.mlp_loss_and_grad(w, x, t)
    scale = [np.abs(wi) + ETA if adaptive else np.ones_like(wi) for wi in w]
    norm = np.sqrt(sum(np.sum((s * gi) ** 2) for s, gi, on in zip(scale, g, selected, strict=True) if on))
    point = [wi + rho * s * s * gi / (norm + EPS) if on else wi
             for wi, s, gi, on in zip(w, scale, g, selected, strict=True)]
    ploss, pg = ref.mlp_loss_and_grad(point, x, t)
    if samon:
        return pg, loss, ploss, norm
    return [p if on else c for p, c, on in zip(pg, g, selected, strict=True)], loss, ploss, norm


def np_msam_gradient(w, x, t, m, selected=(True,) * 4, rho=RHO, adaptive=False, samon=False):
    """m-sharpness: the mean over consecutive chunks of m examples of np_sam_gradient."""
    x, t = np.asarray(x), np.asarray(t)
    k = len(x) // m
    parts = [np_sam_gradient(w, x[c * m:(c + 1) * m], t[c * m:(c + 1) * m], selected, rho,
                             adaptive, samon)
             for c in range(k)]
    grad = [sum(p[0][i] for p in parts) / k for i in range(4)]
    return grad, np.mean([p[1] for p in parts]), np.mean([p[2] for p in parts]), np.mean([p[3] for p in parts])


def assert_close(tree, ws, rtol=1e-12, atol=1e-15):
    for a, b in zip(to_list(tree), ws, strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def base():
    return optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM))


def msam_step(tx, m, impl="scan"):
    @jax.jit
    def step(params, state, batch, **extra):
        updates, state, loss, _ = sam_jax.m_sharpness_update(
            tx, loss_fn, params, state, batch, m=m, impl=impl, **extra)
        return optax.apply_updates(params, updates), state, loss
    return step


# ---------------------------------------------------------------------------------------
# m_sharpness_update inside optax.MultiSteps
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduled", [False, True], ids=["constant_rho", "scheduled_rho"])
def test_multisteps_averages_k_m_sharpness_gradients_then_one_base_step(scheduled):
    """MultiSteps(chain(sam, base), k) with m_sharpness_update: the mean of k m-SAM
    gradients (all taken at the same w), then one base step; nothing in between. A rho
    scheduled with inject_hyperparams follows the emitted steps (the inner state's count)."""
    k, m, cycles = 2, 2, 3
    schedule = lambda count: 0.05 + 0.1 * count  # noqa: E731
    sam = optax.inject_hyperparams(sam_jax.sam)(rho=schedule) if scheduled else sam_jax.sam(RHO)
    tx = optax.MultiSteps(optax.chain(sam, base()), k, accumulator_dtype=jnp.float64)
    step = msam_step(tx, m)
    w = ref.init_mlp()
    params, state = to_tree(w), tx.init(to_tree(w))
    bufs = None
    data = batches(k * cycles)
    for cycle in range(cycles):
        rho = schedule(cycle) if scheduled else RHO
        grads = []
        for i in range(k):
            x, t = data[cycle * k + i]
            last = np_msam_gradient(w, x, t, m, rho=rho)
            grads.append(last[0])
            before = params
            params, state, _ = step(params, state, (x, t))
            if i < k - 1:
                assert_equal(params, before)  # accumulating: no update
        w, bufs = msref.sgd_momentum(w, [sum(g[j] for g in grads) / k for j in range(4)], bufs,
                                     LR, MOMENTUM, WD)
        assert_close(params, w)
    inner = state.inner_opt_state[0]
    sam_state = inner.inner_state if scheduled else inner
    assert int(sam_state.count) == cycles
    # The emitted step records the figures of its own (the k-th) call.
    _, loss, ploss, norm = last
    np.testing.assert_allclose(float(sam_state.value), loss, rtol=1e-12)
    np.testing.assert_allclose(float(sam_state.perturbed_value), ploss, rtol=1e-12)
    np.testing.assert_allclose(float(sam_state.grad_norm), norm, rtol=1e-12)
    assert step._cache_size() == 1


def test_multisteps_with_samon():
    """SAM-ON per chunk (masked perturbation, perturbed gradient on every leaf) accumulates
    the same way."""
    k, m = 2, 4
    mask = {"fc1": {"w": False, "b": True}, "fc2": {"w": False, "b": True}}
    tx = optax.MultiSteps(optax.chain(sam_jax.samon(0.2, mask=mask, adaptive=True), optax.sgd(LR)),
                          k, accumulator_dtype=jnp.float64)
    step = msam_step(tx, m)
    w = ref.init_mlp()
    params, state = to_tree(w), tx.init(to_tree(w))
    data = batches(k)
    for x, t in data:
        params, state, _ = step(params, state, (x, t))
    grads = [np_msam_gradient(w, x, t, m, (False, True, False, True), rho=0.2, adaptive=True,
                              samon=True)[0] for x, t in data]
    assert_close(params, [a - LR * (g1 + g2) / 2 for a, g1, g2 in zip(w, *grads, strict=True)])


# ---------------------------------------------------------------------------------------
# m_sharpness_update inside optax.apply_if_finite
# ---------------------------------------------------------------------------------------


def test_apply_if_finite_skips_and_counts_a_non_finite_m_sharpness_gradient():
    tx = optax.apply_if_finite(optax.chain(sam_jax.sam(RHO), optax.sgd(LR)), 3)
    step = msam_step(tx, 4)
    w = ref.init_mlp()
    data = batches(3)
    params, state = to_tree(w), tx.init(to_tree(w))
    params, state, _ = step(params, state, data[0])
    g = np_msam_gradient(w, *data[0], 4)[0]
    w = [a - LR * b for a, b in zip(w, g, strict=True)]
    assert_close(params, w)
    # One example of the second chunk is NaN: that chunk's gradients, hence G, are NaN.
    x_bad = data[1][0].at[5, 0].set(jnp.nan)
    before_p, before_s = params, state
    params, state, loss = step(params, state, (x_bad, data[1][1]))
    assert np.isnan(float(loss))
    assert_equal(params, before_p)
    assert_equal(state.inner_state, before_s.inner_state)  # sam's count and figures too
    assert int(state.notfinite_count) == 1 and int(state.total_notfinite) == 1
    assert not bool(state.last_finite)
    # The run goes on as if the bad batch had never come.
    params, state, _ = step(params, state, data[2])
    g = np_msam_gradient(w, *data[2], 4)[0]
    assert_close(params, [a - LR * b for a, b in zip(w, g, strict=True)])
    assert int(state.notfinite_count) == 0 and int(state.total_notfinite) == 1
    assert int(state.inner_state[0].count) == 2


def test_scheduled_rho_inside_apply_if_finite_names_the_supported_form():
    schedule = optax.linear_schedule(0.01, 0.1, 10)
    sched = optax.inject_hyperparams(sam_jax.sam)(rho=schedule)
    params = to_tree(ref.init_mlp())
    wrapped = optax.apply_if_finite(optax.chain(sched, optax.sgd(LR)), 3)
    with pytest.raises(TypeError, match=r"inside optax.apply_if_finite.*Put the wrapper after sam"):
        sam_jax.m_sharpness_update(wrapped, loss_fn, params, wrapped.init(params), batches(1)[0], m=4)
    # The form the message names: apply_if_finite after sam checks G itself.
    after = optax.chain(sched, optax.apply_if_finite(optax.sgd(LR), 3))
    step = msam_step(after, 4)
    state = after.init(params)
    x, t = batches(1)[0]
    new, state, _ = step(params, state, (x.at[0, 0].set(jnp.inf), t))
    assert_equal(new, params)
    assert int(state[1].total_notfinite) == 1
    new, state, _ = step(params, state, (x, t))
    g = np_msam_gradient(ref.init_mlp(), x, t, 4, rho=float(schedule(jnp.int32(1))))[0]
    assert_close(new, [a - LR * b for a, b in zip(ref.init_mlp(), g, strict=True)])


# ---------------------------------------------------------------------------------------
# value= (optax.contrib.reduce_on_plateau) and inject_hyperparams around the whole chain
# ---------------------------------------------------------------------------------------


def test_value_reaches_the_chain_for_reduce_on_plateau():
    plateau = optax.contrib.reduce_on_plateau(factor=0.5, patience=1)
    tx = optax.chain(sam_jax.sam(RHO), optax.sgd(LR), plateau)
    step = msam_step(tx, 4)
    w = ref.init_mlp()
    params = to_tree(w)
    x, t = batches(1)[0]
    g, loss, ploss, _ = np_msam_gradient(w, x, t, 4)
    # Without value= the chain gets m-sharpness' clean loss.
    new, state, got = step(params, tx.init(params), (x, t))
    np.testing.assert_allclose(float(got), loss, rtol=1e-12)
    np.testing.assert_allclose(float(state[2].best_value), loss, rtol=1e-12)
    # With value=, that value; sam's state keeps the m-sharpness figures.
    _, state, _ = step(params, tx.init(params), (x, t), value=jnp.asarray(2.0))
    assert float(state[2].best_value) == 2.0
    np.testing.assert_allclose(float(state[0].value), loss, rtol=1e-12)
    np.testing.assert_allclose(float(state[0].sharpness), ploss - loss, rtol=1e-9)
    new, state, _ = step(params, state, (x, t), value=jnp.asarray(3.0))  # no improvement
    assert float(state[2].scale) == 0.5
    assert_close(new, [a - 0.5 * LR * b for a, b in zip(w, g, strict=True)])


def test_inject_hyperparams_around_the_whole_chain_schedules_every_chunk():
    def make(rho, learning_rate):
        return optax.chain(sam_jax.sam(rho), optax.sgd(learning_rate))

    tx = optax.inject_hyperparams(make)(rho=lambda c: 0.05 * (c + 1), learning_rate=LR)
    step = msam_step(tx, 2)
    w = ref.init_mlp()
    params, state = to_tree(w), tx.init(to_tree(w))
    for i, (x, t) in enumerate(batches(2)):
        params, state, _ = step(params, state, (x, t))
        g = np_msam_gradient(w, x, t, 2, rho=0.05 * (i + 1))[0]
        w = [a - LR * b for a, b in zip(w, g, strict=True)]
        assert_close(params, w)


def test_grad_fn_is_not_an_extra_argument():
    tx = optax.chain(sam_jax.sam(RHO), optax.sgd(LR))
    params = to_tree(ref.init_mlp())
    with pytest.raises(TypeError, match="builds grad_fn itself"):
        sam_jax.m_sharpness_update(tx, loss_fn, params, tx.init(params), batches(1)[0], m=4,
                                   grad_fn=jax.grad(loss_fn))


# ---------------------------------------------------------------------------------------
# optax.masked / optax.partition around sam
# ---------------------------------------------------------------------------------------

LEAF_LABELS = {"fc1": {"w": "sam", "b": "plain"}, "fc2": {"w": "sam", "b": "plain"}}
PREFIX_LABELS = {"fc1": "sam", "fc2": "plain"}  # a prefix of the params tree
SELECTED = {"leaves": (True, False, True, False), "prefix": (True, True, False, False)}


def partition(labels, adaptive=False):
    return optax.partition(
        {"sam": optax.chain(sam_jax.sam(RHO, adaptive=adaptive), optax.sgd(LR)),
         "plain": optax.sgd(LR)},
        labels,
    )


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
@pytest.mark.parametrize("labels", ["leaves", "prefix"])
def test_partition_perturbs_only_its_leaves(labels, adaptive):
    """sam in a partition group: its leaves get grad L(w_S + e_S, w_rest) with e_S from their
    own norm; the other group the clean gradient."""
    tx = partition(LEAF_LABELS if labels == "leaves" else PREFIX_LABELS, adaptive)
    selected = SELECTED[labels]
    w = ref.init_mlp()
    params = to_tree(w)
    sam_jax.check_chain(tx, params)
    x, t = batches(1)[0]

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params, (x, t))
        grad_fn = jax.value_and_grad(lambda p: loss_fn(p, (x, t)))
        return tx.update(grads, state, params, grad_fn=sam_jax.with_full_params(grad_fn, params))

    state = tx.init(params)
    updates, state = step(params, state)
    g, _, ploss, norm = np_sam_gradient(w, x, t, selected, adaptive=adaptive)
    assert_close(updates, [-LR * gi for gi in g])
    sam_state = state.inner_states["sam"].inner_state[0]
    np.testing.assert_allclose(float(sam_state.grad_norm), norm, rtol=1e-12)
    np.testing.assert_allclose(float(sam_state.perturbed_value), ploss, rtol=1e-12)


def test_partition_matches_samon_on_the_selected_leaves():
    """sam_jax.samon perturbs the same leaves with the same norm: the sam group's updates are
    SAM-ON's on those leaves (SAM-ON also gives the others the perturbed gradient)."""
    params = to_tree(ref.init_mlp())
    x, t = batches(1)[0]
    grads = jax.grad(loss_fn)(params, (x, t))
    grad_fn = jax.grad(lambda p: loss_fn(p, (x, t)))
    tx = partition(LEAF_LABELS)
    updates, _ = tx.update(grads, tx.init(params), params,
                           grad_fn=sam_jax.with_full_params(grad_fn, params))
    mask = jax.tree.map(lambda label: label == "sam", LEAF_LABELS)
    samon = optax.chain(sam_jax.samon(RHO, mask=mask), optax.sgd(LR))
    on, _ = samon.update(grads, samon.init(params), params, grad_fn=grad_fn)
    for layer in ("fc1", "fc2"):
        np.testing.assert_allclose(updates[layer]["w"], on[layer]["w"], rtol=1e-14, atol=1e-16)
        np.testing.assert_allclose(updates[layer]["b"], -LR * grads[layer]["b"], rtol=1e-15)


def test_masked_alone_passes_the_other_leaves_through():
    mask = {"fc1": {"w": True, "b": False}, "fc2": {"w": False, "b": True}}
    tx = optax.masked(optax.chain(sam_jax.sam(RHO), optax.sgd(LR)), mask)
    w = ref.init_mlp()
    params = to_tree(w)
    x, t = batches(1)[0]
    grads = jax.grad(loss_fn)(params, (x, t))
    grad_fn = sam_jax.with_full_params(jax.grad(lambda p: loss_fn(p, (x, t))), params)
    updates, _ = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
    g = np_sam_gradient(w, x, t, (True, False, False, True))[0]
    clean = ref.mlp_loss_and_grad(w, np.asarray(x), np.asarray(t))[1]
    assert_close(updates, [-LR * g[0], clean[1], clean[2], -LR * g[3]])


def test_mask_compatible_extra_args_and_a_group_that_selects_nothing():
    """with_full_params is not a params-shaped tree, so mask_compatible_extra_args leaves it
    whole; a sam group given no leaf perturbs nothing and never calls grad_fn."""
    params = to_tree(ref.init_mlp())
    x, t = batches(1)[0]
    grads = jax.grad(loss_fn)(params, (x, t))
    grad_fn = sam_jax.with_full_params(jax.grad(lambda p: loss_fn(p, (x, t))), params)
    plain = partition(LEAF_LABELS)
    compat = optax.partition(
        {"sam": optax.chain(sam_jax.sam(RHO), optax.sgd(LR)), "plain": optax.sgd(LR)},
        LEAF_LABELS, mask_compatible_extra_args=True)
    a, _ = plain.update(grads, plain.init(params), params, grad_fn=grad_fn)
    b, _ = compat.update(grads, compat.init(params), params, grad_fn=grad_fn)
    assert_equal(a, b)

    def never(_):
        raise AssertionError("grad_fn called for a group with no parameters")

    nothing = partition(jax.tree.map(lambda _: "plain", LEAF_LABELS))
    updates, state = nothing.update(grads, nothing.init(params), params,
                                    grad_fn=sam_jax.with_full_params(never, params))
    assert_close(updates, [-LR * g for g in to_list(grads)], rtol=1e-15)
    assert int(state.inner_states["sam"].inner_state[0].count) == 1


def test_a_plain_grad_fn_inside_a_mask_raises_with_the_fix():
    tx = partition(LEAF_LABELS)
    params = to_tree(ref.init_mlp())
    x, t = batches(1)[0]
    grads = jax.grad(loss_fn)(params, (x, t))
    with pytest.raises(TypeError, match=r"inside optax.masked or optax.partition.*with_full_params"):
        tx.update(grads, tx.init(params), params, grad_fn=jax.grad(lambda p: loss_fn(p, (x, t))))
    # Variants go through the same call: gsam in a partition works the same way.
    gsam = optax.partition({"sam": optax.chain(sam_jax.gsam(RHO, alpha=0.0), optax.sgd(LR)),
                            "plain": optax.sgd(LR)}, LEAF_LABELS)
    grad_fn = sam_jax.with_full_params(jax.grad(lambda p: loss_fn(p, (x, t))), params)
    a, _ = gsam.update(grads, gsam.init(params), params, grad_fn=grad_fn)
    b, _ = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-14, atol=1e-16)


def test_with_full_params_without_a_mask_is_the_grad_fn():
    tx = optax.chain(sam_jax.sam(RHO), optax.sgd(LR))
    params = to_tree(ref.init_mlp())
    x, t = batches(1)[0]
    grads = jax.grad(loss_fn)(params, (x, t))
    grad_fn = jax.grad(lambda p: loss_fn(p, (x, t)))
    a, _ = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
    b, _ = tx.update(grads, tx.init(params), params,
                     grad_fn=sam_jax.with_full_params(grad_fn, params))
    assert_equal(a, b)
    with pytest.raises(TypeError, match="callable"):
        sam_jax.with_full_params(3, params)
    with pytest.raises(ValueError, match="full parameter tree"):
        sam_jax.with_full_params(grad_fn, None)


@pytest.mark.parametrize(("m", "impl"), [(2, "scan"), (2, "vmap"), (B, "scan")])
def test_m_sharpness_in_a_partition(m, impl):
    """Each chunk perturbs only the sam group's leaves with its own gradient; the sam group
    steps on the mean perturbed gradient, the other group on the clean batch gradient.
    m = B is the batch-SAM partition step."""
    tx = partition(LEAF_LABELS)
    step = msam_step(tx, m, impl=impl)
    w = ref.init_mlp()
    params, state = to_tree(w), tx.init(to_tree(w))
    for x, t in batches(2):
        g, loss, ploss, norm = np_msam_gradient(w, x, t, m, SELECTED["leaves"])
        params, state, got = step(params, state, (x, t))
        w = [a - LR * b for a, b in zip(w, g, strict=True)]
        assert_close(params, w)
        np.testing.assert_allclose(float(got), loss, rtol=1e-12)
        s = state.inner_states["sam"].inner_state[0]
        np.testing.assert_allclose(float(s.grad_norm), norm, rtol=1e-12)
        np.testing.assert_allclose(float(s.perturbed_value), ploss, rtol=1e-12)


# ---------------------------------------------------------------------------------------
# check_chain: what may come before sam
# ---------------------------------------------------------------------------------------

HARMLESS = {
    "identity": lambda: optax.chain(optax.identity(), sam_jax.sam(RHO), optax.sgd(LR)),
    "nested": lambda: optax.chain(optax.chain(optax.identity(), optax.identity()),
                                  optax.chain(optax.identity(), sam_jax.sam(RHO)), optax.sgd(LR)),
    "multi_steps": lambda: optax.MultiSteps(
        optax.chain(optax.identity(), sam_jax.sam(RHO), optax.sgd(LR)), 2),
    "apply_if_finite": lambda: optax.apply_if_finite(
        optax.chain(optax.identity(), sam_jax.sam(RHO), optax.sgd(LR)), 2),
    "partition": lambda: optax.partition(
        {"sam": optax.chain(optax.identity(), sam_jax.sam(RHO), optax.sgd(LR)),
         "plain": optax.sgd(LR)}, PREFIX_LABELS),
    "samon": lambda: optax.chain(optax.identity(), sam_jax.samon(RHO, mask=SAMON_MASK),
                                 optax.sgd(LR)),
    # optax returns the updates themselves for a zero weight decay: provably harmless.
    "zero_decay": lambda: optax.chain(optax.add_decayed_weights(0.0), sam_jax.sam(RHO),
                                      optax.sgd(LR)),
}
SAMON_MASK = {"fc1": {"w": False, "b": True}, "fc2": {"w": False, "b": True}}

CHANGES_THE_GRADIENT = {
    "scale_one": lambda: optax.chain(optax.scale(1.0), sam_jax.sam(RHO), optax.sgd(LR)),
    "clip": lambda: optax.chain(optax.clip_by_global_norm(1e9), sam_jax.sam(RHO), optax.sgd(LR)),
    "gsam_after_identity": lambda: optax.chain(optax.identity(), sam_jax.gsam(RHO), optax.sgd(LR)),
}


@pytest.mark.parametrize("name", sorted(HARMLESS))
def test_check_chain_accepts_a_pass_through_before_sam(name):
    params = to_tree(ref.init_mlp())
    assert sam_jax.check_chain(HARMLESS[name](), params) is None


def test_identity_before_sam_gives_the_same_steps():
    params = to_tree(ref.init_mlp())
    x, t = batches(1)[0]
    grads = jax.grad(loss_fn)(params, (x, t))
    grad_fn = jax.grad(lambda p: loss_fn(p, (x, t)))
    plain = optax.chain(sam_jax.sam(RHO), optax.sgd(LR))
    a, _ = plain.update(grads, plain.init(params), params, grad_fn=grad_fn)
    tx = HARMLESS["identity"]()
    b, _ = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
    assert_equal(a, b)


@pytest.mark.parametrize("name", sorted(CHANGES_THE_GRADIENT))
def test_check_chain_rejects_anything_that_touches_the_gradient_before_sam(name):
    """Even a transformation that happens to be the identity at these values (a scale of 1,
    clipping at 1e9) is not provably harmless: only pass-throughs are."""
    params = to_tree(ref.init_mlp())
    with pytest.raises(ValueError, match=r"sits at position 1 .*optax\.identity\(\)"):
        sam_jax.check_chain(CHANGES_THE_GRADIENT[name](), params)
