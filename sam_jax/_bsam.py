r"""``sam_jax.bsam``: Bayesian SAM (Möllenhoff & Khan, ICLR 2023) as an Optax transformation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import sam_core

from ._ops import JaxOps
from ._sam import _state_dtype
from ._variants import _check_call, _evaluate, _nan

__all__ = ["BSAMState", "bsam", "bsam_noise", "predictive"]

_OPS = JaxOps()


class BSAMState(NamedTuple):
    r"""State of :func:`bsam`: the posterior :math:`\mathcal{N}(\omega, 1 / (N s))` but its mean.

    Attributes:
        count: number of updates so far (int32, saturating).
        key: the PRNG key the next update's noise is drawn from.
        momentum: :math:`g_m` (like ``params``).
        precision: :math:`s` (like ``params``).
        num_data: :math:`N`, kept for :func:`predictive`.
        value: the loss at the posterior sample when ``grad_fn`` returns it, else NaN.
        perturbed_value: the loss at :math:`\omega + \epsilon`, else NaN.
    """

    count: jax.Array
    key: jax.Array
    momentum: optax.Updates
    precision: optax.Updates
    num_data: jax.Array
    value: jax.Array
    perturbed_value: jax.Array


def bsam_noise(key: jax.Array, params: optax.Params) -> Any:
    """The standard-normal draws :func:`bsam` takes from ``key``: one like each leaf.

    ``jax.random.split(key, n_leaves)`` then ``jax.random.normal`` per leaf (in the leaves'
    dtypes); :func:`bsam` uses ``jax.random.split(state.key)[1]`` as ``key``.
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))
    draws = [
        jax.random.normal(k, jnp.shape(x), jnp.asarray(x).dtype)
        for k, x in zip(keys, leaves, strict=False)
    ]
    return jax.tree.unflatten(treedef, draws)


