"""SAM train steps for Flax: linen ``TrainState`` with ``batch_stats``, and ``flax.nnx``.

Run: ``python examples/flax_train_steps.py`` (CPU, a few seconds). Both train the same small
BatchNorm MLP on a synthetic two-class problem with

    optax.chain(sam_jax.sam(rho), optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9))

and print the clean loss, the perturbed loss and the sharpness estimate ``L(w+e) - L(w)``
that :class:`sam_jax.SAMState` records at no extra cost.

Two rules for BatchNorm under SAM (see docs/jax.md):

* the running statistics come from the clean pass at ``w`` only; the perturbed pass at
  ``w + e`` normalizes with its own batch statistics (train mode) but its running-average
  update is discarded;
* ``TrainState.apply_gradients`` calls ``tx.update(grads, opt_state, params)`` without extra
  arguments, so it cannot pass ``grad_fn``: call ``state.tx.update`` yourself (below).
  ``nnx.Optimizer.update(model, grads, **kwargs)`` does forward them.

And one for dropout (``dropout=`` > 0 in the models below): both passes of a step draw the
same masks (they evaluate one sampled objective, so ``L(w+e) - L(w)`` is sharpness, not
dropout noise), each step fresh ones. linen: one key per step,
``fold_in(state.dropout_key, state.step)``, given to both passes. nnx: the perturbed copy
is merged from the model's state *before* the clean pass, RNG counts included, so it replays
the clean pass's keys; the clean pass advances the model's counts for the next step.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state

import sam_jax

HIDDEN, CLASSES = 16, 2


def make_data(n: int = 64, d: int = 4, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """Two Gaussian blobs, labels 0/1."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.standard_normal((n, d)) + 1.5 * (2 * y[:, None] - 1)
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)


def make_tx(rho: float = 0.05, lr: float = 0.1, wd: float = 5e-4) -> optax.GradientTransformation:
    """SAM first in the chain: it needs the raw gradient and hands on the one at w + e."""
    return optax.chain(sam_jax.sam(rho), optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# ---------------------------------------------------------------------------------------
# Flax linen: TrainState + batch_stats
# ---------------------------------------------------------------------------------------


class LinenMLP(nn.Module):
    """Dense -> BatchNorm -> relu -> Dropout -> Dense (``dropout=0``: no dropout)."""

    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = nn.Dense(HIDDEN)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
        return nn.Dense(CLASSES)(x)


class TrainState(train_state.TrainState):
    batch_stats: Any
    dropout_key: jax.Array  # the run's; step t uses fold_in(dropout_key, t) in both passes


def create_linen_state(
    seed: int = 0, tx: optax.GradientTransformation | None = None, dropout: float = 0.0
) -> TrainState:
    model = LinenMLP(dropout=dropout)
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
    variables = model.init(init_key, jnp.zeros((1, 4)), train=False)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        dropout_key=dropout_key,
        tx=tx if tx is not None else make_tx(),
    )


@jax.jit
def linen_train_step(
    state: TrainState, batch: tuple[jax.Array, jax.Array]
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SAM step; BatchNorm running statistics come from the clean pass only, and both
    passes draw the step's dropout masks."""
    x, y = batch
    key = jax.random.fold_in(state.dropout_key, state.step)  # this step's, for both passes

    def loss_fn(params: Any, batch_stats: Any) -> tuple[jax.Array, Any]:
        logits, mutated = state.apply_fn(
            {"params": params, "batch_stats": batch_stats}, x, train=True,
            mutable=["batch_stats"], rngs={"dropout": key},
        )
        return cross_entropy(logits, y), mutated["batch_stats"]

    grad_and_stats = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, new_batch_stats), grads = grad_and_stats(state.params, state.batch_stats)

    def perturbed_grad_fn(perturbed_params: Any) -> Any:
        # Returns ((loss, batch_stats), grads); sam keeps the loss and drops the statistics.
        return grad_and_stats(perturbed_params, state.batch_stats)

    # Not state.apply_gradients(grads=grads): it does not forward grad_fn to tx.update.
    updates, opt_state = state.tx.update(
        grads, state.opt_state, state.params, grad_fn=perturbed_grad_fn, value=loss
    )
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        batch_stats=new_batch_stats,
    )
    sam_state = opt_state[0]
    metrics = {
        "loss": loss,
        "perturbed_loss": sam_state.perturbed_value,
        "sharpness": sam_state.sharpness,
        "grad_norm": sam_state.grad_norm,
    }
    return new_state, metrics


