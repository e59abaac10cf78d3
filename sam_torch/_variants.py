r"""The SAM family for PyTorch: siblings of :class:`sam_torch.SAM` built on the same machinery.

Each class subclasses :class:`~sam_torch.SAM` (same constructor options, declared once in
:class:`~sam_torch.SAMOptions` and taken as keywords, same
``first_step`` / ``second_step`` / ``step(closure)`` / ``restore`` contract, same exact
restore and shared state with the base optimizer) and changes one thing, with the math
taken from :mod:`sam_core` (``sam_core._variants``):

=================  ==========================================  =====================
class              what changes                                passes per step
=================  ==========================================  =====================
``GSAM``           final gradient :math:`g_s - \alpha g_\perp`  2
``WSAM``           :math:`g` plus weighted sharpness term       2
``SAMON``          perturb normalization parameters only        2
``FriendlySAM``    ascent direction :math:`g - \sigma m`        2
``VaSSO``          ascent direction: moving average of g       2
``LookSAM``        full SAM every k steps, reuse :math:`g_v`    1 + 1/k
``EveryKSAM``      SAM every k steps, base step otherwise       1 + 1/k
``MomentumSAM``    perturb along the momentum, no clean pass    1
``AESAM``          SAM only when :math:`\lVert g \rVert^2` is    1 + fraction of SAM
                   high for its running statistics             steps
=================  ==========================================  =====================

Buffers a variant keeps between steps (FriendlySAM's average, LookSAM's :math:`g_v`) are
held outside the base optimizer's per-parameter state (Adam initializes a state only when
it is empty) and saved by :meth:`state_dict` under the key ``"sam_variant"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import Unpack

import sam_core

from ._entry import base_step
from ._ops import TorchOps
from ._options import BaseOptimizer, MomentumSAMOptions, Params, SAMOptions
from ._sam import SAM, _by_device_and_dtype

__all__ = [
    "AESAM",
    "GSAM",
    "SAMON",
    "WSAM",
    "EveryKSAM",
    "FriendlySAM",
    "LookSAM",
    "MomentumSAM",
    "ProportionalRhoScheduler",
    "RhoWarmup",
    "VaSSO",
    "normalization_parameters",
]



class _VariantSAM(SAM):
    """SAM plus persistent per-parameter buffers and a step counter, both checkpointed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._buffers: dict[str, dict[Tensor, Tensor]] = {}
        #: Number of completed steps (SAM or cheap); decides which steps are full SAM steps.
        self.variant_step = 0
        self._pending: set[Tensor] = set()

    def _buffer(self, name: str, p: Tensor, *, persistent: bool = True) -> Tensor:
        """A buffer like ``p`` kept across steps; saved by ``state_dict`` if ``persistent``."""
        if not persistent:
            name = "_scratch_" + name
        store = self._buffers.setdefault(name, {})
        buf = store.get(p)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = torch.empty_like(p.detach(), memory_format=torch.preserve_format)
            store[p] = buf
        return buf

    def _base_step(self, loss: Any) -> bool:
        """A plain base-optimizer step with the gradients as they are (a one-pass step).

        Honours SAM's ``skip_nonfinite``: a non-finite gradient skips the step (returns
        False) and sets ``step_skipped``.
        """
        skip = bool(getattr(self, "skip_nonfinite", False)) and not self._grads_all_finite()
        if not skip:
            base_step(self.base_optimizer)
        self.loss = _detached(loss)
        self.perturbed_loss = None
        self._finish_step(skip)
        return not skip

    def _ordered_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        """The base state dict plus the variant's buffers and step counter (``"sam_variant"``)."""
        state = super().state_dict()
        index = {p: i for i, p in enumerate(self._ordered_params())}
        buffers = {
            name: {index[p]: buf.clone() for p, buf in store.items() if p in index}
            for name, store in self._buffers.items()
            if not name.startswith("_scratch_")
        }
        state["sam_variant"] = {"step": self.variant_step, "buffers": buffers}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved, the variant's buffers included."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("sam_variant", None)
        super().load_state_dict(state_dict)
        if extra is None:
            return
        params = self._ordered_params()
        self.variant_step = int(extra["step"])
        self._buffers = {}
        for name, saved in extra["buffers"].items():
            for i, buf in saved.items():
                p = params[int(i)]
                self._buffers.setdefault(name, {})[p] = buf.to(device=p.device, dtype=p.dtype)


