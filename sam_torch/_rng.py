r"""The same dropout masks in both passes of a SAM step: :class:`RNGReplay`.

SAM's two passes of a step evaluate one sampled objective :math:`L_{B,\xi}(w)` (batch
:math:`B`, dropout masks :math:`\xi`) at :math:`w` and at :math:`w + e`: :math:`e` is the
ascent direction of that objective, so its gradient is taken there, and
:math:`L_{B,\xi}(w + e) - L_{B,\xi}(w)` is a sharpness term (with fresh masks it is the
difference of two dropout samples, which does not vanish as :math:`\rho \to 0`). Masks are
drawn fresh at every step. Replaying torch's random-number generators before the perturbed
pass gives that, for dropout and any other random op of the forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["RNGReplay"]

_Devices = nn.Module | Iterable[Any] | None


class RNGReplay:
    r"""The random-number generators' state now, to draw the same dropout masks again later.

    Built before the clean pass of a step; the ``with`` block then runs with the generators
    where they were at construction, so the perturbed pass draws the clean pass's dropout
    masks (and every other random number of the forward: stochastic depth, noise). On exit
    the generators are put back where the block found them, so the random stream after the
    step is the one a plain optimizer's loop leaves, and the next step draws fresh masks.
    The two-step API with the same masks in both passes::

        replay = sam_torch.RNGReplay(model)       # before the clean forward
        loss_fn(model(x), y).backward()           # masks xi drawn
        sam.first_step(zero_grad=True)
        with replay:                              # masks xi again
            loss_fn(model(x), y).backward()
        sam.second_step(zero_grad=True)

    With gradient accumulation take one per micro-batch before its clean pass and enter each
    before the same micro-batch's perturbed pass. An instance may be entered any number of
    times (not nested in itself). :meth:`SAM.step <sam_torch.SAM.step>` (closure called
    twice), :class:`~sam_torch.ScaledSAM`, :func:`~sam_torch.m_sharpness_step` and
    ``SAMTrainer`` do this themselves (``dropout="same"``, the default).

    Which generators: torch's CPU generator always, and the default generator of each
    accelerator device given (CUDA, or any device type whose ``torch.<type>`` module has
    ``get_rng_state``; others have no default generator and are left out). A user-made ``torch.Generator`` passed to an op explicitly is not
    replayed. Cost: one ``get_rng_state`` per generator at construction and one
    ``get_rng_state`` and two ``set_rng_state`` per block: small host copies (the CPU
    generator's 5 KB; a CUDA generator's seed and offset), no device synchronization.

    Args:
        devices: a module (the devices of its parameters and buffers), an iterable of
            devices (``torch.device``, ``"cuda:1"``, a CUDA index) or of tensors (their
            devices), or ``None``: the CPU generator, and every CUDA device's when CUDA is
            initialized (what ``torch.random.fork_rng`` replays by default).
    """

    def __init__(self, devices: _Devices = None) -> None:
        self.devices = _accelerator_devices(devices)
        self._saved = _get_states(self.devices)
        self._resume: list[Tensor] | None = None

    def __enter__(self) -> RNGReplay:
        if self._resume is not None:
            raise RuntimeError("RNGReplay: this replay is already active; it cannot be nested in itself")
        self._resume = _get_states(self.devices)
        _set_states(self.devices, self._saved)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        resume, self._resume = self._resume, None
        if resume is not None:
            _set_states(self.devices, resume)

    def __repr__(self) -> str:
        names = ", ".join(["cpu", *(str(d) for d in self.devices)])
        return f"RNGReplay({names})"


def _accelerator_devices(devices: _Devices) -> list[torch.device]:
    """The non-CPU devices whose default generators a replay covers, each once, in order."""
    if devices is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        return []
    if isinstance(devices, nn.Module):
        items: Iterable[Any] = [
            *(p.device for p in devices.parameters()), *(b.device for b in devices.buffers())
        ]
    elif isinstance(devices, (str, int, torch.device, Tensor)):
        items = [devices]
    else:
        try:
            items = list(devices)
        except TypeError:
            raise TypeError(
                "devices must be a torch.nn.Module, an iterable of devices or tensors, or "
                f"None, got {type(devices).__name__}"
            ) from None
    out: list[torch.device] = []
    for item in items:
        if isinstance(item, Tensor):
            device = item.device
        elif isinstance(item, int):
            device = torch.device("cuda", item)
        else:
            try:
                device = torch.device(item)
            except (TypeError, RuntimeError):
                raise TypeError(
                    f"devices: {item!r} is not a device (torch.device, 'cuda:0', an index) or "
                    "a tensor"
                ) from None
        if device.type in ("cpu", "meta"):
            continue
        module = torch.get_device_module(device.type)
        if getattr(module, "get_rng_state", None) is None:  # no default generator to replay
            continue
        if device.index is None:  # "cuda": the current device of that type
            current = getattr(module, "current_device", None)
            device = torch.device(device.type, current() if current is not None else 0)
        if device not in out:
            out.append(device)
    return out


def _module(device: torch.device) -> Any:
    return torch.get_device_module(device.type)


def _get_states(devices: list[torch.device]) -> list[Tensor]:
    states = [torch.get_rng_state()]
    states.extend(_module(d).get_rng_state(d) for d in devices)
    return states


def _set_states(devices: list[torch.device], states: list[Tensor]) -> None:
    torch.set_rng_state(states[0])
    for device, state in zip(devices, states[1:], strict=True):
        _module(device).set_rng_state(state, device)
