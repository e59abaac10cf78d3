r"""The constructor options every SAM-family class shares with :class:`sam_torch.SAM`.

A SAM-family class declares only its own keyword-only arguments and takes the shared ones
as ``**options: Unpack[SAMOptions]`` (PEP 692), which type checkers and IDEs expand into
the full typed signature::

    class GSAM(_VariantSAM):
        def __init__(self, params, base_optimizer, *, alpha: float = 0.2,
                     **options: Unpack[SAMOptions]) -> None: ...

The keys are :class:`~sam_torch.SAM`'s constructor arguments (its docstring documents
each one); anything else in ``options`` (``lr``, ``momentum``, ``weight_decay``, ...) goes
to the base optimizer, as with :class:`~sam_torch.SAM` (``extra_items``, PEP 728).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import TypedDict

__all__ = ["BaseOptimizer", "MomentumSAMOptions", "Params", "SAMOptions"]

#: What ``params`` may be: tensors, ``named_parameters()`` pairs or param-group dicts.
Params = Iterable[Tensor] | Iterable[dict[str, Any]]
#: An optimizer class (or a factory ``(param_groups, **kwargs) -> Optimizer``).
BaseOptimizer = type[Optimizer] | Callable[..., Optimizer]


class MomentumSAMOptions(TypedDict, total=False, extra_items=Any):  # type: ignore[call-arg]
    """The options of :class:`~sam_torch.SAM` that every SAM-family class takes, MomentumSAM too.

    All are optional; the defaults are :class:`~sam_torch.SAM`'s. Other keys go to the
    base optimizer.

    Attributes:
        sam_eps: added to the norm, :math:`\\epsilon > 0` (``1e-12``).
        model: the module trained; its batch-norm statistics are frozen during the
            perturbed pass of ``step(closure)``.
        perturb_impl: ``"auto"``, ``"foreach"``, ``"per_tensor"`` or ``"compiled"``.
        storage: ``"auto"``, ``"swap"`` or ``"copy"``: how :math:`w` is kept while the
            parameters hold :math:`w + e`.
        skip_nonfinite: ``"clean"`` (default), ``"both"``/``True`` or ``False``: the
            policy for non-finite gradients and losses.
        max_consecutive_skips: ``None`` or an int >= 1: raise after that many skipped steps.
        dropout: ``"same"`` (default) or ``"fresh"``: the dropout masks of the perturbed
            closure call in ``step(closure)``.
        gc: gradient centralization of the clean gradient before the perturbation is formed
            (``False``; :func:`sam_core.centralize`).
    """

    sam_eps: float
    model: torch.nn.Module | None
    perturb_impl: Literal["auto", "foreach", "per_tensor", "compiled"]
    storage: Literal["auto", "swap", "copy"]
    skip_nonfinite: bool | Literal["clean", "both"]
    max_consecutive_skips: int | None
    dropout: Literal["same", "fresh"]
    gc: bool


class SAMOptions(MomentumSAMOptions, total=False, extra_items=Any):  # type: ignore[call-arg]
    """:class:`MomentumSAMOptions` plus the neighbourhood: ``rho`` and ASAM's ``adaptive``, ``eta``.

    Attributes:
        rho: radius of the neighbourhood, :math:`\\rho \\ge 0` (0.05).
        adaptive: ASAM's scale-invariant neighbourhood (``False``).
        eta: ASAM's offset in :math:`T_w = |w| + \\eta` (0.01, the official code's).
    """

    rho: float
    adaptive: bool
    eta: float
