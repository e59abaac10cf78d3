"""Batch-norm helpers: running statistics come from the clean pass only."""

from __future__ import annotations

from types import TracebackType

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["disable_running_stats", "enable_running_stats"]

# Set on a batch-norm layer whose tracking ``disable_running_stats`` turned off, so that
# ``enable_running_stats`` turns back on exactly those (never a layer built without it).
_FROZEN = "_sam_running_stats_frozen"


class disable_running_stats:  # a function-like name: called like one, or used in a with
    """Stop batch-norm layers from updating their running statistics, now.

    Every ``_BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants) of ``model``
    that tracks running statistics keeps normalizing with batch statistics in training
    mode but no longer updates its running mean, running variance nor
    ``num_batches_tracked``: their values describe the model at :math:`w`, not the
    perturbed :math:`w + e` of SAM's second pass. Outputs and gradients are the same as
    with the statistics updated.

    Two forms:

    * a plain call, as in the popular PyTorch SAM wrapper's batch-norm recipe, undone by
      :func:`enable_running_stats`::

          enable_running_stats(model)
          loss_fn(model(x), y).backward()
          sam.first_step(zero_grad=True)
          disable_running_stats(model)
          loss_fn(model(x), y).backward()
          sam.second_step(zero_grad=True)

    * a context manager, which turns tracking back on when the block ends, even if it
      raises::

          loss_fn(model(x), y).backward()
          sam.first_step(zero_grad=True)
          with disable_running_stats(model):
              loss_fn(model(x), y).backward()
          sam.second_step(zero_grad=True)

    Difference from the wrapper's helper: that one sets each layer's ``momentum`` to 0, so
    the running mean and variance keep their values (bit for bit, the same as here) but
    ``num_batches_tracked`` still counts the perturbed pass; here it counts clean passes
    only. The two therefore agree on every running mean and variance with a numeric
    ``momentum`` and differ in ``num_batches_tracked`` (twice the number of steps there);
    with ``momentum=None`` (a cumulative average, weighted by ``1 / num_batches_tracked``)
    the wrapper's average is also weighted differently.

    Implementation: it sets ``track_running_stats=False`` on the layers, which is how
    ``_BatchNorm.forward`` skips every buffer update.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module, got {type(model).__name__}; pass the model "
                "whose batch-norm layers should stop updating their running statistics"
            )
        self._changed = [
            m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
        ]
        for m in self._changed:
            m.track_running_stats = False
            setattr(m, _FROZEN, True)

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _unfreeze(self._changed)


def enable_running_stats(model: nn.Module) -> None:
    """Undo :func:`disable_running_stats` on ``model``: its batch-norm layers track again.

    Only layers that :func:`disable_running_stats` froze are changed (a layer built with
    ``track_running_stats=False`` stays as it is); calling it when nothing is frozen does
    nothing, so a loop may call it at the start of every step, as the popular wrapper's
    recipe does.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _unfreeze([m for m in model.modules() if getattr(m, _FROZEN, False)])


def _unfreeze(layers: list[nn.Module]) -> None:
    for m in layers:
        if getattr(m, _FROZEN, False):
            m.track_running_stats = True
            delattr(m, _FROZEN)