def _detached(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x


# torch.optim optimizers that keep no momentum buffer MomentumSAM could read.
_NO_MOMENTUM = ("Adagrad", "Adadelta", "ASGD", "LBFGS", "Rprop", "SparseAdam")


def _check_keeps_momentum(base: Optimizer) -> None:
    """MomentumSAM needs a momentum: reject SGD/RMSprop with momentum 0 and optimizers with none."""
    name = type(base).__name__
    fix = (
        "use SGD(momentum=0.9), Adam or AdamW as base_optimizer, or SAM, which needs no "
        "momentum"
    )
    if name in _NO_MOMENTUM:
        raise ValueError(
            f"MomentumSAM perturbs along the base optimizer's momentum, and {name} keeps none; "
            + fix
        )
    for i, group in enumerate(base.param_groups):
        if "momentum" in group and not group["momentum"] > 0:
            raise ValueError(
                f"MomentumSAM perturbs along the base optimizer's momentum, but param group {i} "
                f"has momentum={group['momentum']!r} ({name} then keeps no momentum buffer); "
                + fix
            )


def _sum_scalars(values: list[Tensor]) -> Tensor:
    total = values[0]
    for v in values[1:]:
        total = total + v.to(total.device)
    return total


# ----------------------------------------------------------------------------------------
# GSAM
# ----------------------------------------------------------------------------------------
class GSAM(_VariantSAM):
    r"""Surrogate Gap guided SAM (GSAM): SAM's gradient minus part of the clean gradient.

    With :math:`g = \nabla L(w)` and :math:`g_s = \nabla L(w + e)` (``e`` as in SAM/ASAM),
    the base optimizer receives

    .. math::

        u = g_s - \alpha\, g_\perp, \qquad
        g_\perp = g - \frac{\langle g, g_s \rangle}{\lVert g_s \rVert^2} g_s,

    (:func:`sam_core.gsam_gradient`, norms and dots global over all groups), which lowers
    the perturbed loss and the surrogate gap :math:`L(w+e) - L(w)` together. The official
    code also schedules :math:`\rho` proportionally to the learning rate: pair with
    :class:`ProportionalRhoScheduler`.

    Reference: Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization",
    ICLR 2022 (official CIFAR example: ``alpha=0.2``, ASAM, ``rho`` 2.0).

    Args:
        params, base_optimizer, **options: as :class:`~sam_torch.SAM`
            (:class:`~sam_torch.SAMOptions`; other keywords go to the base optimizer).
        alpha: weight of :math:`g_\perp`, in [0, 1]; 0 is SAM.

    Cost: two forward-backward passes per step, one extra parameter-sized buffer (the
    clean gradient).
    """

    def __init__(
        self,
        params: Params,
        base_optimizer: BaseOptimizer,
        *,
        alpha: float = 0.2,
        **options: Unpack[SAMOptions],
    ) -> None:
        sam_core.validate_gsam(alpha=alpha)
        super().__init__(params, base_optimizer, **options)
        self.alpha = alpha
        self._clean: dict[Tensor, Tensor] = {}

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, loss: Any = None) -> None:
        """Keep a copy of the clean gradient :math:`g`, then perturb as SAM does."""
        if not self.is_perturbed:
            self._centralize_clean_gradients()
            self._clean = {}
            for _, _, params, grads, _ in self._plan():
                bufs = [self._buffer("gsam_clean_grad", p, persistent=False) for p in params]
                torch._foreach_copy_(bufs, grads)
                self._clean.update(zip(params, bufs, strict=True))
        super().first_step(zero_grad, loss=loss)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, loss: Any = None) -> None:
        r"""Replace the gradient by :math:`g_s - \alpha g_\perp`, restore and step."""
        if self.is_perturbed:
            self._decompose()
        super().second_step(zero_grad, loss=loss)

    def _decompose(self) -> None:
        parts = []
        for group, ops, params, grads, _ in self._plan():
            keep = [i for i, p in enumerate(params) if p in self._clean]
            if not keep:
                continue
            clean = [self._clean[params[i]] for i in keep]
            perturbed = [grads[i] for i in keep]
            parts.append((group, ops, clean, perturbed))
        if not parts:
            return
        dot = _sum_scalars([ops.dot(c, s) for _, ops, c, s in parts])
        clean_norm = torch.sqrt(_sum_scalars([ops.sum_of_squares(c) for _, ops, c, _ in parts]))
        pert_norm = torch.sqrt(_sum_scalars([ops.sum_of_squares(s) for _, ops, _, s in parts]))
        eps = self.param_groups[0]["sam_eps"]
        coefficient = sam_core.projection_coefficient(dot, clean_norm, pert_norm, eps)
        for _, ops, clean, perturbed in parts:
            g_perp = sam_core.orthogonal_component(ops, clean, perturbed, coefficient, out=clean)
            ops.add_scaled(perturbed, g_perp, -self.alpha, out=perturbed)
        self._clean = {}


