r"""The SAM family as Optax transformations that compose in ``optax.chain`` like ``sam``.

Every factory returns an :class:`optax.GradientTransformationExtraArgs` whose
``update(updates, state, params, *, grad_fn, **extra_args)`` takes the clean gradient as
``updates`` and a ``grad_fn(params) -> grads | (loss, grads)`` evaluated at the perturbed
point; it must be the **first** transformation of the chain, exactly as
:func:`sam_jax.sam`. The math is :mod:`sam_core`'s (``sam_core._variants``) through
:class:`~sam_jax.JaxOps`; everything is jit-safe (the full/cheap choice of LookSAM and
every-k SAM is a ``lax.cond`` under ``jit`` and a Python ``if`` outside it, so a cheap step
really runs one forward-backward pass and never calls ``grad_fn``).

================  ============================================  ======================
factory           what changes                                  grad_fn calls / step
================  ============================================  ======================
``gsam``          final gradient :math:`g_s - \alpha g_\perp`    1 (+ the clean pass)
``samon``         perturb only the masked (normalization) leaves 1 (+ the clean pass)
``wsam``          :math:`g` plus a weighted sharpness term       1 (+ the clean pass)
``friendly_sam``  ascent direction :math:`g - \sigma m`          1 (+ the clean pass)
``vasso``         ascent direction: moving average of g         1 (+ the clean pass)
``looksam``       full SAM every k steps, reuse :math:`g_v`      1/k (+ the clean pass)
``every_k_sam``   SAM every k steps, clean gradient otherwise    1/k (+ the clean pass)
``momentum_sam``  perturb against a momentum trace, no clean g   1 (no clean pass)
``ae_sam``        SAM only when the squared clean-gradient norm  SAM fraction (+ the
                  is high for its running statistics             clean pass)
================  ============================================  ======================

Every factory takes ``gc=False``: with ``gc=True`` the clean gradient is centralized
(:func:`sam_core.centralize`, gradient centralization as ``pytorch_optimizer``'s GCSAM)
before the perturbation is formed from it, as in :func:`sam_jax.sam`; LookSAM's reuse
steps and every-k SAM's plain steps form no perturbation and pass ``updates`` unchanged,
and ``momentum_sam``, which has no clean gradient, centralizes the trace direction it
perturbs along (the trace itself is left alone).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import sam_core

from ._grad_fn import MSharpnessStep, PerturbationProbe, call_grad_fn
from ._ops import JaxOps
from ._sam import _scalar, _split_grad_fn_output, _state_dtype

__all__ = [
    "AESAMState",
    "EveryKSAMState",
    "FriendlySAMState",
    "GSAMState",
    "LookSAMState",
    "MomentumSAMState",
    "SAMONState",
    "VaSSOState",
    "WSAMState",
    "ae_sam",
    "every_k_sam",
    "friendly_sam",
    "gsam",
    "looksam",
    "momentum_sam",
    "normalization_mask",
    "proportional_rho_schedule",
    "rho_warmup_schedule",
    "samon",
    "vasso",
    "wsam",
]

_OPS = JaxOps()
GradFn = Callable[[optax.Params], Any]


# -- states ----------------------------------------------------------------------------------
class GSAMState(NamedTuple):
    """State of :func:`gsam`.

    Attributes:
        count: number of updates so far (int32, saturating).
        grad_norm: the norm the last perturbation was scaled by (NaN before the first).
        value: the clean loss :math:`L(w)` passed as ``value=`` to ``update``, else NaN.
        perturbed_value: :math:`L(w + e)` when ``grad_fn`` returns the loss, else NaN.
        sharpness: ``perturbed_value - value`` (NaN unless both are known).
    """

    count: jax.Array
    grad_norm: jax.Array
    value: jax.Array
    perturbed_value: jax.Array
    sharpness: jax.Array


class SAMONState(NamedTuple):
    """State of :func:`samon`.

    Attributes:
        count: number of updates so far (int32, saturating).
        grad_norm: norm of the masked gradient the last perturbation was scaled by.
        value: the clean loss :math:`L(w)` passed as ``value=`` to ``update``, else NaN.
        perturbed_value: :math:`L(w + e)` when ``grad_fn`` returns the loss, else NaN.
        sharpness: ``perturbed_value - value`` (NaN unless both are known).
    """

    count: jax.Array
    grad_norm: jax.Array
    value: jax.Array
    perturbed_value: jax.Array
    sharpness: jax.Array


class FriendlySAMState(NamedTuple):
    r"""State of :func:`friendly_sam`.

    Attributes:
        count: number of updates so far (int32, saturating).
        grad_norm: :math:`\lVert d \rVert` (or :math:`\lVert T_w d \rVert`) of the last step.
        value: the clean loss :math:`L(w)` passed as ``value=`` to ``update``, else NaN.
        perturbed_value: :math:`L(w + e)` when ``grad_fn`` returns the loss, else NaN.
        sharpness: ``perturbed_value - value`` (NaN unless both are known).
        momentum: :math:`m`, the moving average of the clean gradients (like ``params``).
    """

    count: jax.Array
    grad_norm: jax.Array
    value: jax.Array
    perturbed_value: jax.Array
    sharpness: jax.Array
    momentum: optax.Updates


class LookSAMState(NamedTuple):
    r"""State of :func:`looksam`.

    Attributes:
        count: number of updates so far (int32, saturating); ``count % k == 0`` is full.
        grad_norm: the perturbation's norm on the last full step.
        value: the clean loss :math:`L(w)` passed as ``value=`` to ``update``, else NaN.
        perturbed_value: :math:`L(w + e)` of the last full step when known, else NaN
            (``grad_norm``, ``value`` and ``sharpness`` also describe the last full step).
        sharpness: ``perturbed_value - value`` (NaN unless both are known).
        g_v: the stored component of the SAM gradient orthogonal to the clean one.
        gv_norm: :math:`\lVert g_v \rVert`.
    """

    count: jax.Array
    grad_norm: jax.Array
    value: jax.Array
    perturbed_value: jax.Array
    sharpness: jax.Array
    g_v: optax.Updates
    gv_norm: jax.Array


class EveryKSAMState(NamedTuple):
    """State of :func:`every_k_sam`.

    Attributes:
        count: number of updates so far (int32, saturating); SAM runs when
            ``(count + 1) % k == 0``.
        grad_norm: the perturbation's norm on the last SAM step.
        value: the clean loss :math:`L(w)` passed as ``value=`` to ``update``, else NaN.
        perturbed_value: :math:`L(w + e)` of the last SAM step when known, else NaN
            (``grad_norm``, ``value`` and ``sharpness`` also describe the last SAM step).
        sharpness: ``perturbed_value - value`` (NaN unless both are known).
    """

    count: jax.Array
    grad_norm: jax.Array
    value: jax.Array
    perturbed_value: jax.Array
    sharpness: jax.Array


class MomentumSAMState(NamedTuple):
    r"""State of :func:`momentum_sam`.

    Attributes:
        count: number of updates so far (int32, saturating).
        grad_norm: :math:`\lVert v \rVert`, the momentum norm the last perturbation used.
        value: the clean loss :math:`L(w)` passed as ``value=`` to ``update``, else NaN.
        perturbed_value: :math:`L(w + e)` when ``grad_fn`` returns the loss, else NaN.
        sharpness: ``perturbed_value - value`` (NaN unless both are known).
        trace: :math:`v`, the momentum trace of the perturbed-point gradients.
    """

    count: jax.Array
    grad_norm: jax.Array
    value: jax.Array
    perturbed_value: jax.Array
    sharpness: jax.Array
    trace: optax.Updates


# -- helpers ---------------------------------------------------------------------------------
def _check_call(name: str, params: Any, grad_fn: Any) -> None:
    if params is None:
        raise ValueError(
            f"sam_jax.{name} needs the parameters to perturb: call "
            "tx.update(grads, opt_state, params, grad_fn=...) with params, not params=None."
        )
    if grad_fn is None:
        raise TypeError(
            f"sam_jax.{name} needs grad_fn, the gradient of the loss at the perturbed point: "
            "call tx.update(grads, opt_state, params, "
            "grad_fn=lambda p: jax.grad(loss_fn)(p, batch))."
        )
    if not callable(grad_fn):
        raise TypeError(f"grad_fn must be callable, got {type(grad_fn).__name__}")


def _flatten_pair(name: str, updates: Any, params: Any) -> tuple[list[Any], list[Any], Any]:
    p_leaves, treedef = jax.tree.flatten(params)
    g_leaves, g_treedef = jax.tree.flatten(updates)
    if g_treedef != treedef:
        raise ValueError(
            f"updates (the clean gradient) and params must have the same tree structure, got "
            f"updates {g_treedef} and params {treedef}. Is sam_jax.{name} the first "
            "transformation of the chain?"
        )
    return p_leaves, g_leaves, treedef


def _clean_gradient(g: list[Any], gc: bool) -> list[Any]:
    """The clean gradient the perturbation is formed from: centralized with ``gc=True``."""
    return sam_core.centralize(_OPS, g) if gc else g


def _evaluate(
    grad_fn: GradFn, treedef: Any, point: Sequence[Any], like: Sequence[Any], dtype: Any
) -> tuple[list[Any], jax.Array]:
    """``grad_fn`` at ``point``: gradient leaves cast to ``like``'s dtypes, and the loss/NaN."""
    point_tree = jax.tree.unflatten(treedef, list(point))
    value, grads = _split_grad_fn_output(
        call_grad_fn("the sam_jax transformation", grad_fn, point_tree), treedef
    )
    leaves = [
        jnp.asarray(x).astype(jnp.asarray(y).dtype)
        for x, y in zip(jax.tree.leaves(grads), like, strict=True)
    ]
    value = jnp.full((), jnp.nan, dtype) if value is None else _scalar("loss", value).astype(dtype)
    return leaves, value


