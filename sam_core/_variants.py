r"""The SAM family's math, written once against :class:`~sam_core.ArrayListOps`.

A SAM-family step has two independent parts, and each variant changes one of them:

*How the perturbation is chosen* (the ascent direction :math:`d`, then
:math:`e = \rho\, d / (\lVert d \rVert + \epsilon)` as in :mod:`sam_core._math`):

* SAM / ASAM: :math:`d = g` or :math:`T_w^2 g` (:func:`~sam_core.direction_and_sq_norm`).
* SAM-ON (Mueller et al., "Normalization Layers Are All That Sharpness-Aware Minimization
  Needs", NeurIPS 2023): the same, restricted to the normalization layers' parameters;
  the norm is taken over those parameters only. No new formula: a backend passes the
  masked sub-list to the SAM functions.
* FriendlySAM (Li et al., "Friendly Sharpness-Aware Minimization", CVPR 2024):
  :math:`d = g - \sigma m` with :math:`m` an exponential moving average of the clean
  gradients (:func:`friendly_direction`, :func:`ema_update`).
* VaSSO (Li and Giannakis, NeurIPS 2023): :math:`d` = a moving average of the clean
  gradients (:func:`vasso_direction`).
* Momentum-SAM (Becker et al., "Momentum-SAM: Sharpness Aware Minimization without
  Computational Overhead", 2024): :math:`e = -\rho\, v / \lVert v \rVert` along the base
  optimizer's momentum :math:`v`, no clean gradient needed (:func:`momentum_sam_scale`).

*How the final gradient is formed* from the clean gradient :math:`g = \nabla L(w)` and the
perturbed one :math:`g_s = \nabla L(w + e)`:

* plain: :math:`g_s`.
* GSAM (Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization", ICLR 2022):
  :math:`g_s - \alpha\, g_\perp`, :math:`g_\perp` the component of :math:`g` orthogonal
  to :math:`g_s` (:func:`gsam_gradient`).
* LookSAM (Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization",
  CVPR 2022): every :math:`k` steps a full SAM step that also stores :math:`g_v`, the
  component of :math:`g_s` orthogonal to :math:`g`; in between one pass and
  :math:`g + \alpha \frac{\lVert g \rVert}{\lVert g_v \rVert} g_v`
  (:func:`looksam_direction`, :func:`looksam_gradient`).
* WSAM (Yue et al., KDD 2023): :math:`(1 - \alpha) g + \alpha g_s`,
  :math:`\alpha = \gamma / (1 - \gamma)` (:func:`wsam_gradient`), or its decoupled form.
* every-:math:`k` SAM (MosaicML Composer's ``SAM(interval=k)``): :math:`g_s` on one step
  in :math:`k`, the plain :math:`g` otherwise; no formula of its own.
* AE-SAM (Jiang et al., "An Adaptive Policy to Employ Sharpness-Aware Minimization",
  ICLR 2023): :math:`g_s` when :math:`\lVert g \rVert^2 \ge \mu_t + c_t \sigma_t` of
  its running statistics, the plain :math:`g` otherwise (:func:`ae_sam_statistics`,
  :func:`ae_sam_threshold`, :func:`ae_sam_is_sam_step`).

As in :mod:`sam_core._math`, the reductions (dots, squared norms) are separate from the
element-wise parts so that a backend can sum them over parameter groups before scaling:
``projection_coefficient`` takes already-reduced scalars and ``orthogonal_component``
applies it. The schedule helper :func:`proportional_rho` is the GSAM rho schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sam_core._ops import ArrayListOps
from sam_core._validation import (
    _concrete_float,
    check_nonnegative,
    check_positive_int,
    check_unit_interval,
)

__all__ = [
    "ae_sam_is_sam_step",
    "ae_sam_statistics",
    "ae_sam_target_fraction",
    "ae_sam_threshold",
    "ema_update",
    "friendly_direction",
    "friendly_momentum_update",
    "gsam_gradient",
    "looksam_direction",
    "looksam_gradient",
    "looksam_resolved_norm",
    "looksam_scale",
    "momentum_sam_scale",
    "orthogonal_component",
    "projection_coefficient",
    "proportional_rho",
    "rho_warmup",
    "validate_ae_sam",
    "validate_friendly_sam",
    "validate_gsam",
    "validate_interval",
    "validate_looksam",
    "validate_proportional_rho",
    "validate_rho_warmup",
    "validate_vasso",
    "validate_wsam",
    "vasso_direction",
    "wsam_gradient",
    "wsam_sharpness",
    "wsam_weight",
]

A = TypeVar("A")
S = TypeVar("S")


# -- projections: GSAM and LookSAM --------------------------------------------------------
def projection_coefficient(dot: Any, x_norm: Any, y_norm: Any, eps: Any) -> Any:
    r"""The coefficient :math:`c` of the projection of :math:`x` on :math:`y`, from reductions.

    .. math::

        c = \frac{\langle x, y \rangle}{\lVert x \rVert \lVert y \rVert + \epsilon}\,
            \frac{\lVert x \rVert}{\lVert y \rVert + \epsilon}
          \;\approx\; \frac{\langle x, y \rangle}{\lVert y \rVert^2},

    written as the cosine times the length ratio, the order of the official GSAM code
    (``gradient_decompose``), so that a zero :math:`y` (or :math:`x`) gives :math:`c = 0`
    instead of NaN. ``dot``, ``x_norm`` and ``y_norm`` are the backend's scalars (summed
    over every parameter group).
    """
    cosine = dot / (x_norm * y_norm + eps)
    return cosine * x_norm / (y_norm + eps)


def orthogonal_component(
    ops: ArrayListOps[A, S],
    xs: Sequence[A],
    ys: Sequence[A],
    coefficient: S,
    out: Sequence[A] | None = None,
) -> list[A]:
    r""":math:`x - c\,y`: the component of :math:`x` orthogonal to :math:`y` when
    :math:`c` is :func:`projection_coefficient` of :math:`x` on :math:`y`.

    Written into ``out`` when given (``out`` may alias ``xs``).
    """
    return ops.add_scaled(xs, ys, -coefficient, out=out)


def gsam_gradient(
    ops: ArrayListOps[A, S],
    grads: Sequence[A],
    perturbed_grads: Sequence[A],
    *,
    alpha: Any,
    eps: Any = 1e-12,
    out: Sequence[A] | None = None,
) -> list[A]:
    r"""GSAM's final gradient for one list of arrays (Zhuang et al., ICLR 2022, Algorithm 1).

    .. math::

        g_\perp = g - \frac{\langle g, g_s \rangle}{\lVert g_s \rVert^2} g_s, \qquad
        u = g_s - \alpha\, g_\perp,

    with :math:`g = \nabla L(w)` (``grads``), :math:`g_s = \nabla L(w + e)`
    (``perturbed_grads``) and the projection in :func:`projection_coefficient`'s
    :math:`\epsilon`-safe form. Descending along :math:`u` minimizes the perturbed loss
    while *increasing* the clean loss in the direction orthogonal to :math:`g_s`, which
    shrinks the surrogate gap :math:`L(w + e) - L(w)`. The official CIFAR example uses
    :math:`\alpha = 0.2`; :math:`\alpha = 0` is SAM.

    A backend with several parameter groups sums the reductions over all groups, calls
    :func:`projection_coefficient` once and :func:`orthogonal_component` per group, then
    ``add_scaled(perturbed, g_perp, -alpha)``; this function is that sequence for one list.
    ``out`` receives :math:`u` (it may alias ``perturbed_grads``).
    """
    coefficient = projection_coefficient(
        ops.dot(grads, perturbed_grads),
        ops.sqrt(ops.sum_of_squares(grads)),
        ops.sqrt(ops.sum_of_squares(perturbed_grads)),
        eps,
    )
    g_perp = orthogonal_component(ops, grads, perturbed_grads, coefficient)
    return ops.add_scaled(perturbed_grads, g_perp, -alpha, out=out)


def looksam_direction(
    ops: ArrayListOps[A, S],
    grads: Sequence[A],
    perturbed_grads: Sequence[A],
    *,
    eps: Any = 1e-12,
    out: Sequence[A] | None = None,
) -> tuple[list[A], S]:
    r"""LookSAM's stored direction :math:`g_v` and its norm, for one list of arrays.

    On a full SAM step (Liu et al., CVPR 2022, Algorithm 1):

    .. math::

        g_v = g_s - \lVert g_s \rVert \cos(g, g_s) \frac{g}{\lVert g \rVert}
            = g_s - \frac{\langle g_s, g \rangle}{\lVert g \rVert^2} g,

    the component of the SAM gradient :math:`g_s` orthogonal to the clean gradient
    :math:`g`: the part of SAM's gradient that plain SGD does not see, and which changes
    slowly enough to be reused for :math:`k` steps. Returns ``(g_v, ||g_v||)``, the norm
    through :func:`looksam_resolved_norm` (0 when :math:`g_v` is rounding error).
    """
    perturbed_norm = ops.sqrt(ops.sum_of_squares(perturbed_grads))
    coefficient = projection_coefficient(
        ops.dot(perturbed_grads, grads),
        perturbed_norm,
        ops.sqrt(ops.sum_of_squares(grads)),
        eps,
    )
    g_v = orthogonal_component(ops, perturbed_grads, grads, coefficient, out=out)
    return g_v, looksam_resolved_norm(ops.sqrt(ops.sum_of_squares(g_v)), perturbed_norm)


#: :math:`\lVert g_v \rVert \le` this times :math:`\lVert g_s \rVert` counts as
#: :math:`g_v = 0` (:func:`looksam_resolved_norm`).
LOOKSAM_RTOL = 1e-4


def looksam_resolved_norm(gv_norm: Any, perturbed_norm: Any, rtol: float = LOOKSAM_RTOL) -> Any:
    r""":math:`\lVert g_v \rVert`, or 0 where it is below ``rtol`` :math:`\lVert g_s \rVert`.

    With :math:`\rho = 0` (the first steps of a :math:`\rho` ramp) :math:`g_s = g` and
    :math:`g_v = 0` exactly; computed, it is the rounding error of the projection, about
    :math:`10^{-7} \lVert g_s \rVert` in float32, mostly parallel to :math:`g`. The reuse
    rule normalizes :math:`g_v` to :math:`\alpha \lVert g \rVert` whatever its size, so it
    would turn that rounding into :math:`g \pm \alpha g` (a step :math:`1 \pm \alpha` times
    SGD's, its sign set by rounding, so different in each backend). A zero norm makes
    :func:`looksam_scale` 0: the reuse steps are then plain steps, as the formula says for
    :math:`g_v = 0`. Jit-friendly (no branch on the values).
    """
    return gv_norm * (gv_norm > rtol * perturbed_norm)


def looksam_scale(alpha: Any, grad_norm: Any, gv_norm: Any, eps: Any = 1e-12) -> Any:
    r""":math:`\alpha \lVert g \rVert / (\lVert g_v \rVert + \epsilon)`, the weight of the
    reused :math:`g_v` on LookSAM's one-pass steps; 0 when :math:`\lVert g_v \rVert = 0` (a
    zero or unresolved :math:`g_v`, :func:`looksam_resolved_norm`, adds nothing)."""
    return alpha * grad_norm / (gv_norm + eps) * (gv_norm > 0)


def looksam_gradient(
    ops: ArrayListOps[A, S],
    grads: Sequence[A],
    g_v: Sequence[A],
    *,
    alpha: Any,
    gv_norm: Any = None,
    eps: Any = 1e-12,
    out: Sequence[A] | None = None,
) -> list[A]:
    r"""LookSAM's gradient on the steps between full SAM steps (one forward-backward pass).

    .. math::

        u = g + \alpha \frac{\lVert g \rVert}{\lVert g_v \rVert} g_v,

    with :math:`g = \nabla L(w)` and :math:`g_v` from the last full step
    (:func:`looksam_direction`). The paper's ViT experiments use :math:`\alpha = 0.7`,
    :math:`k = 5`. ``gv_norm`` may be passed when known (it is fixed between full steps).
    ``out`` may alias ``grads``.
    """
    if gv_norm is None:
        gv_norm = ops.sqrt(ops.sum_of_squares(g_v))
    scale = looksam_scale(alpha, ops.sqrt(ops.sum_of_squares(grads)), gv_norm, eps)
    return ops.add_scaled(grads, g_v, scale, out=out)


# -- WSAM -----------------------------------------------------------------------------------
def wsam_weight(gamma: Any) -> Any:
    r"""WSAM's weight of the sharpness term, :math:`\alpha = \gamma / (1 - \gamma)`."""
    return gamma / (1 - gamma)


