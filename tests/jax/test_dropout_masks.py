"""Dropout masks in the Flax recipes and in m_sharpness_update: the same masks in both passes
of a step (or of a chunk), fresh ones each step (and each chunk).

Masks are recorded with an ordered ``jax.debug.callback`` from a module that draws them with
the framework's own dropout (applied to ones, so the recorded array is the mask itself).
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sam_jax

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 3


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location(
        "flax_train_steps", ROOT / "examples" / "flax_train_steps.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def recorder(masks):
    return lambda m: masks.append(np.asarray(m))


def assert_same_within_fresh_across(masks, passes=2):
    assert len(masks) % passes == 0 and len(masks) >= 2 * passes
    for i in range(0, len(masks), passes):
        for j in range(1, passes):
            np.testing.assert_array_equal(masks[i], masks[i + j])
    assert masks[0].any() and not masks[0].all()
    # every pass of a group differs from every pass of another (the old nnx recipe drew
    # step t's perturbed mask again in the clean pass of step t + 1)
    for i in range(0, len(masks), passes):
        for j in range(i + passes, len(masks)):
            assert not np.array_equal(masks[i], masks[j])


# -- flax.nnx ---------------------------------------------------------------------------
class NNXRecordingMLP(nnx.Module):
    def __init__(self, masks, *, rngs: nnx.Rngs) -> None:
        self.fc1 = nnx.Linear(4, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
        self.fc2 = nnx.Linear(16, 2, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.record = recorder(masks)

    def __call__(self, x):
        h = nnx.relu(self.bn(self.fc1(x)))
        mask = self.drop(jnp.ones_like(h)) != 0
        jax.debug.callback(self.record, mask, ordered=True)
        return self.fc2(jnp.where(mask, h * 2.0, 0.0))


def test_nnx_recipe_same_masks_in_a_step_fresh_each_step(ex):
    masks = []
    model = NNXRecordingMLP(masks, rngs=nnx.Rngs(0))
    model.train()
    optimizer = nnx.Optimizer(model, ex.make_tx(), wrt=nnx.Param)
    batch = ex.make_data()
    for _ in range(STEPS):
        ex.nnx_train_step(model, optimizer, batch)
    jax.effects_barrier()
    assert len(masks) == 2 * STEPS
    assert_same_within_fresh_across(masks)


# -- flax linen -------------------------------------------------------------------------
class LinenRecordingMLP(nn.Module):
    record: object

    @nn.compact
    def __call__(self, x, *, train: bool):
        h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(16)(x)))
        mask = nn.Dropout(0.5, deterministic=not train)(jnp.ones_like(h)) != 0
        jax.debug.callback(self.record, mask, ordered=True)
        return nn.Dense(2)(jnp.where(mask, h * 2.0, 0.0))


def test_linen_recipe_same_masks_in_a_step_fresh_each_step(ex):
    masks = []
    model = LinenRecordingMLP(recorder(masks))
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)), train=False)
    masks.clear()
    state = ex.TrainState.create(
        apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"],
        dropout_key=jax.random.PRNGKey(1), tx=ex.make_tx(),
    )
    batch = ex.make_data()
    for _ in range(STEPS):
        state, _ = ex.linen_train_step(state, batch)
    jax.effects_barrier()
    assert len(masks) == 2 * STEPS
    assert_same_within_fresh_across(masks)


def test_examples_train_with_dropout(ex, capsys):  # linen, then nnx
    ex.main(steps=12, dropout=0.2)
    lines = capsys.readouterr().out.strip().splitlines()
    losses = [float(line.split("loss")[1].split()[0]) for line in lines]
    assert losses[2] < losses[0] and losses[5] < losses[3]


# -- m_sharpness_update(key=) -----------------------------------------------------------
K, M, D, RHO = 4, 3, 5, 0.1


def block_batch():
    """Chunk c's examples are ones in block c of the features, zeros elsewhere."""
    x = np.zeros((K * M, K * D))
    for c in range(K):
        x[c * M:(c + 1) * M, c * D:(c + 1) * D] = 1.0
    return jnp.asarray(x, jnp.float32)


def linear_loss(w, chunk, key):
    # linear in w: L_c(w + e_c) - L_c(w) = rho ||g_c|| exactly when both passes share the mask
    mask = jax.random.bernoulli(key, 0.5, chunk.shape)
    return jnp.mean(jnp.where(mask, chunk * 2.0, 0.0) @ w)