def _check_k(k: Any) -> Any:
    """Validate ``k``; an integer array is accepted too (``optax.inject_hyperparams`` turns
    numeric defaults into arrays, traced under ``jit``): the full/cheap choice is a
    ``lax.cond`` on ``count % k``, which works with either."""
    if isinstance(k, jax.Array | jax.core.Tracer) and jnp.ndim(k) == 0:
        if not jnp.issubdtype(k.dtype, jnp.integer):
            raise TypeError(f"k must be an int >= 1, got an array of dtype {k.dtype}")
        try:
            value = int(k)
        except jax.errors.ConcretizationTypeError:  # traced: checked when it was concrete
            return k
        sam_core.validate_interval(k=value)
        return k
    sam_core.validate_interval(k=k)
    return k


def _branch(full_step: Any, predicate: Any, full: Callable, cheap: Callable) -> Any:
    """``full()`` or ``cheap()``: statically for a Python bool ``full_step``, else a
    ``lax.cond`` on ``predicate`` (only the branch taken runs).

    Outside ``jit`` the predicate is concrete and the branch is chosen in Python: ``lax.cond``
    would trace (and so call) ``grad_fn`` in the full branch on every step, which a caller
    counting its calls, or paying for them eagerly, would see on cheap steps too."""
    if full_step is None:
        if not isinstance(predicate, jax.core.Tracer):
            return full(None) if bool(predicate) else cheap(None)
        return jax.lax.cond(predicate, full, cheap, None)
    if not isinstance(full_step, bool):
        raise TypeError(
            "full_step must be a Python bool (a static choice: one jitted step function per "
            f"value) or None (the count-based schedule), got {type(full_step).__name__}"
        )
    return full(None) if full_step else cheap(None)


def _init_fields(params: optax.Params) -> dict[str, jax.Array]:
    """The fields every variant state starts with: a zero count and NaN figures."""
    nan = _nan(_state_dtype(jax.tree.leaves(params)))
    return {
        "count": jnp.zeros((), jnp.int32),
        "grad_norm": nan,
        "value": nan,
        "perturbed_value": nan,
        "sharpness": nan,
    }


def _step_fields(
    state: Any, grad_norm: Any, perturbed_value: jax.Array, value: Any, dtype: Any
) -> dict[str, jax.Array]:
    """The common fields after an update; ``value`` is the caller's ``value=`` (or None)."""
    clean = _nan(dtype) if value is None else _scalar("value", value).astype(dtype)
    return {
        "count": optax.safe_increment(state.count),
        "grad_norm": jnp.asarray(grad_norm).astype(dtype),
        "value": clean,
        "perturbed_value": perturbed_value,
        "sharpness": perturbed_value - clean,
    }


def _carried_fields(state: Any) -> dict[str, jax.Array]:
    """A cheap (one-pass) step's fields: the figures of the last full step, count + 1."""
    return {
        "count": optax.safe_increment(state.count),
        "grad_norm": state.grad_norm,
        "value": state.value,
        "perturbed_value": state.perturbed_value,
        "sharpness": state.sharpness,
    }


def _nan(dtype: Any) -> jax.Array:
    return jnp.full((), jnp.nan, dtype)