def wsam_gradient(
    ops: ArrayListOps[A, S],
    grads: Sequence[A],
    perturbed_grads: Sequence[A],
    *,
    gamma: Any,
    out: Sequence[A] | None = None,
) -> list[A]:
    r"""WSAM's (coupled) gradient (Yue et al., "Sharpness-Aware Minimization Revisited:
    Weighted Sharpness as a Regularization Term", KDD 2023).

    WSAM minimizes :math:`L(w) + \alpha\,[L(w + e) - L(w)]` with
    :math:`\alpha = \gamma / (1 - \gamma)` (:func:`wsam_weight`), whose gradient is

    .. math::

        u = (1 - \alpha)\, g + \alpha\, g_s;

    :math:`\gamma = 1/2` (:math:`\alpha = 1`) is SAM, :math:`\gamma = 0` plain descent.
    The official code's default ("decoupled") mode instead steps the base optimizer with
    :math:`g` and then subtracts :math:`\eta_{lr}\,\alpha\,(g_s - g)` from the weights
    (:func:`wsam_sharpness`). ``out`` may alias ``perturbed_grads``.
    """
    weight = wsam_weight(gamma)
    scaled = ops.scale(perturbed_grads, weight, out=out)
    return ops.add_scaled(scaled, grads, 1 - weight, out=out)