class ProportionalRhoScheduler:
    r"""GSAM's :math:`\rho` schedule: each group's ``rho`` follows its learning rate.

    .. math::

        \rho_t = \rho_{min} + (\rho_{max} - \rho_{min})
                 \frac{\eta_t - \eta_{min}}{\eta_{max} - \eta_{min}}

    (:func:`sam_core.proportional_rho`, the official ``ProportionScheduler``). Call
    :meth:`step` after the learning-rate scheduler's ``step()``; it reads ``group["lr"]``
    and writes ``group["rho"]``, so it works with any ``torch.optim.lr_scheduler`` attached
    to the SAM optimizer (their param groups are shared). It is applied once at
    construction.

    Args:
        optimizer: a :class:`~sam_torch.SAM` (or any variant).
        rho_max: :math:`\rho` at the largest learning rate.
        rho_min: :math:`\rho` at ``lr_min``.
        lr_max: the largest learning rate; by default each group's ``initial_lr`` (set by
            LR schedulers) or its ``lr`` at construction.
        lr_min: the smallest learning rate (0 for cosine decay to zero).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        rho_max: float,
        rho_min: float,
        lr_max: float | None = None,
        lr_min: float = 0.0,
    ) -> None:
        self.optimizer = optimizer
        self.rho_max = rho_max
        self.rho_min = rho_min
        self.lr_min = lr_min
        self.lr_max = lr_max
        self.lr_maxes: list[float] = []
        for group in optimizer.param_groups:
            self.lr_maxes.append(self._lr_max_of(group))
        self.last_rho: list[Any] = []
        self.step()

    def step(self) -> list[Any]:
        """Set every group's ``rho`` from its current ``lr``; returns the new values.

        A group added to the optimizer after this scheduler was built (``add_param_group``)
        gets its ``lr_max`` the way the first groups did, when this first sees it.
        """
        for group in self.optimizer.param_groups[len(self.lr_maxes):]:
            self.lr_maxes.append(self._lr_max_of(group))
        self.last_rho = []
        for group, top in zip(self.optimizer.param_groups, self.lr_maxes, strict=True):
            group["rho"] = sam_core.proportional_rho(
                group["lr"],
                lr_max=top,
                lr_min=self.lr_min,
                rho_max=self.rho_max,
                rho_min=self.rho_min,
            )
            self.last_rho.append(group["rho"])
        return self.last_rho

    def _lr_max_of(self, group: dict[str, Any]) -> float:
        top = self.lr_max if self.lr_max is not None else group.get("initial_lr", group["lr"])
        top = float(top)
        sam_core.validate_proportional_rho(
            lr_max=top, lr_min=self.lr_min, rho_max=self.rho_max, rho_min=self.rho_min
        )
        return top

    def state_dict(self) -> dict[str, Any]:
        return {"lr_maxes": list(self.lr_maxes), "last_rho": list(self.last_rho)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.lr_maxes = list(state_dict["lr_maxes"])
        self.last_rho = list(state_dict["last_rho"])


class RhoWarmup:
    r"""Linear :math:`\rho` warm-up: each group's ``rho`` ramps from 0 to its value over the
    first ``warmup_steps`` steps, then stays.

    .. math::

        \rho_t = \rho \, \frac{\min(t, T)}{T}

    (:func:`sam_core.rho_warmup`), :math:`t` the number of :meth:`step` calls so far, so the
    first optimizer step is a plain gradient step. The same ramp as
    :func:`sam_jax.rho_warmup_schedule`. A large :math:`\rho` from the first step can send a
    fresh network to the constant predictor (the flattest point there is) before it learns
    anything; the ramp lets it fit features first. Call :meth:`step` once after each
    optimizer step::

        sam = SAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, rho=0.15)
        warmup = RhoWarmup(sam, warmup_steps=5 * steps_per_epoch)
        for x, y in loader:
            ...
            sam.step(closure)
            warmup.step()

    Each group's target is its ``rho`` at construction, stored as ``group["initial_rho"]``
    (as LR schedulers keep ``initial_lr``); a group added later (``add_param_group``) ramps
    from its own ``rho`` at the step it is first seen. ``state_dict``/``load_state_dict``
    resume the ramp.

    Args:
        optimizer: a :class:`~sam_torch.SAM` (or any variant; every param group has ``rho``).
        warmup_steps: :math:`T`, an int >= 0 (0: ``rho`` unchanged).
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int) -> None:
        for i, group in enumerate(optimizer.param_groups):
            if "rho" not in group:
                raise TypeError(
                    f"RhoWarmup needs a SAM-family optimizer (param group {i} has no 'rho'), "
                    f"got {type(optimizer).__name__}"
                )
            sam_core.validate_rho_warmup(rho=group["rho"], warmup_steps=warmup_steps)
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.last_step = 0
        self.last_rho: list[Any] = []
        self._apply()

    def step(self) -> list[Any]:
        """Advance one optimizer step and set every group's ``rho``; returns the values."""
        self.last_step += 1
        return self._apply()

    def _apply(self) -> list[Any]:
        self.last_rho = []
        for group in self.optimizer.param_groups:
            if "initial_rho" not in group:
                sam_core.validate_rho_warmup(rho=group["rho"], warmup_steps=self.warmup_steps)
                group["initial_rho"] = group["rho"]
            group["rho"] = sam_core.rho_warmup(
                self.last_step, rho=group["initial_rho"], warmup_steps=self.warmup_steps
            )
            self.last_rho.append(group["rho"])
        return self.last_rho

    def state_dict(self) -> dict[str, Any]:
        return {"warmup_steps": self.warmup_steps, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.warmup_steps = int(state_dict["warmup_steps"])
        self.last_step = int(state_dict["last_step"])
        self._apply()


# ----------------------------------------------------------------------------------------
# WSAM
# ----------------------------------------------------------------------------------------
class WSAM(_VariantSAM):
    r"""Weighted SAM (WSAM): sharpness as a weighted regularization term.

    WSAM minimizes :math:`L(w) + \alpha\,[L(w + e) - L(w)]`,
    :math:`\alpha = \gamma / (1 - \gamma)`, with :math:`e` SAM's (or ASAM's). With
    :math:`g = \nabla L(w)` and :math:`g_s = \nabla L(w + e)`:

    * ``decouple=True`` (the official default): the base optimizer steps with :math:`g`,
      then :math:`w \leftarrow w - \eta_{lr}\,\alpha\,(g_s - g)` with each group's
      ``lr`` (:func:`sam_core.wsam_sharpness`), so the sharpness term bypasses momentum and
      adaptive scaling;
    * ``decouple=False``: the base optimizer steps with
      :math:`(1 - \alpha) g + \alpha g_s` (:func:`sam_core.wsam_gradient`).

    :math:`\gamma = 1/2` is SAM (coupled). Reference: Yue et al., "Sharpness-Aware
    Minimization Revisited: Weighted Sharpness as a Regularization Term", KDD 2023 (official
    default ``gamma=0.88``; its default gradient clipping ``max_norm=1.0`` is not applied
    here: clip in the closure if you want it).

    Args:
        params, base_optimizer, **options: as :class:`~sam_torch.SAM`
            (:class:`~sam_torch.SAMOptions`; other keywords go to the base optimizer).
        gamma: in [0, 1).
        decouple: apply the sharpness term outside the base optimizer (needs ``lr`` in
            the param groups).

    Cost: two passes per step, one extra buffer (the clean gradient).
    """

    def __init__(
        self,
        params: Params,
        base_optimizer: BaseOptimizer,
        *,
        gamma: float = 0.88,
        decouple: bool = True,
        **options: Unpack[SAMOptions],
    ) -> None:
        sam_core.validate_wsam(gamma=gamma)
        sam_core.check_bool("decouple", decouple)
        super().__init__(params, base_optimizer, **options)
        if decouple and any("lr" not in group for group in self.param_groups):
            raise ValueError(
                "WSAM(decouple=True) applies lr * alpha * (g_s - g) itself and needs 'lr' in "
                "every param group; use a base optimizer with an lr or decouple=False"
            )
        self.gamma = gamma
        self.decouple = decouple
        self._clean: dict[Tensor, Tensor] = {}
        self._sharpness: list[tuple[dict[str, Any], TorchOps, list[Tensor], list[Tensor]]] = []

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, loss: Any = None) -> None:
        """Keep a copy of the clean gradient :math:`g`, then perturb as SAM does."""
        if not self.is_perturbed:
            self._centralize_clean_gradients()
            self._clean = {}
            for _, _, params, grads, _ in self._plan():
                bufs = [self._buffer("wsam_clean_grad", p, persistent=False) for p in params]
                torch._foreach_copy_(bufs, grads)
                self._clean.update(zip(params, bufs, strict=True))
        super().first_step(zero_grad, loss=loss)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, loss: Any = None) -> None:
        """Form WSAM's gradient (or split off the sharpness term), restore and step."""
        self._sharpness = []
        if self.is_perturbed:
            for group, ops, params, grads, _ in self._plan():
                keep = [i for i, p in enumerate(params) if p in self._clean]
                if not keep:
                    continue
                g = [self._clean[params[i]] for i in keep]
                g_s = [grads[i] for i in keep]
                if self.decouple:
                    sharp = sam_core.wsam_sharpness(ops, g, g_s, out=g)  # g_s - g
                    ops.add_scaled(g_s, sharp, -1.0, out=g_s)  # the base step sees g
                    self._sharpness.append((group, ops, [params[i] for i in keep], sharp))
                else:
                    sam_core.wsam_gradient(ops, g, g_s, gamma=self.gamma, out=g_s)
            self._clean = {}
        super().second_step(zero_grad, loss=loss)
        if self._sharpness and not getattr(self, "step_skipped", False):
            weight = sam_core.wsam_weight(self.gamma)
            for group, ops, params, sharp in self._sharpness:
                data = [p.data for p in params]
                ops.add_scaled(data, sharp, -group["lr"] * weight, out=data)
        self._sharpness = []


