"""examples.trajectory: the indices it hands out are the batches' own, and its per-step calls
train SAF and MESA in both backends as the library's classes do."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from examples.data import Split, batches, epoch_rng
from examples.trajectory import (
    indexed_batches,
    jax_trajectory_term,
    jax_update_kwargs,
    make_optax_trajectory,
    make_torch_trajectory,
    torch_trajectory_term,
)

ARGS = SimpleNamespace(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False,
                       saf_start_epoch=0, saf_lag_epochs=1, mesa_start_epoch=0, mesa_decay=0.5)


def _split(n=10):
    rng = np.random.default_rng(0)
    return Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n))


def test_indices_are_the_batches_order():
    split = _split()
    plain = list(batches(split, 4, rng=epoch_rng(3, 2), train=True, augment=True))
    indexed = list(indexed_batches(split, 4, seed=3, epoch=2, augment=True))
    assert [len(b[2]) for b in indexed] == [4, 4, 2]
    for (x, y), (xi, yi, idx) in zip(plain, indexed, strict=True):
        np.testing.assert_array_equal(x, xi)
        np.testing.assert_array_equal(y, yi)
        np.testing.assert_array_equal(split.labels[idx], y)
    assert sorted(np.concatenate([b[2] for b in indexed]).tolist()) == list(range(10))


@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_torch_calls(name):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = make_torch_trajectory(name, model, ARGS, num_examples=8)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    terms = []
    for epoch in range(3):
        logits = model(x)
        term = torch_trajectory_term(opt, model, logits, x, np.arange(8), epoch)
        terms.append(float(term.detach()))
        (torch.nn.functional.cross_entropy(logits, y) + term).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert terms[0] == 0.0 and terms[2] > 0.0


@pytest.mark.parametrize("name", ["saf", "mesa"])
def test_jax_calls(name):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import optax

    tx = make_optax_trajectory(name, ARGS, lambda count: 0.1, num_examples=8, num_classes=3)
    x = jax.random.normal(jax.random.key(0), (8, 6))
    y = jnp.arange(8) % 3
    params = {"w": jax.random.normal(jax.random.key(1), (6, 3)) * 0.5}
    state = tx.init(params)

    @jax.jit
    def step(params, state, epoch):
        def loss_fn(p):
            logits = x @ p["w"]
            term = jax_trajectory_term(state, logits, lambda q: x @ q["w"], jnp.arange(8), epoch)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + term, (logits, term)

        (_, (logits, term)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, state = tx.update(g, state, params, **jax_update_kwargs(state, logits, jnp.arange(8), epoch))
        return optax.apply_updates(params, updates), state, term

    terms = []
    for epoch in range(3):
        params, state, term = step(params, state, jnp.asarray(epoch))
        terms.append(float(term))
    assert terms[0] == 0.0 and terms[2] > 0.0