def wsam_sharpness(
    ops: ArrayListOps[A, S],
    grads: Sequence[A],
    perturbed_grads: Sequence[A],
    out: Sequence[A] | None = None,
) -> list[A]:
    r"""The sharpness gradient :math:`g_s - g` that decoupled WSAM applies outside the base
    optimizer, :math:`w \leftarrow w - \eta_{lr}\,\alpha\,(g_s - g)`. ``out`` may alias
    ``grads``."""
    return ops.add_scaled(perturbed_grads, grads, -1.0, out=out)


def validate_wsam(*, gamma: Any) -> None:
    """Raise ``ValueError`` unless WSAM's ``gamma`` is in [0, 1)."""
    check_unit_interval("gamma", gamma, closed_right=False)


# -- FriendlySAM ----------------------------------------------------------------------------
def friendly_direction(
    ops: ArrayListOps[A, S],
    grads: Sequence[A],
    momentum: Sequence[A],
    *,
    sigma: Any,
    out: Sequence[A] | None = None,
) -> list[A]:
    r"""FriendlySAM's ascent direction :math:`d = g - \sigma m` (Li et al., CVPR 2024).

    :math:`m` is the exponential moving average of the *previous* clean gradients (the
    official code subtracts it before folding the current gradient in, see
    :func:`ema_update`); removing it leaves the batch-specific part of the gradient, whose
    ascent direction generalizes better than the full gradient's. The perturbation is then
    SAM's, :math:`e = \rho\, d / (\lVert d \rVert + \epsilon)` (or ASAM's with
    :math:`T_w^2 d`). On the first step there is no :math:`m` and :math:`d = g`.
    Official defaults: :math:`\sigma = 1`, :math:`\lambda = 0.9`.
    ``out`` may alias ``grads``.
    """
    return ops.add_scaled(grads, momentum, -sigma, out=out)


