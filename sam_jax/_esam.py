r"""``sam_jax.esam``: Efficient SAM (Du et al., ICLR 2022) as an Optax transformation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

import sam_core

from ._ops import JaxOps
from ._sam import _scalar, _state_dtype
from ._variants import _clean_gradient, _flatten_pair, _init_fields, _step_fields

__all__ = ["ESAMState", "esam", "esam_masks"]

_OPS = JaxOps()
#: ``loss_fn(params)`` -> per-example losses (B,); ``loss_fn(params, index)`` -> (k,).
PerExampleLossFn = Callable[..., jax.Array]


class ESAMState(NamedTuple):
    """State of :func:`esam`.

    Attributes:
        count: number of updates so far (int32, saturating).
        key: the PRNG key the next update's masks are drawn from (:func:`esam_masks`).
        grad_norm: :math:`\\lVert T_w (m \\odot g) \\rVert` of the last perturbation.
        value: the mean clean loss (``value=``, or the mean of ``losses=``), else NaN.
        perturbed_value: the mean loss of the whole batch at :math:`w + e`.
        sharpness: ``perturbed_value - value`` (NaN unless both are known).
        kept_fraction: the fraction of the weights the last perturbation moved.
    """

    count: jax.Array
    key: jax.Array
    grad_norm: jax.Array
    value: jax.Array
    perturbed_value: jax.Array
    sharpness: jax.Array
    kept_fraction: jax.Array


def esam_masks(
    key: jax.Array, params: optax.Params, beta: float, mask: Literal["tensor", "element"] = "tensor"
) -> Any:
    """The SWP masks :func:`esam` draws from ``key``: a tree like ``params`` of booleans,
    each ``True`` with probability ``beta``: one scalar per leaf (``mask="tensor"``, one
    ``jax.random.bernoulli`` of shape ``(n_leaves,)``) or one per weight (``"element"``,
    ``jax.random.split(key, n_leaves)`` then one draw of the leaf's shape each).
    :func:`esam` uses ``jax.random.split(state.key)[1]`` as ``key``."""
    leaves, treedef = jax.tree.flatten(params)
    if mask == "tensor":
        draws = jax.random.bernoulli(key, beta, (max(len(leaves), 1),))
        return jax.tree.unflatten(treedef, [draws[i] for i in range(len(leaves))])
    keys = jax.random.split(key, max(len(leaves), 1))
    return jax.tree.unflatten(
        treedef,
        [jax.random.bernoulli(k, beta, jnp.shape(x)) for k, x in zip(keys, leaves, strict=False)],
    )


def esam(
    rho: float | jax.Array = 0.05,
    *,
    beta: float = 0.5,
    gamma: float = 0.5,
    mask: Literal["tensor", "element"] = "tensor",
    seed: int = 0,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    eps: float | jax.Array = 1e-12,
    gc: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Efficient SAM (ESAM): stochastic weight perturbation and sharpness-sensitive data
    selection, as the first transformation of an Optax chain.

    .. math::

        e = \frac{\rho}{\beta}\, \frac{T_w^2 (m \odot g)}{\lVert T_w (m \odot g) \rVert
            + \epsilon}, \quad m \sim \mathrm{Bernoulli}(\beta), \qquad
        u = \nabla_w \frac{1}{k} \sum_{i \in \mathcal{B}^+} \ell_i(w + e),

    with :math:`\mathcal{B}^+` the :math:`k = \max(1, \lfloor \gamma B \rfloor)` examples
    whose loss rises most, :math:`\ell_i(w + e) - \ell_i(w)`
    (:mod:`sam_core._esam`: the paper's rules with the official code's choices, masked
    norm and one draw per parameter tensor by default; exactly :math:`k` examples kept).
    :math:`\beta = \gamma = 1` is :func:`sam_jax.sam`.

    Reference: Du et al., "Efficient Sharpness-aware Minimization for Improved Training of
    Neural Networks", ICLR 2022.

    **The per-example loss contract.** ``update(grads, state, params, *, loss_fn,
    losses=None, value=None, masks=None)``: ``grads`` is the clean gradient of the *mean*
    loss; ``loss_fn(params)`` returns the per-example losses of the batch, shape ``(B,)``,
    and ``loss_fn(params, index)`` those of the examples ``index`` (an int32 array of shape
    ``(k,)``, increasing), e.g.::

        def loss_fn(p, index=None):
            x, y = (xb, yb) if index is None else (xb[index], yb[index])
            return optax.softmax_cross_entropy_with_integer_labels(model(p, x), y)

        (loss, losses), grads = jax.value_and_grad(
            lambda p: (lambda l: (l.mean(), l))(loss_fn(p)), has_aux=True)(params)
        updates, state = tx.update(grads, state, params, loss_fn=loss_fn, losses=losses)

    ``losses`` (the clean per-example losses, shape ``(B,)``) saves a forward pass: without
    it the transformation computes ``loss_fn(params)``. Per update: a forward
    ``loss_fn(w + e)`` (no gradient), the selection (``jax.lax.top_k``, fixed shape ``(k,)``)
    and the gradient of ``loss_fn(w + e, index).mean()``; with :math:`\gamma = 1` only the
    gradient of ``loss_fn(w + e).mean()`` (SAM's pass, no index). Pure and jit-safe; ``B``
    is static (the losses' shape). ``masks`` (a tree like ``params`` of booleans, scalars or
    leaf-shaped) replaces the draw (:func:`esam_masks`); the key advances either way.

    To schedule ``rho``, keep the static arguments static:
    ``optax.inject_hyperparams(sam_jax.esam, static_args=("beta", "gamma", "mask",
    "seed"))(rho=schedule, beta=0.5, gamma=0.5)``.

    Cost per step, with the caller's clean pass: one forward-backward on the batch, one
    forward and one forward-backward on :math:`\gamma B` examples. State: a key, counters.

    Args:
        rho: radius :math:`\rho \ge 0` (schedulable).
        beta: probability that a leaf (or weight) is perturbed, in (0, 1] (static).
        gamma: fraction of the batch the perturbed gradient is taken on, in (0, 1] (static).
        mask: ``"tensor"`` (one draw per leaf) or ``"element"`` (one per weight).
        seed: seed of the masks' PRNG key.
        adaptive, eta, eps, gc: as :func:`sam_jax.sam`.
    """
    sam_core.validate_sam(rho=rho, eps=eps, eta=eta, adaptive=adaptive)
    sam_core.check_bool("gc", gc)
    sam_core.validate_esam(beta=beta, gamma=gamma, mask=mask, seed=seed)
    beta = float(beta)
    gamma = float(gamma)

    def init_fn(params: optax.Params) -> ESAMState:
        fields = _init_fields(params)
        return ESAMState(
            key=jax.random.PRNGKey(seed),
            kept_fraction=fields["grad_norm"],
            **fields,
        )

    def update_fn(
        updates: optax.Updates,
        state: ESAMState,
        params: optax.Params | None = None,
        *,
        loss_fn: PerExampleLossFn | None = None,
        losses: Any = None,
        value: Any = None,
        masks: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ESAMState]:
        del extra_args
        _check_esam_call(params, loss_fn)
        p, g, treedef = _flatten_pair("esam", updates, params)
        g = _clean_gradient(g, gc)
        dtype = _state_dtype(p)
        key, draw_key = jax.random.split(state.key)
        if masks is None:
            m = jax.tree.leaves(esam_masks(draw_key, params, beta, mask))
        else:
            m = _mask_leaves(masks, treedef, p)
        m = [jnp.asarray(x).astype(jnp.asarray(y).dtype) for x, y in zip(m, g, strict=True)]
        point, norm = sam_core.esam_perturbed_params(
            _OPS, p, g, m, rho=rho, beta=beta, adaptive=adaptive, eta=eta, eps=eps
        )
        point_tree = jax.tree.unflatten(treedef, point)
        if losses is not None:
            losses = _per_example("losses", losses)
        clean_value = value
        if clean_value is None and losses is not None:
            clean_value = jnp.mean(losses)

        def mean_loss(q: Any, index: Any = None) -> jax.Array:
            out = loss_fn(q) if index is None else loss_fn(q, index)
            out = _per_example("loss_fn(params)" if index is None else "loss_fn(params, index)", out)
            return jnp.mean(out), out

        k = batch = None
        if gamma < 1.0:
            if losses is None:
                losses = _per_example("loss_fn(params)", loss_fn(params))
            batch = losses.shape[0]
            k = sam_core.sds_count(batch, gamma)
        if k == batch:  # gamma = 1 (or a batch too small to drop one): SAM's perturbed pass
            (perturbed_value, _), u_tree = jax.value_and_grad(mean_loss, has_aux=True)(point_tree)
        else:
            perturbed = jax.lax.stop_gradient(
                _per_example("loss_fn(params)", loss_fn(point_tree), size=batch)
            )
            perturbed_value = jnp.mean(perturbed)
            index = sam_core.sds_select(
                jax.lax.stop_gradient(losses), perturbed, k,
                top_k=lambda x, n: jax.lax.top_k(x, n)[1], sort=jnp.sort,
            )
            (_, chosen), u_tree = jax.value_and_grad(
                lambda q: mean_loss(q, index), has_aux=True
            )(point_tree)
            if chosen.shape != (k,):
                raise ValueError(
                    f"loss_fn(params, index) must return the losses of the {k} examples index "
                    f"selects, shape ({k},), got shape {chosen.shape}"
                )
        u = [
            jnp.asarray(x).astype(jnp.asarray(y).dtype)
            for x, y in zip(jax.tree.leaves(u_tree), g, strict=True)
        ]
        sizes = [jnp.size(x) for x in p]
        kept = sum(jnp.sum(jnp.broadcast_to(mi != 0, jnp.shape(x))) for mi, x in zip(m, p, strict=True))
        fields = _step_fields(
            state, norm, _scalar("loss", perturbed_value).astype(dtype), clean_value, dtype
        )
        new_state = ESAMState(
            key=key,
            kept_fraction=(jnp.asarray(kept, dtype) / max(sum(sizes), 1)).astype(dtype),
            **fields,
        )
        return jax.tree.unflatten(treedef, u), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_esam_call(params: Any, loss_fn: Any) -> None:
    if params is None:
        raise ValueError(
            "sam_jax.esam needs the parameters to perturb: call tx.update(grads, opt_state, "
            "params, loss_fn=...) with params, not params=None."
        )
    if loss_fn is None or not callable(loss_fn):
        raise TypeError(
            "sam_jax.esam needs loss_fn(params, index=None) returning the per-example losses "
            "(shape (B,), or (k,) for batch[index]): tx.update(grads, opt_state, params, "
            "loss_fn=loss_fn, losses=clean_per_example_losses); got "
            + ("none" if loss_fn is None else type(loss_fn).__name__)
        )


def _per_example(what: str, losses: Any, size: int | None = None) -> jax.Array:
    losses = jnp.asarray(losses)
    if losses.ndim != 1 or losses.shape[0] < 1:
        raise ValueError(
            f"sam_jax.esam: {what} must be the per-example losses, a 1-D array of shape (B,) "
            f"(no mean), got shape {losses.shape}"
        )
    if size is not None and losses.shape[0] != size:
        raise ValueError(
            f"sam_jax.esam: {what} returned {losses.shape[0]} per-example losses, expected "
            f"{size} (the same batch as the clean losses)"
        )
    return losses


def _mask_leaves(masks: Any, treedef: Any, p: list[Any]) -> list[Any]:
    leaves, mask_def = jax.tree.flatten(masks)
    if mask_def != treedef:
        raise ValueError(
            f"masks must have the structure of params ({treedef}), got {mask_def}"
        )
    for i, (x, w) in enumerate(zip(leaves, p, strict=True)):
        if jnp.ndim(x) != 0 and jnp.shape(x) != jnp.shape(w):
            raise ValueError(
                f"masks leaf {i} must be a scalar or have its parameter's shape "
                f"{jnp.shape(w)}, got {jnp.shape(x)}"
            )
    return leaves