# ----------------------------------------------------------------------------------------
# SAM-ON
# ----------------------------------------------------------------------------------------
_NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
    )
    if t is not None
)


def normalization_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every normalization layer of ``model`` (SAM-ON's perturbed set).

    BatchNorm (1d/2d/3d, SyncBatchNorm), InstanceNorm, LayerNorm, GroupNorm and RMSNorm
    modules contribute their own parameters (affine weight and bias); other modules none.
    """
    found: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, _NORM_TYPES):
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    found.append(p)
    return found


class SAMON(_VariantSAM):
    r"""SAM-ON: (A)SAM that perturbs only the normalization layers' parameters.

    The perturbation and its norm are SAM's (or ASAM's with ``adaptive=True``) computed
    over the normalization parameters alone,

    .. math::

        e_N = \rho \frac{T_N^2 g_N}{\lVert T_N g_N \rVert + \epsilon}, \qquad e_{\bar N} = 0,

    while the base optimizer updates every parameter with the gradient at
    :math:`w + e`. Reference: Mueller et al., "Normalization Layers Are All That
    Sharpness-Aware Minimization Needs", NeurIPS 2023 (the paper reports its best results
    with ASAM-ON and a larger ``rho`` than for SAM; tune it).

    Args:
        params, base_optimizer, **options: as :class:`~sam_torch.SAM`
            (:class:`~sam_torch.SAMOptions`; other keywords go to the base optimizer).
        norm_params: the parameters to perturb: a module (its
            :func:`normalization_parameters` are used) or an iterable of parameters (any
            mask you like). Each must also be in ``params``.

    Cost: two passes per step; the perturbation touches only the (small) masked set.
    """

    def __init__(
        self,
        params: Params,
        base_optimizer: BaseOptimizer,
        *,
        norm_params: nn.Module | Iterable[Tensor],
        **options: Unpack[SAMOptions],
    ) -> None:
        super().__init__(params, base_optimizer, **options)
        chosen = (
            normalization_parameters(norm_params)
            if isinstance(norm_params, nn.Module)
            else list(norm_params)
        )
        known = {id(p) for p in self._ordered_params()}
        for p in chosen:
            if not isinstance(p, Tensor):
                raise TypeError(f"norm_params must hold tensors, got {type(p).__name__}")
            if id(p) not in known:
                raise ValueError(
                    f"norm_params holds a parameter of shape {tuple(p.shape)} that is not in "
                    "params; pass the model's parameters as params and a subset as norm_params"
                )
        if not chosen:
            raise ValueError(
                "norm_params is empty: the model has no BatchNorm/LayerNorm/GroupNorm/RMSNorm "
                "parameters (or an empty list was given), so SAM-ON would never perturb; use "
                "SAM, or pass the parameters to perturb explicitly"
            )
        self._mask = {id(p) for p in chosen}

    def _plan(self):  # type: ignore[no-untyped-def]
        """SAM's plan restricted to the masked parameters (so the norm is theirs only)."""
        plan = []
        for group, ops, params, grads, out in super()._plan():
            keep = [i for i, p in enumerate(params) if id(p) in self._mask]
            if keep:
                plan.append(
                    (
                        group,
                        ops,
                        [params[i] for i in keep],
                        [grads[i] for i in keep],
                        [out[i] for i in keep],
                    )
                )
        return plan


# ----------------------------------------------------------------------------------------
# FriendlySAM
# ----------------------------------------------------------------------------------------
class FriendlySAM(_VariantSAM):
    r"""FriendlySAM (F-SAM): perturb along the batch-specific part of the gradient.

    .. math::

        d = g - \sigma m, \qquad m \leftarrow \lambda m + (1 - \lambda) g, \qquad
        e = \rho \frac{T_w^2 d}{\lVert T_w d \rVert + \epsilon}

    with :math:`m` the moving average of past clean gradients, taken *before* the current
    gradient is folded in and initialized to the first gradient (:math:`d = g` on the first
    step), as in the official code (:func:`sam_core.friendly_direction`,
    :func:`sam_core.ema_update`). Like the official code, ``first_step`` leaves :math:`d`
    in ``p.grad`` (the closure recomputes the gradient at :math:`w + e`).

    Reference: Li et al., "Friendly Sharpness-Aware Minimization", CVPR 2024 (official
    defaults ``sigma=1``, ``lmbda=0.9``; its CIFAR script uses ``lmbda=0.95``, ``rho=0.2``).

    Args:
        params, base_optimizer, **options: as :class:`~sam_torch.SAM`
            (:class:`~sam_torch.SAMOptions`; other keywords go to the base optimizer).
        sigma: weight of the average removed from the gradient, in [0, 1].
        lmbda: decay of the average, in [0, 1).

    Cost: two passes per step, one extra parameter-sized buffer (:math:`m`).
    """

    def __init__(
        self,
        params: Params,
        base_optimizer: BaseOptimizer,
        *,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        **options: Unpack[SAMOptions],
    ) -> None:
        sam_core.validate_friendly_sam(sigma=sigma, lmbda=lmbda)
        super().__init__(params, base_optimizer, **options)
        self.sigma = sigma
        self.lmbda = lmbda

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, loss: Any = None) -> None:
        r"""Turn ``p.grad`` into :math:`d = g - \sigma m`, perturb along d, then update m.

        :math:`m` absorbs the step only if the step was not skipped for a non-finite
        gradient (``skip_nonfinite``), so one bad batch does not poison the average.
        """
        if self.is_perturbed:
            super().first_step(zero_grad)  # raises: first_step() twice
        self._centralize_clean_gradients()
        averages = self._buffers.setdefault("fsam_momentum", {})
        parts = []
        for _, ops, params, grads, _ in self._plan():
            fresh = [i for i, p in enumerate(params) if p not in averages]
            known = [i for i in range(len(params)) if i not in fresh]
            d = [grads[i] for i in known]
            m = [averages[params[i]] for i in known]
            if known:  # d = g - sigma m, written over the gradient
                sam_core.friendly_direction(ops, d, m, sigma=self.sigma, out=d)
            parts.append((ops, [params[i] for i in fresh], [grads[i] for i in fresh], m, d))
        super().first_step(zero_grad=False, loss=loss)
        if not getattr(self, "step_skipped", False):
            for ops, fresh, fresh_grads, m, d in parts:
                if fresh:  # the first gradient: m = g (and d was g)
                    torch._foreach_copy_(
                        [self._buffer("fsam_momentum", p) for p in fresh], fresh_grads
                    )
                if m:
                    sam_core.friendly_momentum_update(
                        ops, m, d, sigma=self.sigma, lmbda=self.lmbda, out=m
                    )
        if zero_grad:
            self.zero_grad()


