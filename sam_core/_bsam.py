r"""Bayesian SAM (bSAM): Möllenhoff & Khan, "SAM as an Optimal Relaxation of Bayes", ICLR 2023.

bSAM learns a diagonal Gaussian posterior :math:`q(\theta) = \mathcal{N}(\omega, \sigma^2)`,
:math:`\sigma^2 = 1 / (N s)`, over the weights: a mean :math:`\omega` (the network's
weights), a precision :math:`s` per weight and an Adam-like momentum :math:`g_m`. One step
of Algorithm 1 of the paper, element-wise, with :math:`N` the number of training examples
(``num_data``), :math:`\delta` the weight decay (the prior's precision), :math:`\gamma` the
damping and :math:`\alpha` the learning rate:

.. math::

    \theta &= \omega + \sigma z, \quad z \sim \mathcal{N}(0, I), \quad
        \sigma = 1 / \sqrt{N s}                          &\text{(a posterior sample)} \\
    g &= \nabla \ell(\theta)                               &\text{(the "clean" pass)} \\
    \epsilon &= \rho\, g / s                               &\text{(SAM's ascent, scaled by the precision)} \\
    g_\epsilon &= \nabla \ell(\omega + \epsilon)           &\text{(the perturbed pass)} \\
    g_m &\leftarrow \beta_1 g_m + (1 - \beta_1)(g_\epsilon + \delta\, \omega) \\
    s &\leftarrow \beta_2 s + (1 - \beta_2)(\sqrt{s}\, |g| + \delta + \gamma) \\
    \omega &\leftarrow \omega - \alpha\, g_m / s

(:math:`\ell` the mean loss of the batch). Two forward-backward passes per step, like SAM;
:math:`s` starts at ``s_init`` (1 in the paper), :math:`g_m` at 0. The posterior is what
the method is for: averaging the predictions of a few samples :math:`\theta \sim q`
(``predictive`` in each backend) gives calibrated probabilities.

Each function here is element-wise on one array of any backend (NumPy, torch, JAX: only
``+ - * / ** abs``), so a backend maps it over its parameters; scalars may be arrays.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

from sam_core._validation import _concrete_float, check_nonnegative, check_positive

__all__ = [
    "bsam_momentum_update",
    "bsam_noise_std",
    "bsam_perturbation",
    "bsam_precision_update",
    "bsam_sample",
    "bsam_step",
    "validate_bsam",
]

A = TypeVar("A")


def bsam_noise_std(precision: A, num_data: Any) -> A:
    r"""The posterior's standard deviation :math:`\sigma = 1 / \sqrt{N s}`."""
    return (precision * num_data) ** -0.5  # type: ignore[operator]


def bsam_sample(mean: A, precision: A, noise: A, num_data: Any) -> A:
    r"""A posterior sample :math:`\theta = \omega + z / \sqrt{N s}` from standard-normal ``noise``."""
    return mean + noise * bsam_noise_std(precision, num_data)  # type: ignore[operator]


def bsam_perturbation(grad: A, precision: A, rho: Any) -> A:
    r"""bSAM's ascent step :math:`\epsilon = \rho\, g / s` (no normalization: :math:`s` scales it)."""
    return rho * grad / precision  # type: ignore[operator]


def bsam_momentum_update(momentum: A, perturbed_grad: A, mean: A, beta1: Any, weight_decay: Any) -> A:
    r""":math:`g_m \leftarrow \beta_1 g_m + (1 - \beta_1)(g_\epsilon + \delta\, \omega)`."""
    return beta1 * momentum + (1 - beta1) * (perturbed_grad + weight_decay * mean)  # type: ignore[operator]


def bsam_precision_update(precision: A, grad: A, beta2: Any, weight_decay: Any, damping: Any) -> A:
    r""":math:`s \leftarrow \beta_2 s + (1 - \beta_2)(\sqrt{s}\, |g| + \delta + \gamma)`, :math:`g` the
    gradient at the posterior sample."""
    return beta2 * precision + (1 - beta2) * (  # type: ignore[operator]
        precision**0.5 * abs(grad) + (weight_decay + damping)  # type: ignore[operator]
    )


def bsam_step(momentum: A, precision: A, lr: Any) -> A:
    r"""The mean's increment :math:`-\alpha\, g_m / s` (with the updated :math:`s`):
    :math:`\omega \leftarrow \omega + (-\alpha\, g_m / s)`."""
    return -(lr * momentum / precision)  # type: ignore[operator]


def validate_bsam(
    *,
    num_data: Any,
    lr: Any,
    betas: Any,
    rho: Any,
    damping: Any,
    weight_decay: Any,
    s_init: Any = 1.0,
) -> None:
    """Validate bSAM's hyperparameters with messages that name the argument and the fix."""
    if isinstance(num_data, bool) or not isinstance(num_data, int | float) or not (
        math.isfinite(num_data) and num_data > 0
    ):
        raise ValueError(
            f"num_data must be the number of training examples, a number > 0, got {num_data!r} "
            "(it sets the posterior variance 1 / (num_data * s))"
        )
    check_positive("lr", lr)
    if not (isinstance(betas, tuple | list) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        value = _concrete_float(f"betas[{i}]", beta)
        if value is not None and not (0.0 <= value < 1.0):
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")
    check_nonnegative("rho", rho)
    check_nonnegative("weight_decay", weight_decay)
    check_nonnegative("damping", damping)
    check_positive("s_init", s_init)
    wd, dmp = _concrete_float("weight_decay", weight_decay), _concrete_float("damping", damping)
    if wd is not None and dmp is not None and wd + dmp <= 0:
        raise ValueError(
            "weight_decay + damping must be > 0: the precision s tends to them where the "
            f"gradient vanishes, and s = 0 divides by zero; got weight_decay={weight_decay!r}, "
            f"damping={damping!r}"
        )