def ema_update(
    ops: ArrayListOps[A, S],
    average: Sequence[A],
    xs: Sequence[A],
    decay: Any,
    out: Sequence[A] | None = None,
) -> list[A]:
    r""":math:`m \leftarrow \lambda m + (1 - \lambda) x`, in place in ``out`` when given
    (``out`` may alias ``average``). FriendlySAM's :math:`m` with :math:`\lambda` = ``lmbda``.
    """
    scaled = ops.scale(average, decay, out=out)
    return ops.add_scaled(scaled, xs, 1 - decay, out=out)


def friendly_momentum_update(
    ops: ArrayListOps[A, S],
    momentum: Sequence[A],
    direction: Sequence[A],
    *,
    sigma: Any,
    lmbda: Any,
    out: Sequence[A] | None = None,
) -> list[A]:
    r"""FriendlySAM's average update written with the direction :math:`d` instead of :math:`g`.

    Since :math:`g = d + \sigma m`,

    .. math::

        \lambda m + (1 - \lambda) g = (\lambda + (1 - \lambda)\sigma)\, m + (1 - \lambda)\, d,

    which lets a backend overwrite the gradient with :math:`d` (no extra buffer) and fold
    the step into :math:`m` only once it knows the step was not skipped. Equal to
    :func:`ema_update` ``(m, g, lmbda)`` up to rounding. ``out`` may alias ``momentum``.
    """
    scaled = ops.scale(momentum, lmbda + (1 - lmbda) * sigma, out=out)
    return ops.add_scaled(scaled, direction, 1 - lmbda, out=out)


