r"""The official ASAM recipe as a mask: ``sam_jax.sam(adaptive=sam_jax.asam_mask)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax

from ._variants import _NORM_NAME, _path_names

__all__ = ["asam_mask"]

#: Leaf names of the layers' weights: Flax's ``kernel`` (Dense, Conv), ``embedding``
#: (Embed), ``scale`` (normalization layers); anything named like torch's ``weight``.
_WEIGHT_NAMES = ("kernel", "embedding", "scale")


def asam_mask(
    params: Any,
    *,
    normalization: Literal["official", "sam"] = "official",
    predicate: Callable[[tuple[str, ...], Any], bool] | None = None,
) -> Any:
    r"""A tree of Python bools like ``params``: True where the official ASAM recipe is adaptive.

    The official ASAM code scales by :math:`T_w = |w| + \eta` only the parameters named
    ``weight`` (torch's names) and perturbs the others (biases) as plain SAM, under one
    norm (:func:`sam_core.perturbed_params_mixed`). In Flax the weights are the leaves
    named ``kernel``, ``embedding`` or ``scale`` (a normalization layer's weight, adaptive
    in the official code too), or whose name contains ``weight``::

        tx = optax.chain(
            sam_jax.sam(0.5, adaptive=sam_jax.asam_mask, eta=0.01, eps=1e-16),
            optax.add_decayed_weights(5e-4),
            optax.sgd(0.1, momentum=0.9),
        )

    (``adaptive=`` takes the function itself or the mask it returns;
    ``sam_torch.asam_param_groups`` is the torch form.)

    Args:
        params: the parameter tree.
        normalization: ``"official"`` (default) as above; ``"sam"``: every leaf of a
            normalization module (a path with ``BatchNorm_<i>``, ``LayerNorm_<i>``,
            ``GroupNorm_<i>`` or ``RMSNorm_<i>``, as :func:`sam_jax.normalization_mask`)
            is plain SAM.
        predicate: ``predicate(path, leaf) -> bool`` replacing the name rule (``path``:
            the tuple of key names).
    """
    if normalization not in ("official", "sam"):
        raise ValueError(f"normalization must be 'official' or 'sam', got {normalization!r}")

    def is_weight(path: tuple[str, ...], leaf: Any) -> bool:
        if predicate is not None:
            return bool(predicate(path, leaf))
        if normalization == "sam" and any(_NORM_NAME.fullmatch(n) for n in path):
            return False
        last = path[-1] if path else ""
        return last in _WEIGHT_NAMES or "weight" in last

    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: is_weight(_path_names(path), leaf), params
    )
