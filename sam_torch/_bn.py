"""Batch-norm helper: running statistics come from the clean pass only."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["disable_running_stats"]


@contextlib.contextmanager
def disable_running_stats(model: nn.Module) -> Iterator[None]:
    """Within the block, batch-norm layers normalize with batch statistics but do not update
    their running mean/variance nor ``num_batches_tracked``.

    Use it around SAM's second (perturbed) forward pass, whose batch statistics describe
    :math:`w + e` rather than the model::

        loss_fn(model(x), y).backward()
        sam.first_step(zero_grad=True)
        with disable_running_stats(model):
            loss_fn(model(x), y).backward()
        sam.second_step(zero_grad=True)

    It temporarily sets ``track_running_stats=False`` on every ``_BatchNorm`` (BatchNorm1d/2d/3d,
    SyncBatchNorm, lazy variants) that tracks them, so outputs are the same as with the
    statistics updated; the flags are restored even if the block raises.
    """
    changed = [
        m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
    ]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True
