r"""Mixed precision: :class:`SAM` with ``torch.amp.GradScaler``.

A ``GradScaler`` allows one ``unscale_()`` per optimizer between two ``update()`` calls, but
SAM runs two backward passes per step, and both need real (unscaled) gradients: the first
for the perturbation :math:`e = \rho\, g / \lVert g \rVert`, the second for the base step
and for gradient clipping. Calling ``scaler.unscale_(sam)`` in both passes raises
"unscale_() has already been called on this optimizer since the last update()"; calling
``scaler.step(sam)`` cannot work either (it calls ``sam.step()`` without a closure).

:class:`ScaledSAM` treats each pass as one scaler iteration, through ``GradScaler``'s public
API only: scale the loss, ``unscale_()`` (once), then ``update()``. So both passes are
scaled and unscaled exactly once, an ``inf``/``NaN`` in either pass backs the scale off, and
the step is then skipped with the weights restored bit for bit (SAM's ``restore()``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._entry import entry_point
from ._rng import RNGReplay
from ._sam import SAM, _all_finite

__all__ = ["ScaledSAM"]


def _sam_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[0].optimizer


class ScaledSAM:
    """Drives a :class:`SAM` optimizer with a ``torch.amp.GradScaler`` (float16 autocast).

    Two-step API, with optional gradient clipping between unscaling and the step::

        scaler = torch.amp.GradScaler("cuda", growth_interval=4000)
        sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.05)
        amp = ScaledSAM(sam, scaler)
        for x, y in loader:
            with torch.autocast("cuda", dtype=torch.float16):
                loss = loss_fn(model(x), y)
            amp.scale(loss).backward()
            amp.first_step(zero_grad=True)       # unscale, update the scaler, perturb
            with torch.autocast("cuda", dtype=torch.float16):
                loss = loss_fn(model(x), y)
            amp.scale(loss).backward()
            amp.unscale_()                        # optional: real gradients for clipping
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            amp.second_step(zero_grad=True)      # restore, base step unless inf, update

    Closure API (``amp.step(closure)``): the closure runs the forward under autocast, calls
    ``amp.scale(loss).backward()`` and returns the loss; the gradients are set to ``None``
    before each call. This is also the way to use float16 mixed precision with Lightning:
    manual optimization (``self.automatic_optimization = False``) with a ``ScaledSAM`` in
    ``training_step``; Lightning's ``precision="16-mixed"`` under automatic optimization
    calls ``scaler.step(optimizer)`` without a closure, which SAM cannot run and refuses
    with an error that says so (``"bf16-mixed"`` needs no scaler and works).

    Semantics:

    * Each pass is one ``GradScaler`` iteration (``unscale_`` then ``update``), so the
      scaler's ``growth_interval`` counts passes, two per SAM step: pass twice the number
      of steps you want between growths.
    * An ``inf``/``NaN`` in the clean gradient: the scale backs off, nothing is perturbed,
      no base step is taken (the second pass runs at :math:`w` and only updates the scaler;
      ``step(closure)`` does not even run it). An ``inf``/``NaN`` in the perturbed gradient:
      the scale backs off, :math:`w` is restored exactly and no base step is taken. Either
      way :attr:`SAM.step_skipped` is ``True`` and the optimizer state is unchanged. This
      holds whatever the optimizer's ``skip_nonfinite`` flag. On accelerators (where
      ``SAM`` defers its clean-gradient check to ``second_step()`` to avoid a host sync)
      the perturbed pass still runs after an ``inf`` in the clean pass, at non-finite
      weights, so the scale backs off twice for that step.
    * ``bfloat16`` autocast needs no scaler: use :class:`SAM` directly (its norms
      accumulate in float32). A disabled scaler (``enabled=False``) makes this class a
      transparent wrapper.

    Args:
        optimizer: the :class:`SAM` optimizer (or a subclass) to drive.
        scaler: a ``torch.amp.GradScaler`` (``"cuda"``, ``"cpu"``, ...) dedicated to it;
            save and load its ``state_dict()`` with the model's and the optimizer's.
    """

    def __init__(self, optimizer: SAM, scaler: torch.amp.GradScaler) -> None:
        if not isinstance(optimizer, SAM):
            raise TypeError(
                f"optimizer must be a sam_torch.SAM, got {type(optimizer).__name__}; build "
                "SAM(params, torch.optim.SGD, ...) and pass it"
            )
        if not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(
                f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}; pass "
                "torch.amp.GradScaler('cuda') (or 'cpu')"
            )
        self.optimizer = optimizer
        self.scaler = scaler
        self._unscaled = False

    def scale(self, outputs: Any) -> Any:
        """``scaler.scale(outputs)``: multiply the loss by the current scale before backward."""
        return self.scaler.scale(outputs)

    def unscale_(self) -> None:
        """Unscale the gradients of the current pass in place (once; later calls do nothing).

        Call it before clipping or inspecting gradients; ``first_step``/``second_step``
        call it themselves when it has not been called.
        """
        if not self._unscaled:
            self.scaler.unscale_(self.optimizer)
            self._unscaled = True

    def _end_pass(self) -> None:
        """Close the pass's scaler iteration; a pass that never unscaled records nothing."""
        if self._unscaled:
            self._unscaled = False
            self.scaler.update()

    @entry_point("first_step", sam_of=_sam_of)
    def first_step(self, zero_grad: bool = False, *, loss: Any = None) -> None:
        """Unscale the clean gradient, update the scaler and perturb (unless it is not finite).

        ``loss``: the clean (unscaled) loss, optional, for :attr:`SAM.loss` and
        :attr:`SAM.sharpness`.
        """
        sam = self.optimizer
        if sam.is_perturbed:  # before unscaling, so the scaler is left as it was
            sam.first_step()  # raises the "called twice" error
        try:
            self.unscale_()
            if sam.skip_nonfinite or _all_finite(_grads(sam)):
                sam.first_step(zero_grad=zero_grad, loss=loss)
            else:  # the optimizer lets NaN through; the scaler must not
                sam._enter_skipped_step(zero_grad=zero_grad)
        finally:
            self._end_pass()

    @entry_point("second_step", sam_of=_sam_of)
    def second_step(self, zero_grad: bool = False, *, loss: Any = None) -> None:
        """Unscale the perturbed gradient, restore :math:`w`, step unless it is not finite.

        ``loss``: the perturbed (unscaled) loss, optional, for :attr:`SAM.perturbed_loss`.
        """
        sam = self.optimizer
        if not sam.is_perturbed:
            sam.second_step()  # raises the "without first_step()" error
        try:
            self.unscale_()
            # SAM checks the perturbed gradient itself unless skip_nonfinite=False
            if sam.skip_nonfinite or _all_finite(_grads(sam)):
                sam.second_step(zero_grad=zero_grad, loss=loss)
            else:
                sam.restore()
                if zero_grad:
                    sam.zero_grad()
                sam._finish_step(True)
        except BaseException:
            sam.restore()
            raise
        finally:
            self._end_pass()

    @entry_point("step", sam_of=_sam_of)
    def step(self, closure: Callable[[], Any]) -> Any:
        """One SAM step with the closure called at :math:`w` and at :math:`w + e`.

        The closure computes the loss under autocast, calls ``amp.scale(loss).backward()``
        and returns the (unscaled) loss, which this returns; the gradients are set to
        ``None`` before each call. With ``SAM(..., model=model)`` the perturbed call runs
        with the model's batch-norm running statistics frozen, and with the SAM's
        ``dropout="same"`` (default) the perturbed call draws the clean call's dropout masks.
        If the second call raises, :math:`w` is restored before the exception propagates.
        """
        sam = self.optimizer
        if not callable(closure):
            raise TypeError(
                f"closure must be a callable taking no arguments, got {type(closure).__name__}"
            )
        # dropout="same": the perturbed call draws the clean call's masks (see SAM.step)
        replay = (
            RNGReplay([p for g in sam.param_groups for p in g["params"]])
            if sam.dropout == "same" else contextlib.nullcontext()
        )
        sam.zero_grad()
        with torch.enable_grad():
            loss = closure()
        self.first_step()
        if sam.step_skipped:  # non-finite clean gradient: skip the perturbed pass too
            sam.restore()
            sam.loss, sam.perturbed_loss = _detached(loss), None
            sam._finish_step(True)
            return loss
        try:
            sam.zero_grad()
            with torch.enable_grad(), sam._frozen_stats(), replay:
                perturbed_loss = closure()
        except BaseException:
            sam.restore()
            self._end_pass()  # if the closure unscaled, the scaler must not stay mid-iteration
            raise
        self.second_step()
        sam.loss, sam.perturbed_loss = _detached(loss), _detached(perturbed_loss)
        return loss


def _grads(sam: SAM) -> list[Tensor]:
    return [p.grad for g in sam.param_groups for p in g["params"] if p.grad is not None]


def _detached(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x