# -- VaSSO ------------------------------------------------------------------------------------
def vasso_direction(
    ops: ArrayListOps[A, S],
    grads: Sequence[A],
    average: Sequence[A],
    *,
    theta: Any,
    out: Sequence[A] | None = None,
) -> list[A]:
    r"""VaSSO's ascent direction: the updated moving average of the clean gradients.

    .. math::

        d = m \leftarrow (1 - \theta)\, m + \theta\, g, \qquad
        e = \rho \frac{d}{\lVert d \rVert + \epsilon}

    (Li and Giannakis, "Enhancing Sharpness-Aware Optimization Through Variance
    Suppression", NeurIPS 2023; official default :math:`\theta = 0.9`, :math:`m` starts
    as the first gradient). Averaging suppresses the variance of the stochastic ascent
    direction. Computed as :math:`\theta g + (1 - \theta) m`, so ``out`` may alias
    ``grads``; the result is also the new :math:`m`.
    """
    scaled = ops.scale(grads, theta, out=out)
    return ops.add_scaled(scaled, average, 1 - theta, out=out)


def validate_vasso(*, theta: Any) -> None:
    """Raise ``ValueError`` unless VaSSO's ``theta`` is in [0, 1]."""
    check_unit_interval("theta", theta)


# -- Momentum-SAM ---------------------------------------------------------------------------
def momentum_sam_scale(rho: Any, momentum_norm: Any, eps: Any = 1e-12) -> Any:
    r"""Momentum-SAM's scale :math:`-\rho / (\lVert v \rVert + \epsilon)`, so that

    .. math::

        e = -\rho \frac{v}{\lVert v \rVert + \epsilon}

    with :math:`v` the base optimizer's momentum buffer in PyTorch's sign convention
    (:math:`w \leftarrow w - \eta_{lr} v`, :math:`v \approx` accumulated gradients), as in
    the official MSAM code (Becker et al., 2024): the gradient is evaluated one step of
    length :math:`\rho` *against* the momentum, where the loss is higher if the momentum
    keeps descending. Apply with :func:`~sam_core.apply_perturbation` (direction :math:`v`).
    A zero momentum (the first step) gives :math:`e = 0`.
    """
    return -rho / (momentum_norm + eps)


# -- GSAM's rho schedule ---------------------------------------------------------------------
def proportional_rho(
    lr: Any, *, lr_max: float, lr_min: float, rho_max: float, rho_min: float
) -> Any:
    r"""GSAM's :math:`\rho` schedule, proportional to the learning rate.

    .. math::

        \rho_t = \rho_{min} + (\rho_{max} - \rho_{min})
                 \frac{\eta_t - \eta_{min}}{\eta_{max} - \eta_{min}},

    as the official ``ProportionScheduler`` computes it (:math:`\rho_t = \rho_{max}` when
    the learning rate is constant, :math:`\eta_{max} = \eta_{min}`). ``lr`` may be a
    Python float or a backend scalar (a traced JAX array under ``jit``); the bounds are
    static Python numbers (:func:`validate_proportional_rho`).
    """
    if lr_max == lr_min:
        return rho_max + 0 * lr
    return rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)


def rho_warmup(
    step: Any, *, rho: Any, warmup_steps: float, minimum: Callable[[Any, Any], Any] = min
) -> Any:
    r""":math:`\rho` ramped linearly from 0 over the first steps, then constant.

    .. math::

        \rho_t = \rho \, \frac{\min(t, T)}{T} \quad (T > 0), \qquad \rho_t = \rho \quad (T = 0),

    with :math:`t` the number of optimizer steps taken so far (0 at the first step, whose
    perturbation is therefore zero: a plain gradient step) and :math:`T` =
    ``warmup_steps``; at :math:`t = T` it equals ``optax.linear_schedule(0, rho, T)``. A
    large :math:`\rho` from the first step can drive a freshly initialized network to its
    flattest point, the constant predictor, before it has learned anything; a short ramp
    lets it fit features first (label-noise study in ``benchmarks/label_noise.py``).
    ``step`` may be a Python number or a backend scalar, with ``minimum`` that backend's
    element-wise minimum (``jnp.minimum`` under ``jit``); ``warmup_steps`` is a static Python
    number (an int, :func:`validate_rho_warmup`; JAX passes it as a float).
    """
    if warmup_steps == 0:
        return rho + 0 * step
    return rho * (minimum(step, warmup_steps) / warmup_steps)