# ---------------------------------------------------------------------------------------
# flax.nnx
# ---------------------------------------------------------------------------------------


class NNXMLP(nnx.Module):
    """The nnx twin of :class:`LinenMLP` (same layers, same BatchNorm settings)."""

    def __init__(self, d: int = 4, *, rngs: nnx.Rngs, dropout: float = 0.0) -> None:
        self.fc1 = nnx.Linear(d, HIDDEN, rngs=rngs)
        self.bn = nnx.BatchNorm(HIDDEN, momentum=0.9, rngs=rngs)
        self.fc2 = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)  # last: the layers' init stays the same

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.drop(nnx.relu(self.bn(self.fc1(x)))))


def create_nnx(
    seed: int = 0, tx: optax.GradientTransformation | None = None, dropout: float = 0.0
) -> tuple[NNXMLP, nnx.Optimizer]:
    model = NNXMLP(rngs=nnx.Rngs(seed), dropout=dropout)
    model.train()
    return model, nnx.Optimizer(model, tx if tx is not None else make_tx(), wrt=nnx.Param)


@nnx.jit
def nnx_train_step(
    model: NNXMLP, optimizer: nnx.Optimizer, batch: tuple[jax.Array, jax.Array]
) -> dict[str, jax.Array]:
    """One SAM step; the model's BatchNorm statistics are updated by the clean pass only,
    and both passes draw the step's dropout masks."""
    x, y = batch

    def loss_fn(m: NNXMLP) -> jax.Array:
        return cross_entropy(m(x), y)

    # The state before the clean pass, RNG counts included (split *after* it, the copy would
    # draw the masks of the next step's clean pass).
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    rest = nnx.as_pure(rest)  # plain arrays: the copy below gets fresh Variables
    # Clean pass on the model itself: its BatchNorm running averages and RNG counts advance.
    loss, grads = nnx.value_and_grad(loss_fn)(model)

    def perturbed_loss(params: Any) -> jax.Array:
        # A functional copy at w + e: the clean pass's dropout keys again; its BatchNorm
        # and RNG updates vanish with it.
        return loss_fn(nnx.merge(graphdef, params, rest))

    optimizer.update(model, grads, grad_fn=jax.value_and_grad(perturbed_loss), value=loss)
    sam_state = optimizer.opt_state[0]
    return {
        "loss": loss,
        "perturbed_loss": sam_state.perturbed_value[...],
        "sharpness": sam_state.sharpness[...],
        "grad_norm": sam_state.grad_norm[...],
    }


def copy_linen_to_nnx(state: TrainState, model: NNXMLP) -> None:
    """Give the nnx model the linen model's parameters and statistics (for comparisons)."""
    p, s = state.params, state.batch_stats
    model.fc1.kernel[...] = p["Dense_0"]["kernel"]
    model.fc1.bias[...] = p["Dense_0"]["bias"]
    model.bn.scale[...] = p["BatchNorm_0"]["scale"]
    model.bn.bias[...] = p["BatchNorm_0"]["bias"]
    model.bn.mean[...] = s["BatchNorm_0"]["mean"]
    model.bn.var[...] = s["BatchNorm_0"]["var"]
    model.fc2.kernel[...] = p["Dense_1"]["kernel"]
    model.fc2.bias[...] = p["Dense_1"]["bias"]


def main(steps: int = 30, dropout: float = 0.0) -> None:
    batch = make_data()
    state = create_linen_state(dropout=dropout)
    for i in range(steps):
        state, m = linen_train_step(state, batch)
        if i % 10 == 0 or i == steps - 1:
            print(f"linen step {i:3d}  loss {float(m['loss']):.4f}  "
                  f"L(w+e) {float(m['perturbed_loss']):.4f}  sharpness {float(m['sharpness']):.2e}")
    model, optimizer = create_nnx(dropout=dropout)
    for i in range(steps):
        m = nnx_train_step(model, optimizer, batch)
        if i % 10 == 0 or i == steps - 1:
            print(f"nnx   step {i:3d}  loss {float(m['loss']):.4f}  "
                  f"L(w+e) {float(m['perturbed_loss']):.4f}  sharpness {float(m['sharpness']):.2e}")


if __name__ == "__main__":
    main()
