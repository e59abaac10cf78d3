"""``sam_jax.check_chain``: sam_jax must be the first transformation of its chain."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import sam_jax

PARAMS = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(0.3)}


def loss(p):
    return jnp.sum(p["w"] ** 2) + 2.0 * p["b"] ** 2


def train(tx, steps=20):
    params, state = PARAMS, tx.init(PARAMS)
    grad_fn = jax.grad(loss)
    for _ in range(steps):
        updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
        params = optax.apply_updates(params, updates)
    return float(loss(params))


FIRST = {
    "chain": optax.chain(sam_jax.sam(0.05), optax.sgd(0.1, momentum=0.9)),
    "nested": optax.chain(optax.chain(sam_jax.sam(0.05), optax.add_decayed_weights(1e-4)), optax.sgd(0.1)),
    "inject_hyperparams": optax.chain(optax.inject_hyperparams(sam_jax.sam)(rho=0.05), optax.sgd(0.1)),
    "multi_steps": optax.MultiSteps(optax.chain(sam_jax.sam(0.05), optax.sgd(0.1)), 2),
    "apply_if_finite": optax.apply_if_finite(optax.chain(sam_jax.sam(0.05), optax.sgd(0.1)), 3),
    "alone": sam_jax.sam(0.05),
    "gsam": optax.chain(sam_jax.gsam(0.05), optax.sgd(0.1)),
    "looksam": optax.chain(sam_jax.looksam(0.05), optax.sgd(0.1)),
}

NOT_FIRST = {
    "after_sgd": optax.chain(optax.sgd(0.1), sam_jax.sam(0.05)),
    "after_clip": optax.chain(optax.clip_by_global_norm(1.0), sam_jax.sam(0.05), optax.sgd(0.1)),
    "nested_second": optax.chain(optax.chain(optax.scale(1.0), sam_jax.sam(0.05)), optax.sgd(0.1)),
    "wrapped_second": optax.MultiSteps(optax.chain(optax.sgd(0.1), sam_jax.sam(0.05)), 2),
    "gsam_second": optax.chain(optax.add_decayed_weights(1e-4), sam_jax.gsam(0.05), optax.sgd(0.1)),
}


@pytest.mark.parametrize("name", sorted(FIRST))
def test_first_in_the_chain_passes(name):
    assert sam_jax.check_chain(FIRST[name], PARAMS) is None


@pytest.mark.parametrize("name", sorted(NOT_FIRST))
def test_anywhere_else_raises(name):
    with pytest.raises(ValueError, match=r"sits at position [12] of an optax.chain .* Put it first"):
        sam_jax.check_chain(NOT_FIRST[name], PARAMS)


def test_no_sam_in_the_chain_raises():
    with pytest.raises(ValueError, match="found no sam_jax transformation"):
        sam_jax.check_chain(optax.sgd(0.1), PARAMS)


def test_why_it_matters_the_misplaced_chain_diverges_without_error():
    # What check_chain guards against: the misplaced chain runs and climbs the loss.
    start = float(loss(PARAMS))
    assert train(FIRST["chain"], steps=60) < 0.05 * start
    assert train(NOT_FIRST["after_sgd"]) > 10 * start
