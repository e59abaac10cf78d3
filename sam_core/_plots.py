"""Matplotlib plots of the diagnostics (matplotlib is imported only when a plot is drawn)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sam_core._diagnostics import Landscape

__all__ = ["plot_landscape", "plot_spectrum"]


def _axes(ax: Any) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=(5, 4))
    return ax


def plot_landscape(
    landscape: Landscape | Mapping[str, Landscape],
    ax: Any = None,
    *,
    relative: bool = False,
    levels: int = 20,
    log: bool = False,
    title: str | None = None,
) -> Any:
    """Draw a loss landscape: curves for 1-D ones, filled contours for a 2-D one.

    Args:
        landscape: one :class:`~sam_core.Landscape`, or a mapping ``label -> Landscape`` of
            1-D landscapes drawn on the same axes (e.g. SGD's and SAM's solutions).
        ax: the matplotlib axes to draw on (a new figure's when ``None``).
        relative: plot :math:`L(w + a d) - L(w)` instead of the loss.
        levels: contour levels of a 2-D landscape.
        log: logarithmic loss axis (1-D) or contours of :math:`\\log L` (2-D).
        title: the axes' title.

    Returns:
        The axes. The origin (the weights) is at coordinate 0; with filter-normalized
        directions a coordinate of 1 is a step as long as each filter of the weights.
    """
    ax = _axes(ax)
    items = dict(landscape) if isinstance(landscape, Mapping) else {None: landscape}
    dims = {ls.dims for ls in items.values()}
    if dims == {1}:
        for label, ls in items.items():
            y = ls.loss - ls.base_loss if relative else ls.loss
            ax.plot(ls.coords[0], y, label=label)
        ax.set_xlabel("step along the direction (alpha)")
        ax.set_ylabel("loss - loss at w" if relative else "loss")
        if log:
            ax.set_yscale("log")
        if any(label is not None for label in items):
            ax.legend()
    elif dims == {2} and len(items) == 1:
        (ls,) = items.values()
        z = ls.loss - ls.base_loss if relative else ls.loss
        if log:
            z = np.log(np.maximum(z, np.finfo(np.float64).tiny))
        a, b = np.meshgrid(ls.coords[0], ls.coords[1], indexing="ij")
        filled = ax.contourf(a, b, z, levels=levels, cmap="viridis")
        ax.contour(a, b, z, levels=levels, colors="k", linewidths=0.3)
        ax.plot([0.0], [0.0], "r+", markersize=10)
        ax.figure.colorbar(filled, ax=ax, label=("log " if log else "") + "loss")
        ax.set_xlabel("alpha (direction 1)")
        ax.set_ylabel("beta (direction 2)")
    else:
        raise ValueError(
            "plot_landscape draws one 2-D landscape or any number of 1-D ones; got "
            f"{len(items)} landscape(s) of dims {sorted(dims)}"
        )
    if title:
        ax.set_title(title)
    return ax


def plot_spectrum(
    eigenvalues: Sequence[float] | np.ndarray | Mapping[str, Sequence[float] | np.ndarray],
    ax: Any = None,
    *,
    log: bool = False,
    title: str | None = None,
) -> Any:
    """Draw the top Hessian eigenvalues by rank, one marker series per label.

    Args:
        eigenvalues: an array of eigenvalues (any order; drawn largest first) or a mapping
            ``label -> eigenvalues`` to compare solutions.
        ax: the matplotlib axes (a new figure's when ``None``).
        log: logarithmic value axis (non-positive eigenvalues are then left out).
        title: the axes' title.

    Returns:
        The axes.
    """
    ax = _axes(ax)
    items = dict(eigenvalues) if isinstance(eigenvalues, Mapping) else {None: eigenvalues}
    for label, values in items.items():
        v = np.sort(np.asarray(values, dtype=np.float64))[::-1]
        rank = np.arange(1, v.size + 1)
        if log:
            keep = v > 0
            rank, v = rank[keep], v[keep]
        ax.plot(rank, v, "o-", label=label)
    ax.set_xlabel("rank")
    ax.set_ylabel("Hessian eigenvalue")
    if log:
        ax.set_yscale("log")
    ax.axhline(0.0, color="0.6", linewidth=0.5)
    if any(label is not None for label in items):
        ax.legend()
    if title:
        ax.set_title(title)
    return ax
