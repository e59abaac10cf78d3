"""Hyperparameter validation shared by every backend.

Both ``sam_torch`` and ``sam_jax`` call these functions at construction time, so a bad
value raises the same ``ValueError`` (same wording) whichever framework the user is in; only
the epsilon is named as each backend takes it (``sam_eps`` in torch, ``eps`` in JAX).
Values that are not concrete (a JAX tracer under ``optax.inject_hyperparams`` or ``jit``)
cannot be inspected and are accepted as they are.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = [
    "check_bool",
    "check_nonnegative",
    "check_positive",
    "check_positive_int",
    "check_unit_interval",
    "m_sharpness_chunks",
    "validate_sam",
]


def _concrete_float(name: str, value: Any) -> float | None:
    """Return ``value`` as a float, ``None`` if it is abstract (traced), or raise TypeError."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got the bool {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, complex):
        raise TypeError(f"{name} must be a real number, got the complex number {value!r}")
    shape = getattr(value, "shape", None)
    if shape is not None:
        if tuple(shape) != ():
            raise ValueError(f"{name} must be a scalar, got an array of shape {tuple(shape)}")
        dtype = getattr(value, "dtype", None)
        if dtype is not None and "complex" in str(dtype):
            raise TypeError(f"{name} must be a real number, got dtype {dtype}")
        try:
            return float(value)
        except Exception:  # a tracer: its value is not known until run time
            return None
    raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")


def _half_precision_hint(value: Any) -> str:
    """For a float16/bfloat16 array: where it comes from and how to keep float32.

    ``optax.inject_hyperparams`` stores the hyperparameters in the parameters' dtype unless
    told otherwise, so with float16 parameters ``eps=1e-12`` arrives as 0 (below float16's
    smallest subnormal, 6e-8) and a large value as ``inf``.
    """
    dtype = str(getattr(value, "dtype", ""))
    if dtype not in ("float16", "bfloat16"):  # NumPy/JAX names (torch's read "torch.float16")
        return ""
    return (
        f"; it is a {dtype} array, too narrow for this hyperparameter: "
        "optax.inject_hyperparams casts hyperparameters to the parameters' dtype unless "
        "given hyperparam_dtype=jnp.float32, e.g. "
        "optax.inject_hyperparams(sam_jax.sam, hyperparam_dtype=jnp.float32)(rho=...)"
    )


def check_nonnegative(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number >= 0."""
    v = _concrete_float(name, value)
    if v is not None and not (math.isfinite(v) and v >= 0.0):
        raise ValueError(
            f"{name} must be a finite number >= 0, got {value!r}{_half_precision_hint(value)}"
        )


def check_positive(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0."""
    v = _concrete_float(name, value)
    if v is not None and not (math.isfinite(v) and v > 0.0):
        raise ValueError(
            f"{name} must be a finite number > 0, got {value!r}{_half_precision_hint(value)}"
        )


def check_unit_interval(name: str, value: Any, *, closed_right: bool = True) -> None:
    """Raise ``ValueError`` unless ``0 <= value <= 1`` (or ``< 1`` with ``closed_right=False``)."""
    v = _concrete_float(name, value)
    if v is None:
        return
    ok = math.isfinite(v) and v >= 0.0 and (v <= 1.0 if closed_right else v < 1.0)
    if not ok:
        bound = "]" if closed_right else ")"
        raise ValueError(f"{name} must be in [0, 1{bound}, got {value!r}{_half_precision_hint(value)}")


def check_positive_int(name: str, value: Any) -> None:
    """Raise unless ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Raise ``TypeError`` unless ``value`` is a bool (a truthy array is almost always a bug)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def validate_sam(
    *, rho: Any, eps: Any, eta: Any, adaptive: Any, eps_name: str = "eps"
) -> None:
    """Validate the hyperparameters every SAM/ASAM perturbation takes.

    ``eps_name`` is the name the user passed the epsilon under, used in the message:
    ``"eps"`` for ``sam_jax`` (as ``optax.contrib.sam``), ``"sam_eps"`` for ``sam_torch``
    (where ``eps`` belongs to the base optimizer).

    Raises:
        ValueError: ``rho`` is negative or not finite, ``eps <= 0``, or ``eta < 0``.
        TypeError: a value of the wrong type (``adaptive`` must be a bool).
    """
    check_nonnegative("rho", rho)
    check_positive(eps_name, eps)
    check_nonnegative("eta", eta)
    check_bool("adaptive", adaptive)


def m_sharpness_chunks(batch_size: Any, m: Any) -> int:
    r"""The number of chunks :math:`k = B / m` of an m-sharpness step, or a clear error.

    m-sharpness (Foret et al., ICLR 2021, Sec. 4.1) splits a batch of :math:`B` examples into
    :math:`k = B / m` consecutive chunks of :math:`m` and perturbs each with its own gradient.
    Both backends call this at the boundary, so a bad ``m`` raises the same message.

    Raises:
        TypeError: ``m`` (or ``batch_size``) is not an int.
        ValueError: ``m < 1``, or :math:`B` is not a multiple of :math:`m` (the message names
            :math:`B`, :math:`m` and the divisors of :math:`B`, the valid values of ``m``).
    """
    check_positive_int("m", m)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(
            f"the batch size must be an int, got {type(batch_size).__name__} {batch_size!r}"
        )
    if batch_size < 1:
        raise ValueError(f"m-sharpness needs a non-empty batch, got a batch of {batch_size} examples")
    if batch_size % m:
        divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
        raise ValueError(
            f"m-sharpness splits the batch into chunks of m examples, but the batch size "
            f"B={batch_size} is not a multiple of m={m}; use an m that divides B (the divisors "
            f"of {batch_size} are {divisors}), or a batch size that is a multiple of m "
            "(e.g. drop the last incomplete batch)"
        )
    return int(batch_size) // int(m)