def bsam(
    num_data: float,
    lr: optax.ScalarOrSchedule = 0.5,
    betas: tuple[float, float] = (0.9, 0.999),
    rho: float | jax.Array = 0.05,
    damping: float | jax.Array = 0.1,
    weight_decay: float | jax.Array = 1e-4,
    *,
    s_init: float = 1.0,
    gc: bool = False,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Bayesian SAM (bSAM) as an Optax transformation: a complete optimizer, like ``optax.adam``.

    One update is Algorithm 1 of the paper (:mod:`sam_core`'s ``bsam_*`` functions):

    .. math::

        \theta = \omega + z / \sqrt{N s},\ z \sim \mathcal{N}(0, I); \quad
        g = \nabla \ell(\theta); \quad
        \epsilon = \rho\, g / s; \quad
        g_\epsilon = \nabla \ell(\omega + \epsilon);

        g_m \leftarrow \beta_1 g_m + (1 - \beta_1)(g_\epsilon + \delta \omega); \quad
        s \leftarrow \beta_2 s + (1 - \beta_2)(\sqrt{s}\, |g| + \delta + \gamma); \quad
        u = -\alpha\, g_m / s,

    with :math:`\omega` the ``params`` (the posterior mean); ``optax.apply_updates(params,
    u)`` is the new mean. Both gradients come from ``grad_fn`` (two calls per update: at
    the sample and at the perturbed mean); ``updates`` is ignored (pass ``None``), since
    the first gradient is taken at a sample the transformation draws::

        tx = sam_jax.bsam(num_data=len(train_set), lr=0.5, rho=0.05)
        state = tx.init(params)
        grad_fn = jax.value_and_grad(lambda p: loss_fn(p, batch))
        updates, state = tx.update(None, state, params, grad_fn=grad_fn)
        params = optax.apply_updates(params, updates)
        probs = sam_jax.predictive(apply_fn, params, state, x, key=jax.random.key(0))

    The noise comes from ``state.key`` (seeded by ``seed``; :func:`bsam_noise`), so a run
    is reproducible and resumes exactly from a saved state; ``update(..., noise=tree)``
    takes given standard-normal draws instead. ``sam_torch.BSAM`` is the same algorithm
    (same defaults, ``pytorch_optimizer``'s): the same noise gives the same trajectory.

    Reference: Möllenhoff and Khan, "SAM as an Optimal Relaxation of Bayes", ICLR 2023.

    Args:
        num_data: :math:`N`, the number of training examples (``grad_fn``'s loss is the
            batch mean).
        lr: :math:`\alpha`, a number or an Optax schedule of the update count.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        rho: :math:`\rho \ge 0`.
        damping: :math:`\gamma \ge 0`.
        weight_decay: :math:`\delta \ge 0`, the prior precision; ``damping + weight_decay``
            must be > 0.
        s_init: the initial precision, > 0.
        gc: centralize :math:`g` (:func:`sam_core.centralize`) before :math:`\epsilon` is
            formed from it (static).
        seed: the seed of the noise.
    """
    sam_core.validate_bsam(
        num_data=num_data, lr=1.0 if callable(lr) else lr, betas=betas, rho=rho,
        damping=damping, weight_decay=weight_decay, s_init=s_init,
    )
    sam_core.check_bool("gc", gc)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    beta1, beta2 = betas

    def init_fn(params: optax.Params) -> BSAMState:
        leaves = jax.tree.leaves(params)
        dtype = _state_dtype(leaves)
        return BSAMState(
            count=jnp.zeros((), jnp.int32),
            key=jax.random.PRNGKey(seed),
            momentum=jax.tree.map(jnp.zeros_like, params),
            precision=jax.tree.map(lambda x: jnp.full_like(x, s_init), params),
            num_data=jnp.asarray(num_data, dtype),
            value=_nan(dtype),
            perturbed_value=_nan(dtype),
        )

    def update_fn(
        updates: optax.Updates | None,
        state: BSAMState,
        params: optax.Params | None = None,
        *,
        grad_fn: Callable[[optax.Params], Any] | None = None,
        noise: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, BSAMState]:
        del updates, extra_args
        _check_call("bsam", params, grad_fn)
        w, treedef = jax.tree.flatten(params)
        dtype = _state_dtype(w)
        key, sub = jax.random.split(state.key)
        z = jax.tree.leaves(bsam_noise(sub, params) if noise is None else noise)
        if len(z) != len(w):
            raise ValueError(
                f"noise must have the structure of params ({len(w)} leaves), got {len(z)} leaves"
            )
        s = jax.tree.leaves(state.precision)
        m = jax.tree.leaves(state.momentum)
        theta = [
            sam_core.bsam_sample(x, si, jnp.asarray(zi, x.dtype), num_data).astype(x.dtype)
            for x, si, zi in zip(w, s, z, strict=True)
        ]
        g, value = _evaluate(grad_fn, treedef, theta, w, dtype)
        direction = sam_core.centralize(_OPS, g) if gc else g
        point = [
            (x + sam_core.bsam_perturbation(d, si, rho)).astype(x.dtype)
            for x, d, si in zip(w, direction, s, strict=True)
        ]
        g_eps, p_value = _evaluate(grad_fn, treedef, point, w, dtype)
        new_m = [
            sam_core.bsam_momentum_update(mi, ge, x, beta1, weight_decay).astype(mi.dtype)
            for mi, ge, x in zip(m, g_eps, w, strict=True)
        ]
        new_s = [
            sam_core.bsam_precision_update(si, gi, beta2, weight_decay, damping).astype(si.dtype)
            for si, gi in zip(s, g, strict=True)
        ]
        lr_t = lr(state.count) if callable(lr) else lr
        u = [
            sam_core.bsam_step(mi, si, lr_t).astype(x.dtype)
            for mi, si, x in zip(new_m, new_s, w, strict=True)
        ]
        new_state = BSAMState(
            count=optax.safe_increment(state.count),
            key=key,
            momentum=jax.tree.unflatten(treedef, new_m),
            precision=jax.tree.unflatten(treedef, new_s),
            num_data=state.num_data,
            value=value,
            perturbed_value=p_value,
        )
        return jax.tree.unflatten(treedef, u), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find_state(state: Any) -> BSAMState:
    """The :class:`BSAMState` in ``state`` (itself, or inside an ``optax.chain``'s tuple)."""
    if isinstance(state, BSAMState):
        return state
    if isinstance(state, tuple | list):
        for part in state:
            try:
                return _find_state(part)
            except TypeError:
                continue
    raise TypeError(
        f"predictive needs the state of sam_jax.bsam (a BSAMState, or a chain state holding "
        f"one), got {type(state).__name__}"
    )


def predictive(
    apply_fn: Callable[[optax.Params, Any], Any],
    params: optax.Params,
    state: Any,
    inputs: Any,
    *,
    key: jax.Array,
    samples: int = 16,
    transform: Callable[[Any], Any] = jax.nn.softmax,
) -> Any:
    r"""bSAM's predictive distribution: ``transform(apply_fn(theta, inputs))`` averaged over
    posterior samples :math:`\theta_k \sim \mathcal{N}(\omega, 1 / (N s))`.

    .. math::

        p(y \mid x) \approx \frac{1}{S} \sum_{k=1}^{S} \operatorname{softmax}(f(x; \theta_k))

    Args:
        apply_fn: ``apply_fn(params, inputs)`` returns the model's outputs (logits), e.g.
            ``lambda p, x: model.apply({"params": p}, x)``.
        params: the posterior mean :math:`\omega` (the trained parameters).
        state: the :class:`BSAMState` (or an ``optax.chain`` state holding one).
        inputs: the batch.
        key: PRNG key of the samples (reproducible: the same key, the same result).
        samples: :math:`S`, an int >= 1 (a sequential ``lax.map``: one model in memory).
        transform: output -> probabilities (``jax.nn.softmax`` over the last axis).
    """
    sam_core.check_positive_int("samples", samples)
    bs = _find_state(state)
    w, treedef = jax.tree.flatten(params)
    s = jax.tree.leaves(bs.precision)
    if len(s) != len(w):
        raise ValueError("params and the BSAM state's precision must have the same structure")

    def one(k: jax.Array) -> Any:
        z = jax.tree.leaves(bsam_noise(k, params))
        theta = [
            sam_core.bsam_sample(x, si, zi, bs.num_data).astype(x.dtype)
            for x, si, zi in zip(w, s, z, strict=True)
        ]
        return transform(apply_fn(jax.tree.unflatten(treedef, theta), inputs))

    probs = jax.lax.map(one, jax.random.split(key, samples))
    return jax.tree.map(lambda p: jnp.mean(p, axis=0), probs)