# -- validation ------------------------------------------------------------------------------
def validate_gsam(*, alpha: Any) -> None:
    """Raise ``ValueError`` unless GSAM's ``alpha`` is in [0, 1]."""
    check_unit_interval("alpha", alpha)


def validate_looksam(*, k: Any, alpha: Any) -> None:
    """Raise unless LookSAM's ``k`` is an int >= 1 and ``alpha`` is in [0, 1]."""
    check_positive_int("k", k)
    check_unit_interval("alpha", alpha)


def validate_interval(*, k: Any) -> None:
    """Raise unless every-k SAM's ``k`` is an int >= 1."""
    check_positive_int("k", k)


def validate_friendly_sam(*, sigma: Any, lmbda: Any) -> None:
    """Raise unless FriendlySAM's ``sigma`` is in [0, 1] and ``lmbda`` in [0, 1)."""
    check_unit_interval("sigma", sigma)
    check_unit_interval("lmbda", lmbda, closed_right=False)


def validate_rho_warmup(*, rho: Any, warmup_steps: Any) -> None:
    """Raise unless :func:`rho_warmup`'s ``rho`` is >= 0 and ``warmup_steps`` a static int
    >= 0 (0: no warm-up)."""
    check_nonnegative("rho", rho)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(
            f"warmup_steps must be an int >= 0 (0: no warm-up), got {warmup_steps!r}"
        )


def validate_proportional_rho(*, lr_max: Any, lr_min: Any, rho_max: Any, rho_min: Any) -> None:
    """Raise unless the bounds of :func:`proportional_rho` are consistent, static numbers.

    ``rho_max >= rho_min >= 0`` and ``lr_max >= lr_min >= 0``; with a constant learning rate
    (``lr_max == lr_min``) rho is constant too, so ``rho_max`` must equal ``rho_min``.
    """
    values = {"lr_max": lr_max, "lr_min": lr_min, "rho_max": rho_max, "rho_min": rho_min}
    for name, value in values.items():
        if _concrete_float(name, value) is None:
            raise TypeError(f"{name} must be a concrete number (a static bound), got {value!r}")
        check_nonnegative(name, value)
    if rho_max < rho_min:
        raise ValueError(
            f"rho_max must be >= rho_min, got rho_max={rho_max!r} < rho_min={rho_min!r}; swap them"
        )
    if lr_max < lr_min:
        raise ValueError(
            f"lr_max must be >= lr_min, got lr_max={lr_max!r} < lr_min={lr_min!r}; swap them"
        )
    if lr_max == lr_min and rho_max != rho_min:
        raise ValueError(
            f"lr_max == lr_min == {lr_max!r} (a constant learning rate) makes rho constant, but "
            f"rho_max={rho_max!r} != rho_min={rho_min!r}; pass rho_max == rho_min or give the "
            "learning-rate range the schedule spans"
        )


# -- AE-SAM -----------------------------------------------------------------------------------
#: AE-SAM's defaults: the EMA constant :math:`\delta` and the threshold schedule's ends.
AE_SAM_DELTA = 0.9
AE_SAM_C_START = 1.0
AE_SAM_C_END = -1.0


def ae_sam_statistics(sq_norm: Any, mean: Any, var: Any, *, delta: Any) -> tuple[Any, Any]:
    r"""AE-SAM's running statistics of the squared clean-gradient norm, updated with step t.

    .. math::

        \mu_t = \delta\,\mu_{t-1} + (1 - \delta)\,\lVert g_t \rVert^2, \qquad
        \sigma_t^2 = \delta\,\sigma_{t-1}^2 + (1 - \delta)\,(\lVert g_t \rVert^2 - \mu_t)^2,

    in this order (the variance uses the *updated* mean), from
    :math:`\mu_{-1} = \sigma_{-1}^2 = 0` (Jiang et al., "An Adaptive Policy to Employ
    Sharpness-Aware Minimization", ICLR 2023, Algorithm 1). Pure arithmetic: Python floats,
    0-d tensors or traced JAX arrays. Returns ``(mean, var)``.
    """
    mean = delta * mean + (1 - delta) * sq_norm
    var = delta * var + (1 - delta) * (sq_norm - mean) ** 2
    return mean, var


