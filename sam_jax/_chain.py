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
import jax.numpy as jnp
import optax

from ._esam import ESAMState
from ._grad_fn import PerturbationFound, PerturbationProbe, restrict
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
    ESAMState,
)


def check_chain(tx: optax.GradientTransformation, params: Any) -> None:
    """Raise ``ValueError`` unless ``tx`` holds a sam_jax transformation that comes first.

    Builds the state's shapes with ``jax.eval_shape(tx.init, params)`` (nothing is
    computed) and finds each sam_jax state in it: within every ``optax.chain`` on the way
    it must be the first element (position 0). Wrappers around the whole chain
    (``optax.inject_hyperparams``, ``optax.MultiSteps``, ``optax.apply_if_finite``,
    ``optax.masked``, ``optax.partition``) are looked through. A ``sam`` or ``samon`` at a
    later position passes only when the transformations before it provably hand the
    gradient on unchanged (``optax.identity()``): the update is traced abstractly up to
    sam, which must receive the very arrays passed in. Inside ``optax.masked`` /
    ``optax.partition``, call ``tx.update`` with
    ``grad_fn=sam_jax.with_full_params(grad_fn, params)``. Call it once, after building the
    optimizer::

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
        if any(positions) and not (len(sam_states) == 1 and _reaches_sam_untouched(tx, state, params)):
            where = jax.tree_util.keystr(path)
            if isinstance(leaf, (SAMState, SAMONState)):
                allowed = (
                    "Only transformations that hand the gradient on unchanged "
                    "(optax.identity()) may come before it, and these change it."
                )
            else:
                allowed = (
                    "Nothing may come before it (a pass-through such as optax.identity() is "
                    "accepted before sam_jax.sam and sam_jax.samon only)."
                )
            raise ValueError(
                f"the sam_jax transformation whose state is {type(leaf).__name__} sits at "
                f"position {max(positions)} of an optax.chain (state path {where}), not "
                "first: it would perturb along the output of the transformations before it "
                "instead of the gradient, and pass the raw gradient at w + e to "
                f"apply_updates, which adds it (the run diverges). {allowed} Put it first: "
                "optax.chain(sam_jax.sam(rho), ..., optax.sgd(lr))"
            )


def _reaches_sam_untouched(tx: optax.GradientTransformation, state: Any, params: Any) -> bool:
    """Whether ``tx.update`` hands its ``updates`` to the chain's sam / samon untouched.

    Traced abstractly (nothing is computed): a probe ``grad_fn`` stops the update at sam,
    which reports the leaves it received; they must be the very tracers passed in (the ones
    its mask selects), i.e. nothing before it computed anything from the gradient
    (``optax.identity()`` and pass-through wrappers qualify; ``optax.scale(1.0)`` does not,
    nor does a transformation that needs an extra argument this check cannot supply).
    ``optax.MultiSteps`` around the whole chain is looked through (it hands the mean of the
    gradients, the documented use)."""
    multi = tx if isinstance(tx, optax.MultiSteps) else getattr(tx.update, "__self__", None)
    if isinstance(multi, optax.MultiSteps) and isinstance(state, optax.MultiStepsState):
        tx, state = multi.inner_opt, state.inner_opt_state
    untouched: list[bool] = []

    def probe(updates: Any, state: Any, params: Any) -> None:
        try:
            tx.update(updates, state, params, grad_fn=PerturbationProbe(), value=jnp.zeros(()))
        except PerturbationFound as found:
            received = jax.tree.leaves(found.updates)
            passed = jax.tree.leaves(restrict(found.selected, updates))
            untouched.append(
                len(received) == len(passed) and all(a is b for a, b in zip(received, passed, strict=False))
            )
        except Exception:  # a variant that calls grad_fn, a missing extra argument, ...
            untouched.append(False)

    jax.eval_shape(probe, params, state, params)
    return untouched == [True]