# ----------------------------------------------------------------------------------------
# VaSSO
# ----------------------------------------------------------------------------------------
class VaSSO(_VariantSAM):
    r"""VaSSO: perturb along a moving average of the clean gradients (variance suppression).

    .. math::

        m \leftarrow (1 - \theta)\, m + \theta\, g, \qquad
        e = \rho \frac{T_w^2 m}{\lVert T_w m \rVert + \epsilon}

    with :math:`m` starting as the first gradient (:func:`sam_core.vasso_direction`). Like
    :class:`FriendlySAM`, ``first_step`` leaves the direction in ``p.grad`` and folds it
    into :math:`m` only when the step is not skipped for a non-finite gradient.

    Reference: Li and Giannakis, "Enhancing Sharpness-Aware Optimization Through Variance
    Suppression", NeurIPS 2023 (official default ``theta=0.9``; the official code adds
    ``1e-7`` to the norm where this class uses ``sam_eps``).

    Args:
        params, base_optimizer, **options: as :class:`~sam_torch.SAM`
            (:class:`~sam_torch.SAMOptions`; other keywords go to the base optimizer).
        theta: weight of the new gradient in the average, in [0, 1].

    Cost: two passes per step, one extra parameter-sized buffer (:math:`m`).
    """

    def __init__(
        self,
        params: Params,
        base_optimizer: BaseOptimizer,
        *,
        theta: float = 0.9,
        **options: Unpack[SAMOptions],
    ) -> None:
        sam_core.validate_vasso(theta=theta)
        super().__init__(params, base_optimizer, **options)
        self.theta = theta

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, loss: Any = None) -> None:
        r"""Turn ``p.grad`` into the new average :math:`m`, perturb along it, keep it."""
        if self.is_perturbed:
            super().first_step(zero_grad)  # raises: first_step() twice
        self._centralize_clean_gradients()
        averages = self._buffers.setdefault("vasso_average", {})
        new_average: list[tuple[list[Tensor], list[Tensor]]] = []
        for _, ops, params, grads, _ in self._plan():
            known = [i for i, p in enumerate(params) if p in averages]
            if known:  # fresh parameters start from m = g, i.e. d = g
                d = [grads[i] for i in known]
                sam_core.vasso_direction(
                    ops, d, [averages[params[i]] for i in known], theta=self.theta, out=d
                )
            new_average.append((params, grads))
        super().first_step(zero_grad=False, loss=loss)
        if not getattr(self, "step_skipped", False):
            for params, grads in new_average:
                torch._foreach_copy_([self._buffer("vasso_average", p) for p in params], grads)
        if zero_grad:
            self.zero_grad()


# ----------------------------------------------------------------------------------------
# LookSAM and every-k SAM
# ----------------------------------------------------------------------------------------
class LookSAM(_VariantSAM):
    r"""LookSAM: a full SAM step every ``k`` steps, one pass reusing its direction between.

    Full steps (``variant_step % k == 0``, so the first step is one) are SAM steps that
    also store :math:`g_v`, the component of the SAM gradient :math:`g_s` orthogonal to
    the clean gradient :math:`g`. The other steps compute only :math:`g` and give the base
    optimizer

    .. math::

        g_v = g_s - \frac{\langle g_s, g \rangle}{\lVert g \rVert^2} g, \qquad
        u = g + \alpha \frac{\lVert g \rVert}{\lVert g_v \rVert} g_v

    (:func:`sam_core.looksam_direction`, :func:`sam_core.looksam_gradient`; norms global
    over all groups, Algorithm 1 of the paper; the layer-wise variant is not implemented).
    Reference: Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization",
    CVPR 2022 (``k=5``, ``alpha=0.7``; no official code was released).

    ``step(closure)`` calls the closure twice on full steps and once otherwise;
    :attr:`is_full_step` says which the next step is. ``first_step`` / ``second_step``
    always make a full step, so a loop that drives them by hand does::

        loss_fn(model(x), y).backward()
        if opt.is_full_step:
            opt.first_step(zero_grad=True)
            loss_fn(model(x), y).backward()
            opt.second_step(zero_grad=True)
        else:
            opt.step()  # the gradient at w is there: one pass
            opt.zero_grad()

    Cost: :math:`1 + 1/k` passes per step on average; one extra parameter-sized buffer
    (it holds :math:`g` during a full step, then :math:`g_v`) besides SAM's spare.
    """

    def __init__(
        self,
        params: Params,
        base_optimizer: BaseOptimizer,
        *,
        k: int = 5,
        alpha: float = 0.7,
        **options: Unpack[SAMOptions],
    ) -> None:
        sam_core.validate_looksam(k=k, alpha=alpha)
        super().__init__(params, base_optimizer, **options)
        self.k = k
        self.alpha = alpha
        self.gv_norm: Tensor | None = None

    @property
    def is_full_step(self) -> bool:
        """True when the next ``step(closure)`` is a full (two-pass) SAM step.

        Every ``k``-th step, and also the step after a full step that was skipped for a
        non-finite gradient (there is then no valid :math:`g_v` to reuse).
        """
        return self.variant_step % self.k == 0 or self.gv_norm is None

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, loss: Any = None) -> None:
        """Keep the clean gradient (in the :math:`g_v` buffer), then perturb as SAM does."""
        if not self.is_perturbed:
            self._centralize_clean_gradients()
            self._pending = set()
            for _, _, params, grads, _ in self._plan():
                torch._foreach_copy_([self._buffer("looksam_gv", p) for p in params], grads)
                self._pending.update(params)
        super().first_step(zero_grad, loss=loss)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, loss: Any = None) -> None:
        r"""Store :math:`g_v` from :math:`g_s` and :math:`g`, restore and step with :math:`g_s`."""
        if self.is_perturbed:
            self._store_gv()
        super().second_step(zero_grad, loss=loss)
        if getattr(self, "step_skipped", False):
            self.gv_norm = None  # g_v is not valid: the next step is a full one again
            self._buffers.pop("looksam_gv", None)
        else:
            self.variant_step += 1

    def _store_gv(self) -> None:
        store = self._buffers["looksam_gv"]
        parts = []
        for _, ops, params, grads, _ in self._plan():
            keep = [i for i, p in enumerate(params) if p in self._pending]
            if keep:
                parts.append((ops, [grads[i] for i in keep], [store[params[i]] for i in keep]))
        self._pending = set()
        if not parts:
            return
        dot = _sum_scalars([ops.dot(s, g) for ops, s, g in parts])
        s_norm = torch.sqrt(_sum_scalars([ops.sum_of_squares(s) for ops, s, _ in parts]))
        g_norm = torch.sqrt(_sum_scalars([ops.sum_of_squares(g) for ops, _, g in parts]))
        coefficient = sam_core.projection_coefficient(
            dot, s_norm, g_norm, self.param_groups[0]["sam_eps"]
        )
        sq = []
        for ops, s, g in parts:  # g_v overwrites the stored clean gradient
            g_v = sam_core.orthogonal_component(ops, s, g, coefficient, out=g)
            sq.append(ops.sum_of_squares(g_v))
        self.gv_norm = sam_core.looksam_resolved_norm(torch.sqrt(_sum_scalars(sq)), s_norm)

    @torch.no_grad()
    def _reuse_step(self) -> None:
        store = self._buffers.get("looksam_gv", {})
        parts = []
        for _, ops, params, grads, _ in self._plan():
            keep = [i for i, p in enumerate(params) if p in store]
            if keep:
                parts.append((ops, [grads[i] for i in keep], [store[params[i]] for i in keep]))
        if not parts or self.gv_norm is None:
            return
        g_norm = torch.sqrt(_sum_scalars([ops.sum_of_squares(g) for ops, g, _ in parts]))
        eps = self.param_groups[0]["sam_eps"]
        scale = sam_core.looksam_scale(self.alpha, g_norm, self.gv_norm, eps)
        for ops, g, g_v in parts:
            ops.add_scaled(g, g_v, scale, out=g)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """A full SAM step (two closure calls) or a reuse step (one); returns the clean loss.

        On a reuse step (``not is_full_step``) the closure may be left out when the
        gradient at :math:`w` is already computed, as with a plain optimizer.
        """
        if self.is_full_step:
            return super().step(closure)
        loss = None
        if closure is not None:
            self.zero_grad()
            with torch.enable_grad():
                loss = closure()
        self._reuse_step()
        if self._base_step(loss):
            self.variant_step += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["sam_variant"]["gv_norm"] = self.gv_norm
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        gv_norm = state_dict.get("sam_variant", {}).get("gv_norm")
        super().load_state_dict(state_dict)
        self.gv_norm = gv_norm


