"""sam_jax.m_sharpness_update (scan and vmap) and the named-axis form, in float64."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_jax
from tests import helpers
from tests import reference as ref
from tests.msharpness import reference as msref

LR, MOMENTUM, WD = 0.1, 0.9, 5e-3
B = 16
IMPLS = ["scan", "vmap", "auto"]


@pytest.fixture(autouse=True)
def _x64():
    with helpers.jax_x64():
        yield


def _tx(adaptive, eta=0.01, rho=0.05, **kw):
    return optax.chain(
        sam_jax.sam(rho, adaptive=adaptive, eta=eta, **kw),
        optax.add_decayed_weights(WD),
        optax.sgd(LR, momentum=MOMENTUM),
    )


MLP = helpers.flax_mlp()


def _mlp_params(np_params):
    w1, b1, w2, b2 = (jnp.asarray(a) for a in np_params)
    return {"fc1": {"kernel": w1.T, "bias": b1}, "fc2": {"kernel": w2.T, "bias": b2}}


def _torch_layout(params):
    return helpers.mlp_params_to_torch_layout({"params": params})


def _mse_loss(params, chunk):
    x, t = chunk
    return jnp.mean((MLP.apply({"params": params}, x) - t) ** 2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m", [1, 4, B])
@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
def test_mlp_matches_numpy_reference(adaptive, m, impl):
    np_params = ref.init_mlp()
    params = _mlp_params(np_params)
    tx = _tx(adaptive)
    opt_state = tx.init(params)
    cfg = [(0.05, adaptive, 0.01)] * 4

    @jax.jit
    def step(params, opt_state, batch):
        updates, opt_state, loss, _ = sam_jax.m_sharpness_update(
            tx, _mse_loss, params, opt_state, batch, m=m, impl=impl
        )
        return optax.apply_updates(params, updates), opt_state, loss

    bufs = None
    for x, t in ref.make_batches(3, n=B):
        G, loss, ploss, norm = msref.numpy_mlp(np_params, x, t, m, cfg)
        np_params, bufs = msref.sgd_momentum(np_params, G, bufs, LR, MOMENTUM, WD)
        params, opt_state, got = step(params, opt_state, (jnp.asarray(x), jnp.asarray(t)))
        s = opt_state[0]
        np.testing.assert_allclose(float(got), loss, rtol=1e-12)
        np.testing.assert_allclose(float(s.value), loss, rtol=1e-12)
        np.testing.assert_allclose(float(s.perturbed_value), ploss, rtol=1e-12)
        np.testing.assert_allclose(float(s.sharpness), ploss - loss, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(float(s.grad_norm), norm, rtol=1e-12)
        assert helpers.max_rel_diff(_torch_layout(params), np_params) < 1e-12
    assert int(opt_state[0].count) == 3


def _two_impls_and_named_axis(tx_kw, m, chunk_sizes=(None,)):
    np_params = ref.init_mlp()
    params = _mlp_params(np_params)
    x, t = (jnp.asarray(a) for a in ref.make_batches(1, n=B)[0])
    tx = _tx(**tx_kw)
    state = tx.init(params)
    out = {}
    for impl in ("scan", "vmap"):
        for cs in chunk_sizes if impl == "vmap" else (None,):
            f = jax.jit(
                lambda p, s, b, impl=impl, cs=cs: sam_jax.m_sharpness_update(
                    tx, _mse_loss, p, s, b, m=m, impl=impl, chunk_size=cs
                )
            )
            out[(impl, cs)] = f(params, state, (x, t))[:2]
    axis = "chunks"
    tx_named = _tx(**tx_kw, axis_name=axis, m_sharpness=True)

    def chunk_update(params, opt_state, chunk):
        loss, grads = jax.value_and_grad(_mse_loss)(params, chunk)
        grad_fn = jax.value_and_grad(lambda p: _mse_loss(p, chunk))
        return tx_named.update(
            grads, opt_state, params, grad_fn=grad_fn, value=jax.lax.pmean(loss, axis)
        )

    named = jax.jit(
        jax.vmap(chunk_update, in_axes=(None, None, 0), out_axes=None, axis_name=axis)
    )(params, state, sam_jax.chunk_batch((x, t), m))
    out[("named-axis", None)] = named
    return out


@pytest.mark.parametrize("adaptive", [False, True], ids=["SAM", "ASAM"])
def test_scan_vmap_chunk_size_and_named_axis_agree(adaptive):
    out = _two_impls_and_named_axis(dict(adaptive=adaptive), m=2, chunk_sizes=(None, 2, 4))
    base_updates, base_state = out[("scan", None)]
    for key, (updates, state) in out.items():
        for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(base_updates), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-16, err_msg=str(key))
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(base_state), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-16, err_msg=str(key))


@pytest.mark.parametrize("impl", ["scan", "vmap"])
def test_m_equals_batch_is_batch_sam(impl):
    params = _mlp_params(ref.init_mlp())
    tx = _tx(adaptive=True)
    state_a = state_b = tx.init(params)
    params_a = params_b = params
    for x, t in ref.make_batches(3, n=B):
        batch = (jnp.asarray(x), jnp.asarray(t))
        updates, state_a, _, _ = sam_jax.m_sharpness_update(
            tx, _mse_loss, params_a, state_a, batch, m=B, impl=impl
        )
        params_a = optax.apply_updates(params_a, updates)
        loss, grads = jax.value_and_grad(_mse_loss)(params_b, batch)
        grad_fn = jax.value_and_grad(lambda p, batch=batch: _mse_loss(p, batch))
        updates, state_b = tx.update(grads, state_b, params_b, grad_fn=grad_fn, value=loss)
        params_b = optax.apply_updates(params_b, updates)
    for a, b in zip(jax.tree.leaves((params_a, state_a)), jax.tree.leaves((params_b, state_b)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-16)


class BNNet(nn.Module):
    """Dense -> BatchNorm -> tanh -> Dense, float64."""

    @nn.compact
    def __call__(self, x, *, train):
        kw = dict(param_dtype=jnp.float64, dtype=jnp.float64)
        x = nn.Dense(6, **kw)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.7, **kw)(x)
        return nn.Dense(3, **kw)(jnp.tanh(x))


@pytest.mark.parametrize("impl", ["scan", "vmap"])
@pytest.mark.parametrize("m", [2, 4, B])
def test_linen_batch_stats(m, impl):
    """Per-chunk statistics; running averages = mean over chunks of each clean pass's update."""
    model = BNNet()
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((B, 5)))
    y = jnp.asarray(rng.integers(0, 3, B))
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    params = variables["params"]
    batch_stats = jax.tree.map(lambda s: s + 0.3, variables["batch_stats"])
    rho = 0.05
    tx = _tx(adaptive=False, rho=rho)
    opt_state = tx.init(params)

    def loss_fn(params, chunk):
        xc, yc = chunk
        logits, new = model.apply(
            {"params": params, "batch_stats": batch_stats}, xc, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, yc).mean()
        return loss, (logits, new["batch_stats"])

    updates, new_state, _, (logits, stats) = jax.jit(
        lambda p, s: sam_jax.m_sharpness_update(
            tx, loss_fn, p, s, (x, y), m=m, impl=impl, has_aux=True
        )
    )(params, opt_state)
    new_stats = jax.tree.map(lambda s: s.mean(0), stats)
    assert logits.shape == (B // m, m, 3)

    # Reference: a plain loop over chunks with jax.grad and NumPy formulas.
    leaves, treedef = jax.tree.flatten(params)
    total = [np.zeros(np.shape(v)) for v in leaves]
    chunk_stats = []
    for c in range(B // m):
        chunk = (x[c * m:(c + 1) * m], y[c * m:(c + 1) * m])
        (_, (_, st)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, chunk)
        chunk_stats.append(st)
        g = [np.asarray(v) for v in jax.tree.leaves(g)]
        e = ref.sam_perturbation([np.asarray(v) for v in leaves], g, rho)
        perturbed = jax.tree.unflatten(treedef, [np.asarray(v) + ev for v, ev in zip(leaves, e, strict=True)])
        pg = jax.grad(lambda p, chunk=chunk: loss_fn(p, chunk)[0])(perturbed)
        total = [a + np.asarray(b) for a, b in zip(total, jax.tree.leaves(pg), strict=True)]
    G = [a / (B // m) for a in total]
    want_updates = [-LR * (g + WD * np.asarray(w)) for g, w in zip(G, leaves, strict=True)]
    # atol: the bias before BatchNorm has a gradient of exactly 0 up to rounding. rtol: with
    # m = 2 examples per chunk the batch variance is small and BatchNorm amplifies rounding
    # (measured up to 1.2e-11 between programs XLA compiles differently).
    scale = max(float(np.max(np.abs(u))) for u in want_updates)
    for a, b in zip(jax.tree.leaves(updates), want_updates, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * scale)
    want_stats = jax.tree.map(lambda *s: np.mean(np.stack(s), 0), *chunk_stats)
    for a, b in zip(jax.tree.leaves(new_stats), jax.tree.leaves(want_stats), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    # and it is not the statistics of the whole batch (m < B)
    _, whole = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
    differs = any(
        not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new_stats), jax.tree.leaves(whole), strict=True)
    )
    assert differs == (m < B)
    assert jax.tree.structure(new_state) == jax.tree.structure(opt_state)


@pytest.mark.parametrize("impl", ["scan", "vmap"])
def test_state_is_batch_sams_not_k_fold(impl):
    params = _mlp_params(ref.init_mlp())
    tx = _tx(adaptive=True)
    state = tx.init(params)
    x, t = (jnp.asarray(a) for a in ref.make_batches(1, n=B)[0])
    _, new_state, _, _ = sam_jax.m_sharpness_update(tx, _mse_loss, params, state, (x, t), m=1, impl=impl)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True):
        assert jnp.shape(a) == jnp.shape(b) and jnp.asarray(a).dtype == jnp.asarray(b).dtype


def test_rolled_scan_memory_does_not_grow_with_k():
    """Compiled scratch memory: k = 64 chunks in a rolled scan vs batch SAM (k = 1)."""
    params = {"w": jnp.zeros((256, 256)), "v": jnp.zeros((256, 10))}
    tx = _tx(adaptive=False)
    state = tx.init(params)
    x = jnp.zeros((64, 256))
    y = jnp.zeros((64,), jnp.int32)

    def loss_fn(p, chunk):
        xc, yc = chunk
        logits = jnp.tanh(xc @ p["w"]) @ p["v"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yc).mean()

    def temp_bytes(m, impl, unroll=True):
        f = jax.jit(lambda p, s, b: sam_jax.m_sharpness_update(
            tx, loss_fn, p, s, b, m=m, impl=impl, unroll=unroll))
        analysis = f.lower(params, state, (x, y)).compile().memory_analysis()
        if analysis is None:
            pytest.skip("this backend reports no memory analysis")
        return analysis.temp_size_in_bytes

    param_bytes = (256 * 256 + 256 * 10) * 8
    batch_sam = temp_bytes(64, "scan")
    rolled = temp_bytes(1, "scan", unroll=1)
    vmap = temp_bytes(1, "vmap")
    assert rolled < batch_sam + 2 * param_bytes  # a parameter-sized sum, not 64 gradients
    assert vmap > 16 * param_bytes  # the vmap form holds per-chunk weights: k-fold


def test_bad_m_raises_the_same_error_as_torch():
    import torch

    import sam_torch

    params = _mlp_params(ref.init_mlp())
    tx = _tx(adaptive=False)
    state = tx.init(params)
    x = jnp.zeros((10, 5))
    t = jnp.zeros((10, 3))
    with pytest.raises(ValueError) as jax_err:
        sam_jax.m_sharpness_update(tx, _mse_loss, params, state, (x, t), m=4)
    with pytest.raises(ValueError) as chunk_err:
        sam_jax.chunk_batch((x, t), 4)
    model = helpers.torch_mlp()
    opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError) as torch_err:
        sam_torch.m_sharpness_step(
            opt, model, lambda mod, c: ((mod(c[0]) - c[1]) ** 2).mean(),
            (torch.zeros(10, 5, dtype=torch.float64), torch.zeros(10, 3, dtype=torch.float64)), m=4,
        )
    assert str(jax_err.value) == str(torch_err.value) == str(chunk_err.value)
    assert "B=10" in str(jax_err.value) and "m=4" in str(jax_err.value)
    assert "[1, 2, 5, 10]" in str(jax_err.value)
    with pytest.raises(ValueError, match="leading dimension"):
        sam_jax.chunk_batch((x, t[:5]), 5)
    with pytest.raises(ValueError, match="chunk_size must divide"):
        sam_jax.m_sharpness_update(tx, _mse_loss, params, state, (x, t), m=2, impl="vmap", chunk_size=2)
    with pytest.raises(ValueError, match="impl must be"):
        sam_jax.m_sharpness_update(tx, _mse_loss, params, state, (x, t), m=2, impl="pmap")


def test_chunk_batch_layout():
    x = jnp.arange(24).reshape(12, 2)
    chunks = sam_jax.chunk_batch({"x": x, "y": jnp.arange(12)}, 3)
    assert chunks["x"].shape == (4, 3, 2)
    np.testing.assert_array_equal(chunks["y"][1], [3, 4, 5])  # consecutive examples


@pytest.mark.parametrize(
    "make", [sam_jax.gsam, sam_jax.wsam, sam_jax.looksam, sam_jax.friendly_sam, sam_jax.vasso],
)
def test_variants_raise(make):
    params = _mlp_params(ref.init_mlp())
    tx = optax.chain(make(), optax.sgd(0.1))
    state = tx.init(params)
    x, t = jnp.zeros((8, 5)), jnp.zeros((8, 3))
    with pytest.raises(TypeError, match=make.__name__):
        sam_jax.m_sharpness_update(tx, _mse_loss, params, state, (x, t), m=4)
    with pytest.raises(TypeError, match="exactly one"):
        sam_jax.m_sharpness_update(
            optax.sgd(0.1), _mse_loss, params, optax.sgd(0.1).init(params), (x, t), m=4
        )


def test_inject_hyperparams_rho_schedule():
    """A scheduled rho (inject_hyperparams) reaches every chunk's perturbation."""
    params = _mlp_params(ref.init_mlp())
    x, t = (jnp.asarray(a) for a in ref.make_batches(1, n=B)[0])
    fixed = _tx(adaptive=False, rho=0.2)
    injected = optax.chain(
        optax.inject_hyperparams(sam_jax.sam)(rho=0.2), optax.add_decayed_weights(WD),
        optax.sgd(LR, momentum=MOMENTUM),
    )
    a = sam_jax.m_sharpness_update(fixed, _mse_loss, params, fixed.init(params), (x, t), m=4)
    b = sam_jax.m_sharpness_update(injected, _mse_loss, params, injected.init(params), (x, t), m=4)
    for u, v in zip(jax.tree.leaves(a[0]), jax.tree.leaves(b[0]), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-13)
    assert float(b[1][0].inner_state.grad_norm) == pytest.approx(float(a[1][0].grad_norm), rel=1e-13)
