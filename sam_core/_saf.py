r"""SAF's and MESA's trajectory loss, written once (Du et al., NeurIPS 2022).

Du, Zhou, Feng, Tan and Zhou, "Sharpness-Aware Training for Free", NeurIPS 2022 (official
code: github.com/AngusDujw/SAF, ``SAF_train.py`` and ``MESA_train.py``).

Both forms add to the training loss a *trajectory loss*: the KL divergence from the
softened outputs of a reference to the softened outputs of the current weights,

.. math::

    L = L_{\mathrm{CE}}(f_w(x), y) + \lambda\, \tau^2\, \frac{1}{B} \sum_{i=1}^{B}
    \mathrm{KL}\bigl(\sigma(\hat z_i / \tau)\ \big\Vert\ \sigma(f_w(x_i) / \tau)\bigr),
    \qquad \mathrm{KL}(p \Vert q) = \sum_c p_c (\log p_c - \log q_c),

with :math:`\sigma` the softmax over classes and the reference :math:`\hat z_i` held
constant (no gradient flows into it):

* **SAF**: :math:`\hat z_i` are the outputs the model gave for example :math:`i` when it
  saw it :math:`\tilde E` epochs earlier (a memory of one row per training example and
  epoch of the lag; no extra pass).
* **MESA**: :math:`\hat z_i = f_{\bar w}(x_i)`, the outputs of an exponential moving average
  of the weights, :math:`\bar w \leftarrow \beta \bar w + (1 - \beta) w` after every step
  (:func:`sam_core.ema_update`; one extra forward without backward).

The loss is added only while :math:`E_{\mathrm{start}} < e` (and :math:`e <` ``end_epoch``
when one is given), :math:`e` the zero-based epoch, as in the official code's
``epoch > kl_start_epoch and epoch < kl_end_epoch``.

Defaults (from the official code and its README): :math:`\tau = 5` ("a very stable
parameter, no need to tune"), :math:`E_{\mathrm{start}} = 5`, :math:`\lambda = 0.3` for SAF
and :math:`0.8` for MESA (the README's values and its ImageNet commands; the scripts'
argparse defaults are 0.16 and 0.3), :math:`\tilde E = 3` (``SAF_train.py``'s default; the
README gives "2/3" and its ImageNet command uses 2) and :math:`\beta = 0.9998` (the decay of
the EMA model ``MESA_train.py`` builds).

SAF's memory is kept in :math:`\tilde E` slots of shape :math:`(N, C)`: at epoch :math:`e`
slot :math:`e \bmod \tilde E` holds, for each example, the outputs recorded at epoch
:math:`e - \tilde E`; the loss reads it and then the step's outputs overwrite it
(:func:`saf_slot`). This is the official code's lag (which keeps :math:`\tilde E + 1` slots
and writes before it reads) with one slot less, for a pipeline that hands out each example
at most once per epoch (any shuffling sampler without replacement).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

from sam_core._validation import _concrete_float, check_positive_int

__all__ = [
    "MESA_DEFAULTS",
    "SAF_DEFAULTS",
    "saf_slot",
    "trajectory_active",
    "trajectory_loss",
    "validate_mesa",
    "validate_saf",
]

#: MESA's defaults: trajectory weight, temperature, start epoch and EMA decay.
MESA_DEFAULTS: dict[str, Any] = {"lmbda": 0.8, "temperature": 5.0, "start_epoch": 5, "decay": 0.9998}
#: SAF's defaults: trajectory weight, temperature, start epoch and the epoch lag E~.
SAF_DEFAULTS: dict[str, Any] = {"lmbda": 0.3, "temperature": 5.0, "start_epoch": 5, "lag_epochs": 3}


def trajectory_loss(
    logits: Any,
    reference: Any,
    *,
    temperature: Any,
    lmbda: Any,
    log_softmax: Callable[[Any], Any],
    exp: Callable[[Any], Any],
) -> Any:
    r""":math:`\lambda \tau^2 \frac{1}{B} \sum_i \mathrm{KL}(\sigma(\hat z_i/\tau) \Vert
    \sigma(z_i/\tau))` for ``logits`` :math:`z` and ``reference`` :math:`\hat z` of shape
    ``(B, C)``.

    ``log_softmax(x)`` is the backend's log-softmax over the last axis and ``exp`` its
    exponential; the caller stops the gradient of ``reference``. The :math:`\tau^2` keeps the
    gradient's size independent of :math:`\tau` (as in distillation and the official code).
    """
    log_q = log_softmax(logits / temperature)
    log_p = log_softmax(reference / temperature)
    kl = (exp(log_p) * (log_p - log_q)).sum(-1).mean()
    return kl * (lmbda * temperature * temperature)


def trajectory_active(epoch: Any, start_epoch: Any, end_epoch: Any = None) -> Any:
    r"""Whether the trajectory loss is on at zero-based ``epoch``:
    :math:`E_{\mathrm{start}} < e` and, when ``end_epoch`` is given, :math:`e <` ``end_epoch``.

    A bool for Python ints; a boolean array for arrays (a traced epoch under ``jit``).
    """
    active = epoch > start_epoch
    if end_epoch is not None:
        active = active & (epoch < end_epoch)
    return active


def saf_slot(epoch: Any, lag_epochs: int) -> Any:
    r"""The memory slot SAF reads at ``epoch`` and then overwrites: :math:`e \bmod \tilde E`.

    Written at epoch :math:`e - \tilde E`, it holds the outputs :math:`\tilde E` epochs old.
    """
    return epoch % lag_epochs


def _check_epoch_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be an int (a zero-based epoch), got {type(value).__name__} {value!r}"
        )
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0 (a zero-based epoch), got {value!r}")


def _validate_trajectory(*, lmbda: Any, temperature: Any, start_epoch: Any, end_epoch: Any) -> None:
    for name, value, fix in (
        ("lmbda", lmbda, "the weight of the trajectory loss (0 turns it off)"),
        ("temperature", temperature, "the softmax temperature tau (the paper's 5)"),
    ):
        number = _concrete_float(name, value)
        if number is None:
            continue
        ok = number >= 0.0 if name == "lmbda" else number > 0.0
        if not (ok and number < float("inf")):
            bound = ">= 0" if name == "lmbda" else "> 0"
            raise ValueError(f"{name} must be a finite number {bound}, {fix}; got {value!r}")
    _check_epoch_int("start_epoch", start_epoch)
    _check_epoch_int("end_epoch", end_epoch, allow_none=True)
    if end_epoch is not None and end_epoch <= start_epoch + 1:
        raise ValueError(
            f"end_epoch={end_epoch!r} leaves no epoch with the trajectory loss (it is on for "
            f"start_epoch < epoch < end_epoch, start_epoch={start_epoch!r}); give an end_epoch "
            f"> {start_epoch + 1}, or None to keep it on to the end"
        )


def validate_mesa(*, lmbda: Any, temperature: Any, start_epoch: Any, end_epoch: Any, decay: Any) -> None:
    """Raise ``ValueError``/``TypeError`` naming the argument unless MESA's hyperparameters
    are valid: ``lmbda >= 0``, ``temperature > 0``, ``start_epoch`` an int >= 0,
    ``end_epoch`` ``None`` or an int > ``start_epoch + 1``, ``decay`` in [0, 1)."""
    _validate_trajectory(lmbda=lmbda, temperature=temperature, start_epoch=start_epoch, end_epoch=end_epoch)
    number = _concrete_float("decay", decay)
    if number is not None and not (0.0 <= number < 1.0):
        raise ValueError(
            f"decay must be in [0, 1), the EMA's weight on its past (the paper's 0.9998; "
            f"1 would never move the average), got {decay!r}"
        )


def validate_saf(
    *,
    num_examples: Any,
    lmbda: Any,
    temperature: Any,
    start_epoch: Any,
    end_epoch: Any,
    lag_epochs: Any,
    num_classes: Any = None,
) -> None:
    """Raise ``ValueError``/``TypeError`` naming the argument unless SAF's hyperparameters are
    valid: ``num_examples`` (and ``num_classes`` when given) an int >= 1, ``lag_epochs`` an
    int >= 1 with ``lag_epochs <= start_epoch + 1`` (so the first epoch with the loss finds
    outputs recorded ``lag_epochs`` epochs before it), and the trajectory arguments as in
    :func:`validate_mesa`."""
    check_positive_int("num_examples", num_examples)
    if num_classes is not None:
        check_positive_int("num_classes", num_classes)
    check_positive_int("lag_epochs", lag_epochs)
    _validate_trajectory(lmbda=lmbda, temperature=temperature, start_epoch=start_epoch, end_epoch=end_epoch)
    if lag_epochs > start_epoch + 1:
        raise ValueError(
            f"lag_epochs={lag_epochs!r} is more than start_epoch + 1 = {start_epoch + 1}: the "
            f"first epoch with the trajectory loss ({start_epoch + 1}) would read outputs from "
            f"epoch {start_epoch + 1 - lag_epochs}, before training began; use a start_epoch "
            f">= {lag_epochs - 1} or a smaller lag_epochs"
        )
