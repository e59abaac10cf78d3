"""``sam_jax.check_chain``: is the SAM transformation first in its chain?

``sam_jax.sam`` (and every variant) must be the first transformation of an ``optax.chain``:
it needs the raw gradient as ``updates`` and replaces it by the gradient at :math:`w + e`.
Anywhere else it perturbs along whatever the previous transformations made of the gradient
(``optax.sgd`` first: along :math:`-\\text{lr}\\, g`, i.e. downhill) and hands the raw
gradient at :math:`w + e` to ``optax.apply_updates``, which then *adds* it: the run diverges
with no error, because a transformation cannot see the chain it sits in. The chain's state
can: ``optax.chain`` keeps one state per transformation, in order.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from ._sam import SAMState
from ._variants import (
    EveryKSAMState,
    FriendlySAMState,
    GSAMState,
    LookSAMState,
    MomentumSAMState,
    SAMONState,
    VaSSOState,
    WSAMState,
)

__all__ = ["check_chain"]

_SAM_STATES = (
    SAMState,
    EveryKSAMState,
    FriendlySAMState,
    GSAMState,
    LookSAMState,
    MomentumSAMState,
    SAMONState,
    VaSSOState,
    WSAMState,
)


def check_chain(tx: optax.GradientTransformation, params: Any) -> None:
    """Raise ``ValueError`` unless ``tx`` holds a sam_jax transformation that comes first.

    Builds the state's shapes with ``jax.eval_shape(tx.init, params)`` (nothing is
    computed) and finds each sam_jax state in it: within every ``optax.chain`` on the way
    it must be the first element (position 0). Wrappers around the whole chain
    (``optax.inject_hyperparams``, ``optax.MultiSteps``, ``optax.apply_if_finite``,
    ``optax.masked``) are looked through. Call it once, after building the optimizer::

        tx = optax.chain(sam_jax.sam(0.05), optax.sgd(0.1, momentum=0.9))
        sam_jax.check_chain(tx, params)

    What it cannot see: the order inside ``optax.named_chain`` (its state is a dict) and
    a chain whose ``updates`` were changed before ``tx.update`` is called (scaled, clipped
    or averaged gradients passed in by the training loop): ``sam`` must receive
    :math:`\\nabla L(w)` itself.

    Raises:
        ValueError: no sam_jax transformation in ``tx``, or one that is not first.
    """
    state = jax.eval_shape(tx.init, params)
    found = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, _SAM_STATES)
    )[0]
    sam_states = [(path, leaf) for path, leaf in found if isinstance(leaf, _SAM_STATES)]
    if not sam_states:
        raise ValueError(
            "check_chain found no sam_jax transformation in tx; build it as "
            "optax.chain(sam_jax.sam(rho), <base optimizer>)"
        )
    for path, leaf in sam_states:
        positions = [k.idx for k in path if isinstance(k, jax.tree_util.SequenceKey)]
        if any(positions):
            where = jax.tree_util.keystr(path)
            raise ValueError(
                f"the sam_jax transformation whose state is {type(leaf).__name__} sits at "
                f"position {max(positions)} of an optax.chain (state path {where}), not "
                "first: it would perturb along the output of the transformations before it "
                "instead of the gradient, and pass the raw gradient at w + e to "
                "apply_updates, which adds it (the run diverges). Put it first: "
                "optax.chain(sam_jax.sam(rho), ..., optax.sgd(lr))"
            )