class EveryKSAM(_VariantSAM):
    r"""SAM on one step in ``k``, a plain base-optimizer step on the others.

    As MosaicML Composer's ``SAM(interval=k)``: steps with ``(variant_step + 1) % k == 0``
    are SAM steps with the same ``rho`` (Composer does not rescale it), the others call the
    closure once and step the base optimizer with the clean gradient. ``k=1`` is SAM.

    Args:
        params, base_optimizer, **options: as :class:`~sam_torch.SAM`
            (:class:`~sam_torch.SAMOptions`; other keywords go to the base optimizer).
        k: the interval, an int >= 1.

    Cost: :math:`1 + 1/k` passes per step on average; no extra buffer beyond SAM's.
    """

    def __init__(
        self,
        params: Params,
        base_optimizer: BaseOptimizer,
        *,
        k: int = 5,
        **options: Unpack[SAMOptions],
    ) -> None:
        sam_core.validate_interval(k=k)
        super().__init__(params, base_optimizer, **options)
        self.k = k

    @property
    def is_full_step(self) -> bool:
        """True when the next ``step(closure)`` is a SAM (two-pass) step."""
        return (self.variant_step + 1) % self.k == 0

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, loss: Any = None) -> None:
        super().second_step(zero_grad, loss=loss)
        if not getattr(self, "step_skipped", False):
            self.variant_step += 1

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """A SAM step (two closure calls) or a plain step (one); returns the clean loss.

        On a plain step (``not is_full_step``) the closure may be left out when the gradient
        at :math:`w` is already computed, as with a plain optimizer.
        """
        if self.is_full_step:
            return super().step(closure)
        loss = None
        if closure is not None:
            self.zero_grad()
            with torch.enable_grad():
                loss = closure()
        if self._base_step(loss):
            self.variant_step += 1
        return loss


# ----------------------------------------------------------------------------------------
# Momentum-SAM
# ----------------------------------------------------------------------------------------
_MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