def ae_sam_threshold(
    step: Any,
    *,
    total_steps: int | None,
    c_start: float = AE_SAM_C_START,
    c_end: float = AE_SAM_C_END,
    minimum: Callable[[Any, Any], Any] = min,
) -> Any:
    r"""AE-SAM's threshold coefficient :math:`c_t`, linear in the step.

    .. math::

        c_t = \frac{t'}{T}\,\lambda_1 + \Bigl(1 - \frac{t'}{T}\Bigr)\lambda_2, \qquad
        t' = \min(t, T),

    with :math:`\lambda_2` = ``c_start``, :math:`\lambda_1` = ``c_end``, :math:`T` =
    ``total_steps`` and :math:`t` the number of steps taken so far (0 at the first). Under
    the paper's model (:math:`\lVert g_t \rVert^2` normal with mean :math:`\mu_t` and
    standard deviation :math:`\sigma_t`) step :math:`t` is a SAM step with probability
    :math:`1 - \Phi(c_t)` (:func:`ae_sam_target_fraction`): a decreasing :math:`c_t` makes
    SAM steps rarer early and more frequent late. ``total_steps=None``: :math:`c_t` is the
    schedule's mean :math:`(\lambda_1 + \lambda_2) / 2` throughout (the same overall SAM
    fraction to first order, without the rise). ``step`` may be a traced JAX scalar with
    ``minimum=jnp.minimum``.
    """
    if total_steps is None:
        return (c_start + c_end) / 2 + 0 * step
    progress = minimum(step, total_steps) / total_steps
    return progress * c_end + (1 - progress) * c_start


def ae_sam_is_sam_step(
    sq_norm: Any, mean: Any, var: Any, c: Any, *, sqrt: Callable[[Any], Any] = math.sqrt
) -> Any:
    r"""AE-SAM's rule: a SAM step when :math:`\lVert g_t \rVert^2 \ge \mu_t + c_t \sigma_t`.

    ``mean`` and ``var`` are :math:`\mu_t`, :math:`\sigma_t^2` *after*
    :func:`ae_sam_statistics` has folded :math:`\lVert g_t \rVert^2` in. A large squared
    gradient norm relative to its recent history signals a sharp region, where the paper
    takes SAM's step; elsewhere the base (ERM) step. A non-finite ``sq_norm`` compares
    False (a plain step; backends also keep the statistics unchanged then).
    """
    return sq_norm >= mean + c * sqrt(var)


def ae_sam_target_fraction(c: float) -> float:
    r""":math:`1 - \Phi(c)`: the fraction of SAM steps the threshold :math:`c` targets under
    the paper's normal model of :math:`\lVert g_t \rVert^2`."""
    return 0.5 * math.erfc(c / math.sqrt(2.0))


def validate_ae_sam(*, delta: Any, c_start: Any, c_end: Any, total_steps: Any) -> None:
    """Raise unless AE-SAM's ``delta`` is in (0, 1), ``c_start`` / ``c_end`` are finite
    numbers and ``total_steps`` is ``None`` or an int >= 1.

    0-d arrays are accepted (``optax.inject_hyperparams`` turns numeric arguments into
    arrays); traced ones are checked when they were concrete."""
    number = _concrete_float("delta", delta)
    if number is not None and not 0.0 < number < 1.0:
        raise ValueError(
            f"delta must be a number in (0, 1), the EMA constant of the gradient-norm "
            f"statistics (the paper uses 0.9), got {delta!r}"
        )
    for name, value in (("c_start", c_start), ("c_end", c_end)):
        number = _concrete_float(name, value)
        if number is not None and not math.isfinite(number):
            raise ValueError(
                f"{name} must be a finite number (a threshold in standard deviations; "
                f"the paper's schedule goes from c_start=1 to c_end=-1), got {value!r}"
            )
    if total_steps is None:
        return
    if getattr(total_steps, "shape", None) == () and "int" in str(getattr(total_steps, "dtype", "")):
        try:
            total_steps = int(total_steps)
        except Exception:  # a tracer: checked when it was concrete
            return
    check_positive_int("total_steps", total_steps)