# -- GSAM ------------------------------------------------------------------------------------
def gsam(
    rho: float | jax.Array = 0.05,
    *,
    alpha: float | jax.Array = 0.2,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    eps: float | jax.Array = 1e-12,
    gc: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Surrogate Gap guided SAM (GSAM) as the first transformation of an Optax chain.

    With the clean gradient :math:`g` (``updates``) and :math:`g_s = \nabla L(w + e)`
    (``grad_fn`` at SAM's/ASAM's perturbed point), passes down the chain

    .. math::

        u = g_s - \alpha\, g_\perp, \qquad
        g_\perp = g - \frac{\langle g, g_s \rangle}{\lVert g_s \rVert^2} g_s

    (:func:`sam_core.gsam_gradient`). Schedule ``rho`` proportionally to the learning rate
    with ``optax.inject_hyperparams(sam_jax.gsam)(rho=proportional_rho_schedule(...))``.

    Reference: Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization",
    ICLR 2022 (official CIFAR example ``alpha=0.2``).

    Args:
        rho: radius :math:`\rho \ge 0` (schedulable).
        alpha: weight of :math:`g_\perp` in [0, 1]; 0 is SAM.
        adaptive: ASAM's neighbourhood (static).
        eta: ASAM's :math:`\eta \ge 0`.
        eps: :math:`\epsilon > 0` added to norms.
    """
    sam_core.validate_sam(rho=rho, eps=eps, eta=eta, adaptive=adaptive)
    sam_core.check_bool("gc", gc)
    sam_core.validate_gsam(alpha=alpha)

    def init_fn(params: optax.Params) -> GSAMState:
        return GSAMState(**_init_fields(params))

    def update_fn(
        updates: optax.Updates,
        state: GSAMState,
        params: optax.Params | None = None,
        *,
        grad_fn: GradFn | None = None,
        value: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, GSAMState]:
        del extra_args
        _check_call("gsam", params, grad_fn)
        p, g, treedef = _flatten_pair("gsam", updates, params)
        g = _clean_gradient(g, gc)
        dtype = _state_dtype(p)
        point, norm = sam_core.perturbed_params(
            _OPS, p, g, rho=rho, adaptive=adaptive, eta=eta, eps=eps
        )
        g_s, p_value = _evaluate(grad_fn, treedef, point, g, dtype)
        u = sam_core.gsam_gradient(_OPS, g, g_s, alpha=alpha, eps=eps)
        u = [x.astype(y.dtype) for x, y in zip(u, g, strict=True)]
        new_state = GSAMState(**_step_fields(state, norm, p_value, value, dtype))
        return jax.tree.unflatten(treedef, u), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def proportional_rho_schedule(
    lr_schedule: optax.Schedule | float,
    *,
    rho_max: float,
    rho_min: float,
    lr_max: float,
    lr_min: float = 0.0,
) -> optax.Schedule:
    r"""GSAM's :math:`\rho` schedule as an Optax schedule: :math:`\rho` follows the LR.

    .. math::

        \rho(t) = \rho_{min} + (\rho_{max} - \rho_{min})
                  \frac{\eta(t) - \eta_{min}}{\eta_{max} - \eta_{min}}

    (:func:`sam_core.proportional_rho`, the official ``ProportionScheduler``). Use it
    with ``optax.inject_hyperparams``; both counts start at 0 and advance once per update,
    so :math:`\rho` stays in step with the base optimizer's learning rate::

        lr = optax.cosine_decay_schedule(0.1, total_steps)
        tx = optax.chain(
            optax.inject_hyperparams(sam_jax.gsam)(
                rho=sam_jax.proportional_rho_schedule(lr, rho_max=0.1, rho_min=0.02, lr_max=0.1),
                alpha=0.2,
            ),
            optax.sgd(lr, momentum=0.9),
        )
    """
    sam_core.validate_proportional_rho(
        lr_max=lr_max, lr_min=lr_min, rho_max=rho_max, rho_min=rho_min
    )

    def schedule(count: Any) -> Any:
        lr = lr_schedule(count) if callable(lr_schedule) else lr_schedule
        return sam_core.proportional_rho(
            jnp.asarray(lr), lr_max=lr_max, lr_min=lr_min, rho_max=rho_max, rho_min=rho_min
        )

    return schedule


def rho_warmup_schedule(rho: float, warmup_steps: int) -> optax.Schedule:
    r"""Linear :math:`\rho` warm-up as an Optax schedule: :math:`\rho` ramps from 0 to
    ``rho`` over the first ``warmup_steps`` updates, then stays.

    .. math::

        \rho(t) = \rho \, \frac{\min(t, T)}{T}

    (:func:`sam_core.rho_warmup`; ``optax.linear_schedule(0, rho, T)``), the same ramp as
    :class:`sam_torch.RhoWarmup`. The first update's perturbation is zero. A large
    :math:`\rho` from the first step can send a fresh network to the constant predictor
    (the flattest point there is) before it learns anything; the ramp lets it fit features
    first. Use it with ``optax.inject_hyperparams``::

        tx = optax.chain(
            optax.inject_hyperparams(sam_jax.sam)(
                rho=sam_jax.rho_warmup_schedule(0.15, warmup_steps=5 * steps_per_epoch)
            ),
            optax.sgd(lr, momentum=0.9),
        )

    (``adaptive=True`` for ASAM goes in ``static_args``:
    ``optax.inject_hyperparams(sam_jax.sam, static_args=("adaptive",))``.)
    """
    sam_core.validate_rho_warmup(rho=rho, warmup_steps=warmup_steps)
    rho = float(rho)

    steps = float(warmup_steps)  # a Python float: no int32 overflow for long ramps

    def schedule(count: Any) -> Any:
        return sam_core.rho_warmup(
            jnp.asarray(count, jnp.result_type(float)), rho=rho, warmup_steps=steps,
            minimum=jnp.minimum,
        )

    return schedule


# -- WSAM ------------------------------------------------------------------------------------
class WSAMState(NamedTuple):
    """State of :func:`wsam`.

    Attributes:
        count: number of updates so far (int32, saturating).
        grad_norm: the norm the last perturbation was scaled by (NaN before the first).
        value: the clean loss :math:`L(w)` passed as ``value=`` to ``update``, else NaN.
        perturbed_value: :math:`L(w + e)` when ``grad_fn`` returns the loss, else NaN.
        sharpness: ``perturbed_value - value`` (NaN unless both are known).
        base_state: the wrapped base optimizer's state in the decoupled form, else ``()``.
    """

    count: jax.Array
    grad_norm: jax.Array
    value: jax.Array
    perturbed_value: jax.Array
    sharpness: jax.Array
    base_state: Any


def wsam(
    rho: float | jax.Array = 0.05,
    *,
    gamma: float | jax.Array = 0.88,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    eps: float | jax.Array = 1e-12,
    gc: bool = False,
    base: optax.GradientTransformation | None = None,
    learning_rate: optax.ScalarOrSchedule | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Weighted SAM (WSAM): sharpness as a weighted regularization term.

    WSAM minimizes :math:`L(w) + \alpha\,[L(w + e) - L(w)]`,
    :math:`\alpha = \gamma / (1 - \gamma)`, :math:`e` SAM's (or ASAM's). Two forms:

    * coupled (``base`` and ``learning_rate`` left out): the first transformation of a
      chain, passing :math:`(1 - \alpha) g + \alpha g_s` down it
      (:func:`sam_core.wsam_gradient`);
    * decoupled (the official default; give the base optimizer and its learning rate):
      the returned transformation *is* the optimizer: it runs ``base`` on :math:`g` and
      adds :math:`-\eta_{lr}(t)\,\alpha\,(g_s - g)` to its updates
      (:func:`sam_core.wsam_sharpness`), as ``sam_torch.WSAM(decouple=True)`` does::

          lr = optax.cosine_decay_schedule(0.1, steps)
          tx = sam_jax.wsam(0.05, gamma=0.88, learning_rate=lr,
                            base=optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(lr, 0.9)))

    Reference: Yue et al., "Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
    Regularization Term", KDD 2023 (official default ``gamma=0.88``).
    """
    sam_core.validate_sam(rho=rho, eps=eps, eta=eta, adaptive=adaptive)
    sam_core.check_bool("gc", gc)
    sam_core.validate_wsam(gamma=gamma)
    if (base is None) != (learning_rate is None):
        raise ValueError(
            "wsam's decoupled form needs both base (the optimizer, e.g. optax.sgd(lr, 0.9)) and "
            "learning_rate (its learning rate or schedule); pass both, or neither for the "
            "coupled form placed first in an optax.chain"
        )
    decoupled = base is not None

    def init_fn(params: optax.Params) -> WSAMState:
        base_state = base.init(params) if decoupled else ()
        return WSAMState(**_init_fields(params), base_state=base_state)

    def update_fn(
        updates: optax.Updates,
        state: WSAMState,
        params: optax.Params | None = None,
        *,
        grad_fn: GradFn | None = None,
        value: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, WSAMState]:
        _check_call("wsam", params, grad_fn)
        p, g, treedef = _flatten_pair("wsam", updates, params)
        g = _clean_gradient(g, gc)
        dtype = _state_dtype(p)
        point, norm = sam_core.perturbed_params(
            _OPS, p, g, rho=rho, adaptive=adaptive, eta=eta, eps=eps
        )
        g_s, p_value = _evaluate(grad_fn, treedef, point, g, dtype)
        base_state = state.base_state
        if decoupled:
            if value is not None:
                extra_args = {**extra_args, "value": value}
            base_updates, base_state = base.update(
                jax.tree.unflatten(treedef, g), base_state, params, **extra_args
            )
            lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
            sharp = sam_core.wsam_sharpness(_OPS, g, g_s)
            scale = -jnp.asarray(lr, dtype) * sam_core.wsam_weight(jnp.asarray(gamma, dtype))
            u = sam_core.apply_perturbation(_OPS, jax.tree.leaves(base_updates), sharp, scale)
        else:
            u = sam_core.wsam_gradient(_OPS, g, g_s, gamma=gamma)
        u = [x.astype(y.dtype) for x, y in zip(u, g, strict=True)]
        new_state = WSAMState(
            **_step_fields(state, norm, p_value, value, dtype), base_state=base_state
        )
        return jax.tree.unflatten(treedef, u), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# -- SAM-ON ----------------------------------------------------------------------------------
_NORM_NAME = re.compile(r"(BatchNorm|LayerNorm|GroupNorm|RMSNorm)_\d+")


def _path_names(path: Sequence[Any]) -> tuple[str, ...]:
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
        else:
            names.append(str(entry))
    return tuple(names)


def normalization_mask(
    params: optax.Params,
    predicate: Callable[[tuple[str, ...], Any], bool] | None = None,
) -> Any:
    """A tree of Python bools like ``params``: True on normalization-layer leaves (SAM-ON).

    By default a leaf is selected when a module on its path has a Flax linen
    auto-generated normalization name: ``BatchNorm_<i>``, ``LayerNorm_<i>``,
    ``GroupNorm_<i>`` or ``RMSNorm_<i>``. For named modules pass ``predicate(path, leaf)``,
    where ``path`` is the tuple of the leaf's key names (e.g.
    ``("params", "block1", "bn", "scale")``), returning True for leaves to perturb, e.g.
    ``lambda path, _: any(n.startswith("bn") for n in path)``.
    """
    if predicate is None:

        def predicate(path: tuple[str, ...], leaf: Any) -> bool:
            return any(_NORM_NAME.fullmatch(name) for name in path)

    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: bool(predicate(_path_names(path), leaf)), params
    )