class MomentumSAM(_VariantSAM):
    r"""Momentum-SAM (MSAM): perturb against the base optimizer's momentum, one pass per step.

    .. math::

        e = -\rho \frac{v}{\lVert v \rVert + \epsilon}, \qquad
        u = \nabla L(w + e),

    with :math:`v` the base optimizer's momentum (``momentum_buffer`` of SGD,
    ``exp_avg`` of Adam-type optimizers), which already exists, so no clean gradient is
    computed: ``step(closure)`` perturbs, calls the closure once at :math:`w + e`, restores
    :math:`w` exactly and steps (:func:`sam_core.momentum_sam_scale`). On the first step
    there is no momentum yet and the step is a plain one. Unlike the official code, which
    keeps the weights at :math:`w + e` between steps (and needs moving back before
    evaluation), the parameters hold :math:`w` after every step; weight decay therefore
    uses :math:`w`.

    Reference: Becker, Altrichter, Noroozi, "Momentum-SAM: Sharpness Aware Minimization
    without Computational Overhead", 2024 (official SGD default ``rho=0.3``).

    With ``first_step()`` / ``second_step()``, call ``first_step()`` *before* the forward
    and backward pass (it needs no gradient), then ``second_step()``.

    Args:
        params, base_optimizer, **options: as :class:`~sam_torch.SAM`
            (:class:`~sam_torch.MomentumSAMOptions`: no ``adaptive``/``eta``; ``sam_eps`` is
            added to the momentum norm); the base optimizer must keep a momentum
            (``SGD(momentum>0)``, ``Adam``, ``AdamW``, ...). There is no clean gradient:
            ``gc=True`` centralizes the direction :math:`v` (a copy; the momentum buffer is
            left alone) before the perturbation is formed from it.
        rho: length of the perturbation, :math:`\rho \ge 0`.

    Cost: one pass per step and one extra element-wise pass over the parameters.
    """

    def __init__(
        self,
        params: Params,
        base_optimizer: BaseOptimizer,
        *,
        rho: float = 0.3,
        **options: Unpack[MomentumSAMOptions],
    ) -> None:
        for key in ("adaptive", "eta"):
            if key in options:
                raise TypeError(
                    f"MomentumSAM takes no {key}=: its perturbation is -rho * v / (||v|| + "
                    "sam_eps) along the base optimizer's momentum v, with no adaptive (ASAM) "
                    "form; use SAM(adaptive=True) or another variant for ASAM"
                )
        super().__init__(params, base_optimizer, rho=rho, **options)
        if type(self.base_optimizer).__name__ == "ZeroRedundancyOptimizer":
            raise ValueError(
                "MomentumSAM perturbs every parameter along its momentum, and "
                "ZeroRedundancyOptimizer keeps each parameter's momentum only on the rank that "
                "owns it; shard the model with FSDP2 (torch.distributed.fsdp.fully_shard) "
                "instead, or use SAM, which needs no optimizer state to perturb"
            )
        _check_keeps_momentum(self.base_optimizer)
        # The gradient at w + e is the step's only gradient: SAM's default policy ("clean",
        # the gradient the step is built from) means checking it here.
        self._check_perturbed = bool(self.skip_nonfinite)

    def _momentum(self, p: Tensor) -> Tensor | None:
        state = self.state.get(p, {})
        for key in _MOMENTUM_KEYS:
            buf = state.get(key)
            if isinstance(buf, Tensor):
                return buf
        return None

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, loss: Any = None) -> None:
        r"""Move every parameter with a momentum to :math:`w - \rho v / \lVert v \rVert`."""
        if self.is_perturbed:
            raise RuntimeError(
                "first_step() was called twice without second_step(): the parameters already "
                "hold w + e. Call second_step() (or restore()) before perturbing again."
            )
        plan = []
        for group in self.param_groups:
            params = [p for p in group["params"] if self._momentum(p) is not None]
            for part in _by_device_and_dtype(params) if params else ():
                device, dtype = part[0].device, part[0].dtype
                ops = TorchOps(device, dtype, foreach=self._use_foreach(device))
                velocity = [self._momentum(p) for p in part]
                if self.gc:  # the direction is centralized, the momentum buffer left alone
                    scratch = [self._buffer("msam_gc_direction", p, persistent=False) for p in part]
                    velocity = sam_core.centralize(ops, velocity, out=scratch)
                plan.append((group, ops, part, velocity))
        if not plan:
            if self.variant_step > 0:
                raise RuntimeError(
                    "MomentumSAM found no momentum buffer after a base optimizer step: the base "
                    "optimizer keeps none (e.g. SGD with momentum=0). Use SGD(momentum=0.9), "
                    "Adam or AdamW as base_optimizer, or SAM."
                )
            self.grad_norm = None
            self._perturbed = True
            return
        norm = torch.sqrt(_sum_scalars([ops.sum_of_squares(v) for _, ops, _, v in plan]))
        self.step_skipped = False
        try:
            for group, ops, params, velocity in plan:
                scale = sam_core.momentum_sam_scale(group["rho"], norm, group["sam_eps"])
                out = [self._spare_for(p) for p in params]
                perturbed = sam_core.apply_perturbation(ops, params, velocity, scale, out=out)
                self._install(params, perturbed)
        except BaseException:  # never leave some parameters perturbed
            self.restore()
            raise
        self.grad_norm = norm
        self._perturbed = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, loss: Any = None) -> None:
        super().second_step(zero_grad, loss=loss)
        if not getattr(self, "step_skipped", False):
            self.variant_step += 1

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perturb along the momentum, call the closure once at :math:`w + e`, step."""
        if closure is None:
            raise RuntimeError(
                "MomentumSAM.step() needs a closure that zeroes the grads, computes the loss, "
                "calls backward() and returns the loss; it is called once, at w + e."
            )
        self.first_step()
        try:
            self.zero_grad()
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            self.restore()
            raise
        if self.skip_nonfinite and isinstance(loss, Tensor):
            self._perturbed_loss_finite = torch.isfinite(loss.detach()).all()
        self._in_closure_step = True
        try:
            self.second_step()
        finally:
            self._in_closure_step = False
        self.loss = None
        self.perturbed_loss = _detached(loss)
        return loss


# ----------------------------------------------------------------------------------------
# AE-SAM
# ----------------------------------------------------------------------------------------
class AESAM(_VariantSAM):
    r"""AE-SAM: a SAM step only where the squared clean-gradient norm is large, else a base step.

    Each step folds :math:`x_t = \lVert g_t \rVert^2` (the clean gradient, global over all
    groups) into exponential moving statistics and takes SAM's step when it exceeds their
    mean by :math:`c_t` standard deviations, the base optimizer's step with :math:`g_t`
    otherwise:

    .. math::

        \mu_t = \delta \mu_{t-1} + (1 - \delta) x_t, \qquad
        \sigma_t^2 = \delta \sigma_{t-1}^2 + (1 - \delta) (x_t - \mu_t)^2, \qquad
        \text{SAM step} \iff x_t \ge \mu_t + c_t \sigma_t,

    from :math:`\mu_{-1} = \sigma_{-1}^2 = 0`, with the linear schedule
    :math:`c_t = \frac{t'}{T} \lambda_1 + (1 - \frac{t'}{T}) \lambda_2`,
    :math:`t' = \min(t, T)`, :math:`\lambda_2` = ``c_start``, :math:`\lambda_1` = ``c_end``,
    :math:`T` = ``total_steps`` and :math:`t` the steps taken so far
    (:func:`sam_core.ae_sam_statistics`, :func:`sam_core.ae_sam_threshold`,
    :func:`sam_core.ae_sam_is_sam_step`). Under the paper's model (:math:`x_t` normal) step
    :math:`t` is a SAM step with probability :math:`1 - \Phi(c_t)`: from 16 % at
    :math:`c = 1` to 84 % at :math:`c = -1`, half the steps over the whole run with the
    defaults; while :math:`\mu_t` warms up from 0 (about :math:`1 / (1 - \delta)` steps)
    most steps are SAM steps. Reference: Jiang, Yang, Zhang and Kwok, "An Adaptive Policy to Employ
    Sharpness-Aware Minimization", ICLR 2023 (Algorithm 1: the statistics updated with
    :math:`x_t` before the comparison, the variance about the updated mean; the comparison
    :math:`\ge`). The defaults ``delta=0.9``, ``c_start=1``, ``c_end=-1`` are the values
    we take from the paper's experimental setup (a SAM fraction of about one half); the
    statistics' zero start is the plain EMA convention.

    Args:
        params, base_optimizer, **options: as :class:`~sam_torch.SAM`
            (:class:`~sam_torch.SAMOptions`; other keywords go to the base optimizer).
        delta: the EMA constant :math:`\delta \in (0, 1)`.
        c_start, c_end: :math:`c_t` at the first step and from step ``total_steps`` on.
        total_steps: :math:`T`, the length of the schedule (the run's number of steps).
            ``None``: :math:`c_t = (c_{start} + c_{end}) / 2` throughout (0 with the
            defaults: half the steps, without the paper's rise over training).

    The decision needs the clean gradient, so it is made in ``first_step()`` (or after the
    clean pass of ``step(closure)``) and recorded in :attr:`last_step_was_sam`.
    ``step(closure)`` calls the closure once on a plain step and twice on a SAM step. In
    the two-step API ``first_step()`` decides and perturbs only on a SAM step, and
    ``second_step()`` takes the base step either way; a loop that pays one pass on plain
    steps runs the perturbed pass only when :attr:`is_perturbed`::

        loss_fn(model(x), y).backward()
        opt.first_step()                 # decides; perturbs on a SAM step only
        if opt.is_perturbed:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)  # the base step with g_s or g

    (A loop that always runs the second pass is still correct: on a plain step the
    parameters are at :math:`w`, so it recomputes :math:`g_t`.)

    Cost: :math:`1 + f` passes per step, :math:`f` the fraction of SAM steps
    (:attr:`sam_steps` / :attr:`variant_step`); one host read of :math:`x_t` per step (the
    branch depends on it); no buffer beyond SAM's spare. The statistics are Python floats
    (float64), saved by :meth:`state_dict`. A non-finite :math:`x_t` leaves them unchanged
    and makes a plain step, which ``skip_nonfinite`` then skips.
    """

    def __init__(
        self,
        params: Params,
        base_optimizer: BaseOptimizer,
        *,
        delta: float = 0.9,
        c_start: float = 1.0,
        c_end: float = -1.0,
        total_steps: int | None = None,
        **options: Unpack[SAMOptions],
    ) -> None:
        sam_core.validate_ae_sam(
            delta=delta, c_start=c_start, c_end=c_end, total_steps=total_steps
        )
        super().__init__(params, base_optimizer, **options)
        self.delta = float(delta)
        self.c_start = float(c_start)
        self.c_end = float(c_end)
        self.total_steps = total_steps
        #: :math:`\mu_t` and :math:`\sigma_t^2`, the running statistics of :math:`x_t`.
        self.sq_norm_mean = 0.0
        self.sq_norm_var = 0.0
        #: :math:`x_t` of the last decision (``None`` before the first, or without gradients).
        self.sq_grad_norm: float | None = None
        #: Whether the last (or current) step is a SAM step; ``None`` before the first.
        self.last_step_was_sam: bool | None = None
        #: Number of SAM steps taken (not skipped); plain ones are ``variant_step - sam_steps``.
        self.sam_steps = 0
        self._decision: bool | None = None

    @property
    def threshold(self) -> float:
        """:math:`c_t` of the next decision."""
        return float(
            sam_core.ae_sam_threshold(
                self.variant_step, total_steps=self.total_steps,
                c_start=self.c_start, c_end=self.c_end,
            )
        )

    def _decide(self) -> bool:
        """Fold :math:`x_t` into the statistics and choose SAM or a plain step, once per step."""
        if self._decision is not None:
            return self._decision
        plan = self._plan()
        decision = False
        if plan:
            sq = float(_sum_scalars([ops.sum_of_squares(grads) for _, ops, _, grads, _ in plan]))
            self.sq_grad_norm = sq
            if math.isfinite(sq):
                c = self.threshold
                mean, var = sam_core.ae_sam_statistics(
                    sq, self.sq_norm_mean, self.sq_norm_var, delta=self.delta
                )
                self.sq_norm_mean, self.sq_norm_var = mean, var
                decision = bool(sam_core.ae_sam_is_sam_step(sq, mean, var, c))
        else:
            self.sq_grad_norm = None
        self._decision = decision
        self.last_step_was_sam = decision
        return decision

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, loss: Any = None) -> None:
        """Decide from the clean gradient; on a SAM step perturb as SAM does, else nothing."""
        if self.is_perturbed or self._decide():
            super().first_step(zero_grad, loss=loss)
            return
        self._clean_loss = _detached(loss)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, loss: Any = None) -> None:
        """The base step: with :math:`\\nabla L(w + e)` after a SAM decision, else with the
        gradient at :math:`w` as it is."""
        if self._decision is False and not self.is_perturbed:
            self._decision = None
            if self._base_step(self._clean_loss):
                self.variant_step += 1
            if zero_grad:
                self.zero_grad()
            return
        super().second_step(zero_grad, loss=loss)
        self._decision = None
        if not getattr(self, "step_skipped", False):
            self.variant_step += 1
            self.sam_steps += 1

    @torch.no_grad()
    def restore(self) -> None:
        """As :meth:`SAM.restore <sam_torch.SAM.restore>`; also cancels a pending decision."""
        self._decision = None
        super().restore()

    def _one_pass_step(self, loss: Any) -> bool:
        if self._decide():
            return False
        self._decision = None
        if self._base_step(loss):
            self.variant_step += 1
        return True

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["sam_variant"]["ae_sam"] = {
            "sq_norm_mean": self.sq_norm_mean,
            "sq_norm_var": self.sq_norm_var,
            "sam_steps": self.sam_steps,
            "last_step_was_sam": self.last_step_was_sam,
            "sq_grad_norm": self.sq_grad_norm,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("sam_variant", {}).get("ae_sam")
        super().load_state_dict(state_dict)
        if saved is not None:
            self.sq_norm_mean = float(saved["sq_norm_mean"])
            self.sq_norm_var = float(saved["sq_norm_var"])
            self.sam_steps = int(saved["sam_steps"])
            self.last_step_was_sam = saved["last_step_was_sam"]
            self.sq_grad_norm = saved["sq_grad_norm"]
        self._decision = None