@pytest.mark.parametrize("impl", ["scan", "vmap"])
def test_m_sharpness_update_key_same_mask_per_chunk_own_mask_per_chunk(impl):
    w = jax.random.normal(jax.random.PRNGKey(3), (K * D,))
    tx = optax.chain(sam_jax.sam(RHO), optax.sgd(1.0))

    @functools.partial(jax.jit, static_argnums=0)
    def run(loss_fn, key):
        updates, state, _, _ = sam_jax.m_sharpness_update(
            tx, loss_fn, w, tx.init(w), block_batch(), m=M, impl=impl, key=key)
        return -updates.reshape(K, D), state[0]  # G by blocks, SAMState

    g, state = run(linear_loss, jax.random.PRNGKey(0))
    assert float(state.sharpness) == pytest.approx(RHO * float(state.grad_norm), rel=1e-5)
    # each chunk its own mask: the blocks of G (chunk c's mean mask) differ; a new key, new masks
    g = np.asarray(g)
    assert all(not np.array_equal(g[i], g[j]) for i in range(K) for j in range(i))
    assert not np.array_equal(g, np.asarray(run(linear_loss, jax.random.PRNGKey(1))[0]))

    # a mask drawn afresh at w + e (the key folded with the weights' bits) breaks the identity
    def fresh_loss(w, chunk, key):
        bits = jax.lax.bitcast_convert_type(jnp.sum(w), jnp.int32)
        return linear_loss(w, chunk, jax.random.fold_in(key, bits))
    _, fresh = run(fresh_loss, jax.random.PRNGKey(0))
    assert float(fresh.sharpness) != pytest.approx(RHO * float(fresh.grad_norm), rel=1e-2)


def test_m_sharpness_update_key_masks_recorded_in_chunk_order():
    masks = []

    def loss_fn(w, chunk, key):
        mask = jax.random.bernoulli(key, 0.5, chunk.shape)
        jax.debug.callback(recorder(masks), mask, ordered=True)
        return jnp.mean(jnp.where(mask, chunk * 2.0, 0.0) @ w)

    w = jnp.ones(K * D)
    tx = optax.chain(sam_jax.sam(RHO), optax.sgd(0.1))
    state = tx.init(w)
    for step in range(2):
        key = jax.random.fold_in(jax.random.PRNGKey(0), step)
        updates, state, _, _ = sam_jax.m_sharpness_update(
            tx, loss_fn, w, state, block_batch(), m=M, impl="scan", key=key)
        w = optax.apply_updates(w, updates)
    jax.effects_barrier()
    assert len(masks) == 2 * 2 * K  # steps x chunks x (clean, perturbed)
    assert_same_within_fresh_across(masks)


def test_m_sharpness_update_key_type_error():
    w = jnp.ones(3)
    tx = optax.chain(sam_jax.sam(RHO), optax.sgd(0.1))
    with pytest.raises(TypeError, match="key must be a PRNG key"):
        sam_jax.m_sharpness_update(tx, lambda w, c, k: jnp.sum(w), w, tx.init(w),
                                   jnp.ones((4, 3)), m=2, key=7)


def test_nnx_m_sharpness_recipe_with_key(ex):
    """docs/m_sharpness.md's nnx step with dropout: nnx.reseed with each chunk's key."""
    masks = []
    model = NNXRecordingMLP(masks, rngs=nnx.Rngs(params=0, dropout=1))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    tx = ex.make_tx()
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, rest, opt_state, batch, key):
        def loss_fn(params, chunk, key):
            x, y = chunk
            m = nnx.merge(graphdef, params, rest)
            nnx.reseed(m, dropout=key)  # this chunk's masks, in both of its passes
            return ex.cross_entropy(m(x), y), nnx.state(m, nnx.BatchStat)

        updates, opt_state, loss, stats = sam_jax.m_sharpness_update(
            tx, loss_fn, params, opt_state, batch, m=16, has_aux=True, key=key)
        return (optax.apply_updates(params, updates),
                jax.tree.map(lambda s: s.mean(0), stats), opt_state, loss)

    batch = ex.make_data(n=32)
    base_key = jax.random.PRNGKey(42)
    for step in range(2):
        # (the running statistics, second output, go back with nnx.update in a real loop)
        params, _, opt_state, loss = train_step(
            params, rest, opt_state, batch, jax.random.fold_in(base_key, step))
        assert np.isfinite(float(loss))
    jax.effects_barrier()
    assert len(masks) == 2 * 2 * 2  # steps x chunks x passes (scan on CPU: chunk order)
    assert_same_within_fresh_across(masks)