def samon(
    rho: float | jax.Array = 0.05,
    *,
    mask: Any = normalization_mask,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    eps: float | jax.Array = 1e-12,
    gc: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""SAM-ON: (A)SAM perturbing only the normalization layers' parameters.

    .. math::

        e_N = \rho \frac{T_N^2 g_N}{\lVert T_N g_N \rVert + \epsilon}, \qquad e_{\bar N} = 0

    (the SAM/ASAM functions of :mod:`sam_core` on the masked leaves only, norm included);
    every parameter then receives :math:`\nabla L(w + e)`. Reference: Mueller et al.,
    "Normalization Layers Are All That Sharpness-Aware Minimization Needs", NeurIPS 2023.

    Args:
        rho: radius :math:`\rho \ge 0` (the paper tunes it larger than for SAM).
        mask: a tree of Python bools like ``params`` (True = perturb), or a callable
            ``mask(params)`` returning one; by default :func:`normalization_mask`.
        adaptive, eta, eps: as :func:`sam_jax.sam`.
    """
    sam_core.validate_sam(rho=rho, eps=eps, eta=eta, adaptive=adaptive)
    sam_core.check_bool("gc", gc)

    def init_fn(params: optax.Params) -> SAMONState:
        return SAMONState(**_init_fields(params))

    def update_fn(
        updates: optax.Updates,
        state: SAMONState,
        params: optax.Params | None = None,
        *,
        grad_fn: GradFn | None = None,
        value: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SAMONState]:
        del extra_args
        _check_call("samon", params, grad_fn)
        p, g, treedef = _flatten_pair("samon", updates, params)
        g = _clean_gradient(g, gc)
        tree = mask(params) if callable(mask) else mask
        flags, mask_def = jax.tree.flatten(tree)
        if mask_def != treedef:
            raise ValueError(
                f"mask must have the structure of params, got {mask_def} for params {treedef}; "
                "build it with sam_jax.normalization_mask(params)"
            )
        chosen = [i for i, f in enumerate(flags) if bool(f)]
        if not chosen:
            raise ValueError(
                "the SAM-ON mask selects no parameter (no BatchNorm_*/LayerNorm_*/GroupNorm_*/"
                "RMSNorm_* module found); pass mask=normalization_mask with a predicate that "
                "matches your normalization layers' names"
            )
        dtype = _state_dtype(p)

        def perturb(p: list[Any], g: list[Any]) -> tuple[list[Any], Any]:
            moved, norm = sam_core.perturbed_params(
                _OPS,
                [p[i] for i in chosen],
                [g[i] for i in chosen],
                rho=rho,
                adaptive=adaptive,
                eta=eta,
                eps=eps,
            )
            point = list(p)
            for i, x in zip(chosen, moved, strict=True):
                point[i] = x
            return point, norm

        if isinstance(grad_fn, PerturbationProbe):  # m_sharpness_update asks for the rule
            grad_fn.found(perturb, params, updates, (rho, eta, eps))
        if isinstance(grad_fn, MSharpnessStep):  # updates is m-sharpness' G already
            g_s, norm, value = g, grad_fn.grad_norm, grad_fn.value
            p_value = _scalar("loss", grad_fn.perturbed_value).astype(dtype)
        else:
            point, norm = perturb(p, g)
            g_s, p_value = _evaluate(grad_fn, treedef, point, g, dtype)
        new_state = SAMONState(**_step_fields(state, norm, p_value, value, dtype))
        return jax.tree.unflatten(treedef, g_s), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# -- FriendlySAM -----------------------------------------------------------------------------
def friendly_sam(
    rho: float | jax.Array = 0.05,
    *,
    sigma: float | jax.Array = 1.0,
    lmbda: float | jax.Array = 0.9,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    eps: float | jax.Array = 1e-12,
    gc: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""FriendlySAM: perturb along the gradient minus its moving average.

    .. math::

        d = g - \sigma m, \qquad m \leftarrow \lambda m + (1 - \lambda) g, \qquad
        e = \rho \frac{T_w^2 d}{\lVert T_w d \rVert + \epsilon},

    :math:`m` taken before the current gradient is folded in and initialized to the first
    gradient (:math:`d = g` on the first step), as in the official code. Reference: Li et
    al., "Friendly Sharpness-Aware Minimization", CVPR 2024 (defaults ``sigma=1``,
    ``lmbda=0.9``).
    """
    sam_core.validate_sam(rho=rho, eps=eps, eta=eta, adaptive=adaptive)
    sam_core.check_bool("gc", gc)
    sam_core.validate_friendly_sam(sigma=sigma, lmbda=lmbda)

    def init_fn(params: optax.Params) -> FriendlySAMState:
        return FriendlySAMState(
            **_init_fields(params), momentum=jax.tree.map(jnp.zeros_like, params)
        )

    def update_fn(
        updates: optax.Updates,
        state: FriendlySAMState,
        params: optax.Params | None = None,
        *,
        grad_fn: GradFn | None = None,
        value: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, FriendlySAMState]:
        del extra_args
        _check_call("friendly_sam", params, grad_fn)
        p, g, treedef = _flatten_pair("friendly_sam", updates, params)
        g = _clean_gradient(g, gc)
        dtype = _state_dtype(p)
        m = jax.tree.leaves(state.momentum)
        first = state.count == 0
        # First step: no average yet, so d = g and m = g (sigma and lambda act as 0).
        sigma_t = jnp.where(
            first, jnp.zeros_like(jnp.asarray(sigma, dtype)), jnp.asarray(sigma, dtype)
        )
        lmbda_t = jnp.where(
            first, jnp.zeros_like(jnp.asarray(lmbda, dtype)), jnp.asarray(lmbda, dtype)
        )
        d = sam_core.friendly_direction(_OPS, g, m, sigma=sigma_t)
        m_new = sam_core.ema_update(_OPS, m, g, lmbda_t)
        point, norm = sam_core.perturbed_params(
            _OPS, p, d, rho=rho, adaptive=adaptive, eta=eta, eps=eps
        )
        g_s, p_value = _evaluate(grad_fn, treedef, point, g, dtype)
        m_new = [x.astype(y.dtype) for x, y in zip(m_new, m, strict=True)]
        new_state = FriendlySAMState(
            **_step_fields(state, norm, p_value, value, dtype),
            momentum=jax.tree.unflatten(jax.tree.structure(state.momentum), m_new),
        )
        return jax.tree.unflatten(treedef, g_s), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# -- VaSSO -----------------------------------------------------------------------------------
class VaSSOState(NamedTuple):
    r"""State of :func:`vasso`.

    Attributes:
        count: number of updates so far (int32, saturating).
        grad_norm: :math:`\lVert m \rVert` (or :math:`\lVert T_w m \rVert`) of the last step.
        value: the clean loss :math:`L(w)` passed as ``value=`` to ``update``, else NaN.
        perturbed_value: :math:`L(w + e)` when ``grad_fn`` returns the loss, else NaN.
        sharpness: ``perturbed_value - value`` (NaN unless both are known).
        average: :math:`m`, the moving average of the clean gradients (like ``params``).
    """

    count: jax.Array
    grad_norm: jax.Array
    value: jax.Array
    perturbed_value: jax.Array
    sharpness: jax.Array
    average: optax.Updates


def vasso(
    rho: float | jax.Array = 0.05,
    *,
    theta: float | jax.Array = 0.9,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    eps: float | jax.Array = 1e-12,
    gc: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""VaSSO: perturb along a moving average of the clean gradients.

    .. math::

        m \leftarrow (1 - \theta)\, m + \theta\, g, \qquad
        e = \rho \frac{T_w^2 m}{\lVert T_w m \rVert + \epsilon},

    :math:`m` starting as the first gradient (:func:`sam_core.vasso_direction`).
    Reference: Li and Giannakis, "Enhancing Sharpness-Aware Optimization Through Variance
    Suppression", NeurIPS 2023 (official default ``theta=0.9``).
    """
    sam_core.validate_sam(rho=rho, eps=eps, eta=eta, adaptive=adaptive)
    sam_core.check_bool("gc", gc)
    sam_core.validate_vasso(theta=theta)

    def init_fn(params: optax.Params) -> VaSSOState:
        return VaSSOState(**_init_fields(params), average=jax.tree.map(jnp.zeros_like, params))

    def update_fn(
        updates: optax.Updates,
        state: VaSSOState,
        params: optax.Params | None = None,
        *,
        grad_fn: GradFn | None = None,
        value: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, VaSSOState]:
        del extra_args
        _check_call("vasso", params, grad_fn)
        p, g, treedef = _flatten_pair("vasso", updates, params)
        g = _clean_gradient(g, gc)
        dtype = _state_dtype(p)
        m = jax.tree.leaves(state.average)
        # First step: m = g (theta acts as 1).
        theta_t = jnp.where(state.count == 0, jnp.ones((), dtype), jnp.asarray(theta, dtype))
        d = sam_core.vasso_direction(_OPS, g, m, theta=theta_t)
        point, norm = sam_core.perturbed_params(
            _OPS, p, d, rho=rho, adaptive=adaptive, eta=eta, eps=eps
        )
        g_s, p_value = _evaluate(grad_fn, treedef, point, g, dtype)
        d = [x.astype(y.dtype) for x, y in zip(d, m, strict=True)]
        new_state = VaSSOState(
            **_step_fields(state, norm, p_value, value, dtype),
            average=jax.tree.unflatten(jax.tree.structure(state.average), d),
        )
        return jax.tree.unflatten(treedef, g_s), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# -- LookSAM and every-k SAM -------------------------------------------------------------------
def looksam(
    rho: float | jax.Array = 0.05,
    *,
    k: int = 5,
    alpha: float | jax.Array = 0.7,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    eps: float | jax.Array = 1e-12,
    gc: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""LookSAM: a full SAM step every ``k`` updates, the stored direction reused between.

    On updates with ``count % k == 0`` (the first included): SAM's gradient
    :math:`g_s` is passed down the chain and :math:`g_v`, its component orthogonal to the
    clean gradient :math:`g`, is stored. Otherwise ``grad_fn`` is **not** called and

    .. math::

        u = g + \alpha \frac{\lVert g \rVert}{\lVert g_v \rVert} g_v,
        \qquad g_v = g_s - \frac{\langle g_s, g \rangle}{\lVert g \rVert^2} g

    (:func:`sam_core.looksam_direction`, :func:`sam_core.looksam_gradient`). The branch is
    a ``jax.lax.cond``, so under ``jit`` a reuse step costs one forward-backward pass (the
    caller's clean one); outside ``jit`` it is a Python ``if`` and ``grad_fn`` is not even
    traced on reuse steps. Reference: Liu et al., "Towards Efficient and Scalable
    Sharpness-Aware Minimization", CVPR 2022 (``k=5``, ``alpha=0.7``).

    ``update`` also takes ``full_step``: a Python bool that chooses the branch statically
    instead (``full_step = step % k == 0`` from a Python step counter, with one jitted train
    step per value). Use it on CPU, where XLA runs convolutions inside a ``lax.cond``
    through a slow path (measured 20-30x slower here; jax-ml/jax#12868), which makes the
    ``lax.cond`` version slower than SAM.
    """
    sam_core.validate_sam(rho=rho, eps=eps, eta=eta, adaptive=adaptive)
    sam_core.check_bool("gc", gc)
    k = _check_k(k)
    sam_core.check_unit_interval("alpha", alpha)

    def init_fn(params: optax.Params) -> LookSAMState:
        dtype = _state_dtype(jax.tree.leaves(params))
        return LookSAMState(
            **_init_fields(params),
            g_v=jax.tree.map(jnp.zeros_like, params),
            gv_norm=jnp.zeros((), dtype),
        )

    def update_fn(
        updates: optax.Updates,
        state: LookSAMState,
        params: optax.Params | None = None,
        *,
        grad_fn: GradFn | None = None,
        full_step: bool | None = None,
        value: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, LookSAMState]:
        del extra_args
        _check_call("looksam", params, grad_fn)
        p, g, treedef = _flatten_pair("looksam", updates, params)
        dtype = _state_dtype(p)
        g_v_old = jax.tree.leaves(state.g_v)

        def full(_: Any) -> tuple[Any, ...]:
            g_c = _clean_gradient(g, gc)  # reuse steps form no perturbation: g as it is
            point, norm = sam_core.perturbed_params(
                _OPS, p, g_c, rho=rho, adaptive=adaptive, eta=eta, eps=eps
            )
            g_s, p_value = _evaluate(grad_fn, treedef, point, g, dtype)
            g_v, gv_norm = sam_core.looksam_direction(_OPS, g_c, g_s, eps=eps)
            g_v = [x.astype(y.dtype) for x, y in zip(g_v, g_v_old, strict=True)]
            fields = _step_fields(state, norm, p_value, value, dtype)
            return g_s, g_v, jnp.asarray(gv_norm).astype(dtype), fields

        def reuse(_: Any) -> tuple[Any, ...]:
            u = sam_core.looksam_gradient(
                _OPS, g, g_v_old, alpha=alpha, gv_norm=state.gv_norm, eps=eps
            )
            u = [x.astype(y.dtype) for x, y in zip(u, g, strict=True)]
            return u, list(g_v_old), state.gv_norm, _carried_fields(state)

        u, g_v, gv_norm, fields = _branch(full_step, state.count % k == 0, full, reuse)
        new_state = LookSAMState(
            **fields, g_v=jax.tree.unflatten(jax.tree.structure(state.g_v), g_v), gv_norm=gv_norm
        )
        return jax.tree.unflatten(treedef, u), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def every_k_sam(
    rho: float | jax.Array = 0.05,
    *,
    k: int = 5,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    eps: float | jax.Array = 1e-12,
    gc: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""SAM on one update in ``k``, the clean gradient passed through otherwise.

    As MosaicML Composer's ``SAM(interval=k)``: updates with ``(count + 1) % k == 0`` pass
    :math:`\nabla L(w + e)` with SAM's (or ASAM's) :math:`e` and the same ``rho`` (Composer
    does not rescale it); the others pass ``updates`` unchanged without calling
    ``grad_fn`` (a ``jax.lax.cond``). ``k=1`` is :func:`sam_jax.sam`. As for
    :func:`looksam`, ``update(..., full_step=True/False)`` chooses statically instead
    (``full_step = (step + 1) % k == 0``), which is the fast form on CPU.
    """
    sam_core.validate_sam(rho=rho, eps=eps, eta=eta, adaptive=adaptive)
    sam_core.check_bool("gc", gc)
    k = _check_k(k)

    def init_fn(params: optax.Params) -> EveryKSAMState:
        return EveryKSAMState(**_init_fields(params))

    def update_fn(
        updates: optax.Updates,
        state: EveryKSAMState,
        params: optax.Params | None = None,
        *,
        grad_fn: GradFn | None = None,
        full_step: bool | None = None,
        value: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, EveryKSAMState]:
        del extra_args
        _check_call("every_k_sam", params, grad_fn)
        p, g, treedef = _flatten_pair("every_k_sam", updates, params)
        dtype = _state_dtype(p)

        def full(_: Any) -> tuple[Any, ...]:
            point, norm = sam_core.perturbed_params(
                _OPS, p, _clean_gradient(g, gc), rho=rho, adaptive=adaptive, eta=eta, eps=eps
            )
            g_s, p_value = _evaluate(grad_fn, treedef, point, g, dtype)
            return g_s, _step_fields(state, norm, p_value, value, dtype)

        def plain(_: Any) -> tuple[Any, ...]:
            return list(g), _carried_fields(state)

        u, fields = _branch(full_step, (state.count + 1) % k == 0, full, plain)
        new_state = EveryKSAMState(**fields)
        return jax.tree.unflatten(treedef, u), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# -- Momentum-SAM ----------------------------------------------------------------------------
def momentum_sam(
    rho: float | jax.Array = 0.3,
    *,
    momentum: float | jax.Array = 0.9,
    eps: float | jax.Array = 1e-12,
    gc: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Momentum-SAM (MSAM): one gradient per step, taken against the momentum direction.

    .. math::

        e = -\rho \frac{v}{\lVert v \rVert + \epsilon}, \qquad u = \nabla L(w + e), \qquad
        v \leftarrow \mu v + u

    (:func:`sam_core.momentum_sam_scale`). :math:`v` is this transformation's own trace of
    the gradients it passes on (``optax.trace``'s recurrence, starting from 0, so the first
    step is unperturbed); use the base optimizer's momentum as :math:`\mu` (for
    ``optax.sgd(lr, momentum=mu)`` it equals that optimizer's trace, which a transformation
    cannot read from further down the chain). The clean gradient is **not** needed:
    ``updates`` is ignored (pass ``None``) and ``grad_fn`` is called once, so a step costs
    one forward-backward pass::

        tx = optax.chain(sam_jax.momentum_sam(0.3, momentum=0.9), optax.sgd(0.1, momentum=0.9))
        updates, state = tx.update(None, state, params, grad_fn=jax.grad(loss_at_batch))

    Reference: Becker, Altrichter, Noroozi, "Momentum-SAM: Sharpness Aware Minimization
    without Computational Overhead", 2024 (official SGD default ``rho=0.3``).

    Args:
        rho: length of the perturbation, :math:`\rho \ge 0`.
        momentum: :math:`\mu` of the trace, in [0, 1).
        eps: :math:`\epsilon > 0` added to the momentum norm.
    """
    sam_core.validate_sam(rho=rho, eps=eps, eta=0.0, adaptive=False)
    sam_core.check_bool("gc", gc)
    sam_core.check_unit_interval("momentum", momentum, closed_right=False)

    def init_fn(params: optax.Params) -> MomentumSAMState:
        return MomentumSAMState(**_init_fields(params), trace=jax.tree.map(jnp.zeros_like, params))

    def update_fn(
        updates: optax.Updates | None,
        state: MomentumSAMState,
        params: optax.Params | None = None,
        *,
        grad_fn: GradFn | None = None,
        value: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, MomentumSAMState]:
        del updates, extra_args
        _check_call("momentum_sam", params, grad_fn)
        p, treedef = jax.tree.flatten(params)
        dtype = _state_dtype(p)
        v = jax.tree.leaves(state.trace)
        direction = _clean_gradient(v, gc)  # no clean gradient: gc centralizes the direction
        norm = sam_core.global_norm(_OPS, direction)
        scale = sam_core.momentum_sam_scale(rho, norm, eps)
        point = sam_core.apply_perturbation(_OPS, p, direction, scale)
        g_s, p_value = _evaluate(grad_fn, treedef, point, p, dtype)
        trace = sam_core.apply_perturbation(_OPS, g_s, v, momentum)  # u + mu v
        trace = [x.astype(y.dtype) for x, y in zip(trace, v, strict=True)]
        new_state = MomentumSAMState(
            **_step_fields(state, norm, p_value, value, dtype),
            trace=jax.tree.unflatten(jax.tree.structure(state.trace), trace),
        )
        return jax.tree.unflatten(treedef, g_s), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# -- AE-SAM ------------------------------------------------------------------------------------
class AESAMState(NamedTuple):
    r"""State of :func:`ae_sam`.

    Attributes:
        count: number of updates so far (int32, saturating): :math:`t` of the schedule.
        grad_norm: the perturbation's norm on the last SAM step.
        value: the clean loss :math:`L(w)` passed as ``value=`` to ``update``, else NaN.
        perturbed_value: :math:`L(w + e)` of the last SAM step when known, else NaN
            (``grad_norm``, ``value`` and ``sharpness`` also describe the last SAM step).
        sharpness: ``perturbed_value - value`` (NaN unless both are known).
        sq_norm_mean: :math:`\mu_t`, the running mean of :math:`\lVert g_t \rVert^2`.
        sq_norm_var: :math:`\sigma_t^2`, its running variance.
        sq_grad_norm: :math:`\lVert g_t \rVert^2` of the last update (NaN before one).
        is_sam_step: whether the last update was a SAM step (``grad_fn`` called).
        sam_count: number of SAM steps so far (int32): a run's passes are
            ``count + sam_count``.
    """

    count: jax.Array
    grad_norm: jax.Array
    value: jax.Array
    perturbed_value: jax.Array
    sharpness: jax.Array
    sq_norm_mean: jax.Array
    sq_norm_var: jax.Array
    sq_grad_norm: jax.Array
    is_sam_step: jax.Array
    sam_count: jax.Array


def ae_sam(
    rho: float | jax.Array = 0.05,
    *,
    delta: float = 0.9,
    c_start: float = 1.0,
    c_end: float = -1.0,
    total_steps: int | None = None,
    adaptive: bool = False,
    eta: float | jax.Array = 0.01,
    eps: float | jax.Array = 1e-12,
    gc: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""AE-SAM: SAM's gradient only where the squared clean-gradient norm is large.

    Each update folds :math:`x_t = \lVert g_t \rVert^2` (``updates``, the clean gradient)
    into exponential moving statistics and passes :math:`\nabla L(w + e)` (SAM's, or
    ASAM's with ``adaptive=True``) when it exceeds their mean by :math:`c_t` standard
    deviations, ``updates`` unchanged otherwise:

    .. math::

        \mu_t = \delta \mu_{t-1} + (1 - \delta) x_t, \qquad
        \sigma_t^2 = \delta \sigma_{t-1}^2 + (1 - \delta) (x_t - \mu_t)^2, \qquad
        \text{SAM step} \iff x_t \ge \mu_t + c_t \sigma_t,

    from :math:`\mu_{-1} = \sigma_{-1}^2 = 0`, with
    :math:`c_t = \frac{t'}{T} \lambda_1 + (1 - \frac{t'}{T}) \lambda_2`,
    :math:`t' = \min(t, T)`, :math:`\lambda_2` = ``c_start``, :math:`\lambda_1` = ``c_end``,
    :math:`T` = ``total_steps`` (``None``: :math:`c_t = (c_{start} + c_{end}) / 2`
    throughout). Under the paper's normal model step :math:`t` is a SAM step with
    probability :math:`1 - \Phi(c_t)` (half the steps over a run with the defaults); while
    :math:`\mu_t` warms up from 0 (about :math:`1 / (1 - \delta)` steps) most steps are SAM
    steps. The rule is :mod:`sam_core`'s (:func:`sam_core.ae_sam_statistics`,
    :func:`sam_core.ae_sam_threshold`, :func:`sam_core.ae_sam_is_sam_step`) and
    :class:`sam_torch.AESAM` follows the same trajectory. A non-finite :math:`x_t` leaves
    the statistics unchanged and passes ``updates`` through. Reference: Jiang, Yang, Zhang
    and Kwok, "An Adaptive Policy to Employ Sharpness-Aware Minimization", ICLR 2023
    (Algorithm 1; ``delta=0.9``, ``c_start=1``, ``c_end=-1`` as we take them from its
    experimental setup).

    ``grad_fn`` is called only on SAM steps: under ``jit`` the branch is a
    ``jax.lax.cond`` on the decision (a data-dependent one, so it cannot be chosen on the
    host before the clean gradient exists), outside ``jit`` a Python ``if``. Cost:
    :math:`1 + f` forward-backward passes per step, :math:`f` the fraction of SAM steps
    (``state.sam_count / state.count``). On XLA:CPU a ``lax.cond`` around convolutions runs
    them through a slow path (measured 20-30x for :func:`looksam`'s; jax-ml/jax#12868), so
    there a convolutional model's SAM steps cost more than :func:`sam_jax.sam`'s; dense
    models are not affected. Extra state: four scalars.

    ``update(..., full_step=True/False)`` takes the branch statically instead (one jitted
    update per value, no ``lax.cond``), for a loop that reads the rule's decision on the
    host first: e.g. a jitted update with a ``grad_fn`` that evaluates nothing (its
    ``lax.cond`` holds no model) gives ``state.is_sam_step``; on a plain step its result is
    the step, on a SAM step the loop repeats the update from the same state with
    ``full_step=True`` and the real ``grad_fn`` (``examples/train_jax.py``). The statistics
    are updated as usual; ``is_sam_step`` and ``sam_count`` record the branch taken.
    """
    sam_core.validate_sam(rho=rho, eps=eps, eta=eta, adaptive=adaptive)
    sam_core.check_bool("gc", gc)
    sam_core.validate_ae_sam(delta=delta, c_start=c_start, c_end=c_end, total_steps=total_steps)

    def init_fn(params: optax.Params) -> AESAMState:
        dtype = _state_dtype(jax.tree.leaves(params))
        return AESAMState(
            **_init_fields(params),
            sq_norm_mean=jnp.zeros((), dtype),
            sq_norm_var=jnp.zeros((), dtype),
            sq_grad_norm=_nan(dtype),
            is_sam_step=jnp.zeros((), jnp.bool_),
            sam_count=jnp.zeros((), jnp.int32),
        )

    def update_fn(
        updates: optax.Updates,
        state: AESAMState,
        params: optax.Params | None = None,
        *,
        grad_fn: GradFn | None = None,
        value: Any = None,
        full_step: bool | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, AESAMState]:
        del extra_args
        _check_call("ae_sam", params, grad_fn)
        p, g, treedef = _flatten_pair("ae_sam", updates, params)
        dtype = _state_dtype(p)
        sq = jnp.asarray(_OPS.sum_of_squares(g)).astype(dtype) if g else jnp.zeros((), dtype)
        finite = jnp.isfinite(sq)
        c = sam_core.ae_sam_threshold(
            state.count.astype(dtype), total_steps=total_steps, c_start=c_start, c_end=c_end,
            minimum=jnp.minimum,
        )
        mean, var = sam_core.ae_sam_statistics(
            sq, state.sq_norm_mean, state.sq_norm_var, delta=delta
        )
        mean = jnp.where(finite, mean, state.sq_norm_mean)
        var = jnp.where(finite, var, state.sq_norm_var)
        is_sam = finite & sam_core.ae_sam_is_sam_step(sq, mean, var, c, sqrt=jnp.sqrt)
        if isinstance(full_step, bool):  # the host's choice (other values: _branch raises)
            is_sam = jnp.asarray(full_step)

        def full(_: Any) -> tuple[Any, ...]:
            point, norm = sam_core.perturbed_params(
                _OPS, p, _clean_gradient(g, gc), rho=rho, adaptive=adaptive, eta=eta, eps=eps
            )
            g_s, p_value = _evaluate(grad_fn, treedef, point, g, dtype)
            return g_s, _step_fields(state, norm, p_value, value, dtype)

        def plain(_: Any) -> tuple[Any, ...]:
            return list(g), _carried_fields(state)

        u, fields = _branch(full_step, is_sam, full, plain)
        new_state = AESAMState(
            **fields,
            sq_norm_mean=mean.astype(dtype),
            sq_norm_var=var.astype(dtype),
            sq_grad_norm=sq,
            is_sam_step=jnp.asarray(is_sam),
            sam_count=state.sam_count + jnp.asarray(is_sam).astype(jnp.int32),
        )
        return jax.tree.unflatten(treedef, u), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
