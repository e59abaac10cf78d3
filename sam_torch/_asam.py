r"""The official ASAM recipe as param groups: ``SAM(asam_param_groups(model), ...)``."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from ._variants import normalization_parameters

__all__ = ["asam_param_groups"]


def asam_param_groups(
    model: nn.Module,
    *,
    eta: float = 0.01,
    normalization: Literal["official", "sam"] = "official",
    sam_eps: float = 1e-16,
    **group_options: Any,
) -> list[dict[str, Any]]:
    r"""Param groups for :class:`~sam_torch.SAM` that reproduce the official ASAM step.

    The official ASAM code (Kwon et al., ICML 2021, ``SamsungLabs/ASAM``) scales the
    gradient by :math:`T_w = |w| + \eta` (``eta = 0.01``) only for the parameters whose
    name contains ``"weight"`` and perturbs every other one (biases) as plain SAM
    (:math:`T_w = 1`), all under one norm plus ``1e-16``:

    .. math::

        e_i = \rho \frac{T_i^2 g_i}{\lVert T g \rVert_2 + 10^{-16}}

    (:func:`sam_core.perturbed_params_mixed`; SAM computes the same from these groups).
    So::

        sam = SAM(sam_torch.asam_param_groups(model), torch.optim.SGD, rho=0.5,
                  lr=0.1, momentum=0.9, weight_decay=5e-4)

    is the official ASAM optimizer. Unlike ``SAM(adaptive=True)`` (and the popular
    wrapper's adaptive mode, which has :math:`\eta = 0` and scales every parameter,
    biases included), the biases here keep SAM's neighbourhood. See ``docs/variants.md``
    for the rho each code uses (0.5 on CIFAR-10 in the official code, 2.0 in the popular
    wrapper's runs with :math:`\eta = 0`).

    Args:
        model: the module; its ``named_parameters()`` with ``requires_grad`` are grouped.
        eta: :math:`\eta` of the adaptive group.
        normalization: ``"official"`` (default): the rule above by name, under which a
            normalization layer's ``weight`` (its scale) is adaptive as in the official
            code; ``"sam"``: every parameter of a BatchNorm/LayerNorm/GroupNorm/RMSNorm
            layer (:func:`~sam_torch.normalization_parameters`) is plain SAM.
        sam_eps: added to the norm (the official code's ``1e-16``).
        **group_options: set on both groups (e.g. ``rho=``, ``weight_decay=``).

    Returns:
        Up to two groups: ``{"params": weights, "adaptive": True, "eta": eta, ...}`` and
        ``{"params": others, "adaptive": False, ...}``, empty ones left out.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if normalization not in ("official", "sam"):
        raise ValueError(f"normalization must be 'official' or 'sam', got {normalization!r}")
    for key in ("params", "adaptive", "eta"):
        if key in group_options:
            raise TypeError(f"asam_param_groups sets {key!r} itself; pass eta= for the offset")
    plain_ids = (
        {id(p) for p in normalization_parameters(model)} if normalization == "sam" else set()
    )
    adaptive, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (adaptive if "weight" in name and id(p) not in plain_ids else plain).append(p)
    groups = []
    if adaptive:
        groups.append(
            {"params": adaptive, "adaptive": True, "eta": eta, "sam_eps": sam_eps, **group_options}
        )
    if plain:
        groups.append({"params": plain, "adaptive": False, "sam_eps": sam_eps, **group_options})
    if not groups:
        raise ValueError("model has no parameters with requires_grad=True to optimize")
    return groups
