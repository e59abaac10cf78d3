"""``optax.inject_hyperparams`` with float16 parameters: the error says how to keep the
hyperparameters in float32, and with ``hyperparam_dtype=jnp.float32`` the update is the one
of ``sam_jax.sam`` built with the same Python numbers."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_jax


def _grad_fn(p):
    return jax.tree.map(lambda w: jnp.sin(w) * jnp.asarray(2, w.dtype), p)


PARAMS = {"w": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float16), "b": jnp.full((2,), 0.25, jnp.float16)}


@pytest.mark.parametrize("factory", [sam_jax.sam, sam_jax.gsam])
def test_float16_hyperparameters_error_suggests_float32(factory):
    tx = optax.inject_hyperparams(factory)(rho=0.05)
    message = "eps must be a finite number > 0, got Array(0., dtype=float16); it is a float16 array"
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        tx.init(PARAMS)  # eps=1e-12 is 0 in float16
    assert "hyperparam_dtype=jnp.float32" in str(info.value)


def test_float32_hyperparameters_with_float16_params_match_plain_sam():
    grads = _grad_fn(PARAMS)
    injected = optax.chain(
        optax.inject_hyperparams(sam_jax.sam, hyperparam_dtype=jnp.float32)(rho=0.05),
        optax.sgd(0.1),
    )
    plain = optax.chain(sam_jax.sam(rho=0.05), optax.sgd(0.1))
    out = [tx.update(grads, tx.init(PARAMS), PARAMS, grad_fn=_grad_fn)[0] for tx in (injected, plain)]
    for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1]), strict=True):
        assert a.dtype == jnp.float16
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
