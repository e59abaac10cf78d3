r"""ESAM for PyTorch: stochastic weight perturbation and sharpness-sensitive data selection."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from typing_extensions import Unpack

import sam_core

from ._ops import TorchOps
from ._options import BaseOptimizer, Params, SAMOptions
from ._rng import RNGReplay
from ._sam import SAM

__all__ = ["ESAM"]

#: A per-example loss closure: ``closure()`` the whole batch, ``closure(index)`` a subset.
PerExampleClosure = Callable[..., Tensor]


class ESAM(SAM):
    r"""Efficient SAM (ESAM): stochastic weight perturbation and sharpness-sensitive data
    selection.

    .. math::

        e = \frac{\rho}{\beta}\, \frac{T_w^2 (m \odot g)}{\lVert T_w (m \odot g) \rVert
            + \epsilon}, \quad m \sim \mathrm{Bernoulli}(\beta), \qquad
        u = \nabla_w \frac{1}{k} \sum_{i \in \mathcal{B}^+} \ell_i(w + e),

    with :math:`\mathcal{B}^+` the :math:`k = \max(1, \lfloor \gamma B \rfloor)` examples
    of the batch whose loss rises most, :math:`\ell_i(w + e) - \ell_i(w)`; the base
    optimizer steps from :math:`w` with :math:`u` (:mod:`sam_core._esam`). What is followed:
    the paper's two rules, with the official code's choices where the paper leaves room: the
    norm is that of the masked gradient, the mask is drawn per parameter *tensor*
    (``mask="tensor"``, the default; ``mask="element"`` draws one per weight, the paper's
    formula), the perturbed loss is the mean over the selected examples. Unlike the official
    code, exactly :math:`k` examples are kept (it keeps those strictly above the
    :math:`k`-th increase) and the user's ``requires_grad`` flags are never changed, so the
    clean backward computes every weight's gradient (the official code skips the masked
    tensors' weight gradients there).

    Reference: Du et al., "Efficient Sharpness-aware Minimization for Improved Training of
    Neural Networks", ICLR 2022 (``beta=0.5``, ``gamma=0.5`` in its CIFAR runs).

    **The per-example loss contract.** ``step(closure)`` takes a closure
    ``closure(index=None)`` that returns the *per-example* losses (shape ``(B,)``, e.g.
    ``reduction="none"``) of the batch, or of the examples ``index`` (a ``LongTensor`` of
    positions in the batch, on the losses' device, increasing) when given, and does **not**
    call ``backward()``; ESAM calls ``backward()`` on their mean::

        def closure(index=None):
            x, y = (inputs, targets) if index is None else (inputs[index], targets[index])
            return F.cross_entropy(model(x), y, reduction="none")

        loss = optimizer.step(closure)   # mean clean loss

    Per step it calls ``closure()`` at :math:`w` with a backward, ``closure()`` at
    :math:`w + e` under ``torch.no_grad()`` (the selection's forward) and
    ``closure(index)`` at :math:`w + e` with a backward on the :math:`k` selected examples
    (with :math:`\gamma = 1` the last two are one call, ``closure()``, as for SAM). The
    selection's forward replays the clean call's dropout masks (``dropout="same"``), so the
    loss increase is the weights', not the masks'; the selected call draws fresh ones.
    With ``model=...`` both perturbed calls run with batch-norm statistics frozen.
    :attr:`selected` holds the last step's indices (``None``: the whole batch).

    The two-step API works too: ``loss_fn(per_example).mean().backward()``,
    ``first_step()``, ``index = select(clean, perturbed)`` from a no-grad forward at
    :math:`w + e`, the backward of the selected examples' mean, ``second_step()``.

    Args:
        params, base_optimizer, **options: as :class:`~sam_torch.SAM`
            (:class:`~sam_torch.SAMOptions`; other keywords go to the base optimizer).
        beta: probability that a weight (or tensor) is perturbed, in (0, 1].
        gamma: fraction of the batch the perturbed gradient is taken on, in (0, 1].
        mask: ``"tensor"`` (one draw per parameter tensor) or ``"element"``.
        seed: seed of the mask generator (a CPU ``torch.Generator`` whose state is saved
            in :meth:`state_dict`, so a resumed run draws the same masks).

    Cost per step: one forward-backward on the batch, one forward without backward and a
    forward-backward on :math:`\gamma B` examples (:math:`\gamma = 1`: two forward-backward
    passes, SAM's); no buffer beyond SAM's, plus the masks of ``mask="element"`` (drawn on
    the CPU and copied, one parameter-sized boolean set per step).
    """

    def __init__(
        self,
        params: Params,
        base_optimizer: BaseOptimizer,
        *,
        beta: float = 0.5,
        gamma: float = 0.5,
        mask: Literal["tensor", "element"] = "tensor",
        seed: int = 0,
        **options: Unpack[SAMOptions],
    ) -> None:
        sam_core.validate_esam(beta=beta, gamma=gamma, mask=mask, seed=seed)
        super().__init__(params, base_optimizer, **options)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.mask = mask
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        #: The last step's selected indices (``None``: the whole batch).
        self.selected: Tensor | None = None

    # -- SWP --------------------------------------------------------------------------
    def _params_in_order(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def sample_masks(self) -> list[Tensor]:
        """Draw the next step's masks from :attr:`generator`, one per parameter in
        param-group order: a 0-d bool tensor (``mask="tensor"``) or a bool tensor of the
        parameter's shape (``mask="element"``), on the CPU. Every parameter gets its draw,
        with a gradient or not, so the stream does not depend on which ones have one."""
        params = self._params_in_order()
        if self.mask == "tensor":
            draws = torch.rand(len(params), generator=self.generator, dtype=torch.float64)
            return list((draws < self.beta).unbind(0))
        return [
            torch.rand(p.shape, generator=self.generator, dtype=torch.float64) < self.beta
            for p in params
        ]

    @torch.no_grad()
    def _mask_gradients(self, masks: Sequence[Any] | None) -> None:
        params = self._params_in_order()
        if masks is None:
            if self.beta == 1.0:
                return  # every weight kept: SAM's perturbation exactly, no draw
            masks = self.sample_masks()
        masks = list(masks)
        if len(masks) != len(params):
            raise ValueError(
                f"masks must hold one mask per parameter ({len(params)}, in param-group "
                f"order), got {len(masks)}"
            )
        dropped: list[Tensor] = []
        grads: list[Tensor] = []
        factors: list[Tensor] = []
        for i, (p, m) in enumerate(zip(params, masks, strict=True)):
            if p.grad is None:
                continue
            m = torch.as_tensor(m)
            if m.ndim == 0:
                if not bool(m):
                    dropped.append(p.grad)
                continue
            if m.shape != p.shape:
                raise ValueError(
                    f"masks[{i}] must be a bool/0-1 scalar or have the parameter's shape "
                    f"{tuple(p.shape)}, got shape {tuple(m.shape)}"
                )
            grads.append(p.grad)
            factors.append(m.to(device=p.grad.device, dtype=p.grad.dtype, non_blocking=True))
        if dropped:  # m = 0 for the whole tensor: m * g = 0
            torch._foreach_zero_(dropped)
        for gs, ms in _by_device_dtype(grads, factors):
            ops = TorchOps(gs[0].device, gs[0].dtype, foreach=self._use_foreach(gs[0].device))
            sam_core.swp_masked_gradient(ops, gs, ms, out=gs)

    @torch.no_grad()
    def first_step(
        self, zero_grad: bool = False, *, loss: Any = None, masks: Sequence[Any] | None = None
    ) -> None:
        r"""Mask the clean gradient (SWP) and perturb to :math:`w + e` with radius
        :math:`\rho/\beta`. ``masks``: one per parameter in param-group order (a bool per
        tensor or a bool tensor of its shape) instead of drawing them (:meth:`sample_masks`).
        """
        if self.is_perturbed:
            super().first_step(zero_grad)  # raises: first_step() twice
        self._centralize_clean_gradients()
        self._mask_gradients(masks)
        radii = [group["rho"] for group in self.param_groups]
        try:
            for group in self.param_groups:
                group["rho"] = sam_core.swp_rho(group["rho"], self.beta)
            super().first_step(zero_grad, loss=loss)
        finally:
            for group, rho in zip(self.param_groups, radii, strict=True):
                group["rho"] = rho

    # -- SDS --------------------------------------------------------------------------
    def select(self, clean_losses: Tensor, perturbed_losses: Tensor) -> Tensor | None:
        r"""The indices (increasing) of the :math:`k = \max(1, \lfloor \gamma B \rfloor)`
        examples with the largest :math:`\ell_i(w + e) - \ell_i(w)`; ``None`` when that is
        the whole batch."""
        clean = _per_example("clean_losses", clean_losses)
        perturbed = _per_example("perturbed_losses", perturbed_losses, like=clean)
        k = sam_core.sds_count(clean.numel(), self.gamma)
        if k == clean.numel():
            return None
        return sam_core.sds_select(
            clean.detach(), perturbed.detach(), k,
            top_k=lambda x, n: torch.topk(x, n, sorted=False).indices,
            sort=lambda i: torch.sort(i).values,
        )

    def step(  # type: ignore[override]
        self, closure: PerExampleClosure | None = None, *, masks: Sequence[Any] | None = None
    ) -> Tensor:
        """One ESAM step with a per-example loss closure (class docstring); returns the
        mean clean loss (detached). ``masks`` as in :meth:`first_step`."""
        if closure is None or not callable(closure):
            raise TypeError(
                "ESAM.step needs closure(index=None) returning the per-example losses (shape "
                "(B,), e.g. reduction='none') of the batch or of batch[index], without calling "
                "backward(); got "
                + ("no closure" if closure is None else type(closure).__name__)
            )
        if self.is_perturbed:
            raise RuntimeError(
                "step(closure) called between first_step() and second_step(): finish the "
                "two-step API with second_step() (or restore()) before calling step()."
            )
        replay = RNGReplay(self._params_in_order()) if self.dropout == "same" else None
        self.zero_grad()
        with torch.enable_grad():
            losses = _per_example("closure()", closure(), graph=True)
            losses.mean().backward()
        clean = losses.detach()
        self.first_step(masks=masks)
        if self._skip_base_step:  # non-finite clean gradient: nothing perturbed
            self.restore()
            self.loss, self.perturbed_loss, self.selected = clean.mean(), None, None
            self._finish_step(True)
            return self.loss
        try:
            k = sam_core.sds_count(clean.numel(), self.gamma)
            self.zero_grad()
            if k == clean.numel():  # gamma = 1: SAM's perturbed pass
                index = None
                with torch.enable_grad(), self._frozen_stats():
                    chosen = _per_example("closure()", closure(), like=clean, graph=True)
                    chosen.mean().backward()
                perturbed = chosen.detach()
            else:
                with torch.no_grad(), self._frozen_stats(), _maybe(replay):
                    perturbed = _per_example("closure()", closure(), like=clean)
                index = self.select(clean, perturbed)
                with torch.enable_grad(), self._frozen_stats():
                    chosen = _per_example(
                        "closure(index)", closure(index), graph=True, size=k
                    )
                    chosen.mean().backward()
        except BaseException:
            self.restore()
            raise
        if self.skip_nonfinite and not self._check_perturbed:
            self._perturbed_loss_finite = torch.isfinite(chosen.detach()).all()
        self._in_closure_step = True
        try:
            self.second_step()
        finally:
            self._in_closure_step = False
        self.selected = index
        self.loss = clean.mean()
        self.perturbed_loss = perturbed.mean()
        return self.loss

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """SAM's state dict plus the mask generator's state (``"esam"``)."""
        state = super().state_dict()
        state["esam"] = {"generator": self.generator.get_state()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved; the mask stream continues where it stopped."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("esam", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.generator.set_state(extra["generator"])


def _per_example(
    what: str,
    losses: Any,
    *,
    like: Tensor | None = None,
    graph: bool = False,
    size: int | None = None,
) -> Tensor:
    """Check the per-example loss contract: a 1-D tensor (of ``like``'s or ``size`` length)."""
    if not isinstance(losses, Tensor) or losses.ndim != 1 or losses.numel() < 1:
        got = (
            f"a tensor of shape {tuple(losses.shape)}" if isinstance(losses, Tensor)
            else type(losses).__name__
        )
        raise ValueError(
            f"ESAM: {what} must return the per-example losses, a 1-D tensor of shape (B,) "
            f"(use reduction='none'), got {got}"
        )
    expected = like.numel() if like is not None else size
    if expected is not None and losses.numel() != expected:
        raise ValueError(
            f"ESAM: {what} returned {losses.numel()} per-example losses, expected {expected} "
            "(the same batch at w + e; closure(index) must return the losses of batch[index])"
        )
    if graph and not losses.requires_grad:
        raise ValueError(
            f"ESAM: {what} returned losses without an autograd graph: compute them from the "
            "model's parameters and do not call backward() or detach() in the closure (ESAM "
            "calls backward() on their mean)"
        )
    return losses


class _maybe:
    """``ctx`` or nothing."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def __enter__(self) -> None:
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _by_device_dtype(grads: list[Tensor], factors: list[Tensor]) -> list[tuple[list[Tensor], list[Tensor]]]:
    groups: dict[tuple[Any, Any], tuple[list[Tensor], list[Tensor]]] = {}
    for g, m in zip(grads, factors, strict=True):
        key = (g.device, g.dtype)
        groups.setdefault(key, ([], []))
        groups[key][0].append(g)
        groups[key][1].append(m)
    return list(groups.values())
