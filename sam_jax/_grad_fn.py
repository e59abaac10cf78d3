r"""How sam_jax transformations call ``grad_fn``: inside ``optax.masked`` / ``optax.partition``,
and the two internal protocols of :func:`sam_jax.m_sharpness_update`.

``optax.masked`` (and ``optax.partition``, built on it) hands its inner transformation the
parameters and gradients with every unselected leaf replaced by an ``optax.MaskedNode``. A
SAM transformation there perturbs only the leaves it sees, :math:`w_S + e_S` with
:math:`e_S = \rho\, g_S / \lVert g_S \rVert` (the norm over the selected leaves, as SAM-ON
takes it over the normalization layers), but the loss needs *every* parameter, and the
transformation never sees the others. :func:`with_full_params` binds them to ``grad_fn``: the
transformation then calls ``grad_fn`` at :math:`(w_S + e_S, w_{\bar S})` and keeps the
gradient of its own leaves, :math:`\nabla_S L(w_S + e_S, w_{\bar S})`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

__all__ = ["FullParamsGradFn", "with_full_params"]


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def has_masked_nodes(tree: Any) -> bool:
    """Whether ``tree`` (what a transformation received) has ``optax.MaskedNode`` leaves."""
    return any(_is_masked(x) for x in jax.tree.leaves(tree, is_leaf=_is_masked))


def selection(tree: Any) -> Any:
    """A tree of Python bools: False where ``tree`` has a ``MaskedNode`` (possibly standing for
    a whole subtree of the full parameters), True on its array leaves."""
    return jax.tree.map(lambda x: not _is_masked(x), tree, is_leaf=_is_masked)


def restrict(selected: Any, full: Any) -> Any:
    """``full`` as the masked transformation sees it: ``MaskedNode`` where not selected."""
    return jax.tree.map(lambda s, x: x if s else optax.MaskedNode(), selected, full)


def pick(selected: Any, if_selected: Any, otherwise: Any) -> Any:
    """Leaf by leaf (subtree by subtree): ``if_selected`` where selected, else ``otherwise``."""
    return jax.tree.map(lambda s, a, b: a if s else b, selected, if_selected, otherwise)


class FullParamsGradFn:
    """``grad_fn`` with the full parameter tree it is taken at; see :func:`with_full_params`.

    Calling it with a tree of the full structure calls ``grad_fn`` unchanged, so it can be
    passed to any sam_jax chain, masked or not.
    """

    __slots__ = ("grad_fn", "params")

    def __init__(self, grad_fn: Callable[[optax.Params], Any], params: optax.Params) -> None:
        if not callable(grad_fn):
            raise TypeError(f"grad_fn must be callable, got {type(grad_fn).__name__}")
        if params is None or has_masked_nodes(params):
            raise ValueError(
                "with_full_params needs the full parameter tree (the params passed to "
                "tx.update), without optax.MaskedNode leaves"
            )
        self.grad_fn = grad_fn
        self.params = params

    def __call__(self, params: optax.Params) -> Any:
        return self.grad_fn(params)


def with_full_params(
    grad_fn: Callable[[optax.Params], Any], params: optax.Params
) -> FullParamsGradFn:
    r"""``grad_fn`` for a sam_jax transformation inside ``optax.masked`` / ``optax.partition``.

    A masked transformation sees only its own leaves (``optax.MaskedNode`` elsewhere) but the
    loss needs all of them; ``params`` supplies the others. The transformation perturbs its
    leaves :math:`S` only and keeps the gradient of those,

    .. math::

        e_S = \rho\, \frac{T_S^2\, g_S}{\lVert T_S\, g_S \rVert_2 + \epsilon}, \qquad
        u_S = \nabla_S L(w_S + e_S,\; w_{\bar S}),

    while the other groups of a partition receive the gradient ``tx.update`` was given::

        tx = optax.partition({"sam": optax.chain(sam_jax.sam(0.05), optax.sgd(0.1)),
                              "plain": optax.sgd(0.1)}, labels)
        grad_fn = jax.grad(lambda p: loss_fn(p, batch))
        updates, state = tx.update(grads, state, params,
                                   grad_fn=sam_jax.with_full_params(grad_fn, params))

    Without a mask the result is ``grad_fn`` itself, so one train step serves both.

    Args:
        grad_fn: ``grad_fn(params)`` as for :func:`sam_jax.sam`: the gradient with respect to
            the *full* parameters, or ``(loss, grads)``.
        params: the full parameter tree passed to ``tx.update``.

    Raises:
        TypeError: ``grad_fn`` not callable.
        ValueError: ``params`` is None or already masked.
    """
    return FullParamsGradFn(grad_fn, params)


def call_grad_fn(who: str, grad_fn: Any, point: Any) -> Any:
    """``grad_fn`` at ``point`` (a tree with the structure the transformation received).

    With ``MaskedNode`` leaves in ``point``: the full point from :func:`with_full_params`'s
    parameters, the output restricted to the received structure (the loss kept as it is)."""
    if not has_masked_nodes(point):
        return grad_fn(point)
    if not isinstance(grad_fn, FullParamsGradFn):
        raise TypeError(
            f"{who} sits inside optax.masked or optax.partition: it sees only its own "
            "parameters (optax.MaskedNode in place of the others), but grad_fn needs them all. "
            "Pass them with the gradient function: tx.update(grads, opt_state, params, "
            "grad_fn=sam_jax.with_full_params(grad_fn, params)); the transformation then "
            "perturbs only its own leaves and keeps their gradient."
        )
    selected = selection(point)
    try:
        full_point = pick(selected, point, grad_fn.params)
    except ValueError as err:
        raise ValueError(
            f"the params given to sam_jax.with_full_params do not have the structure that "
            f"{who} sees inside its mask ({jax.tree.structure(point, is_leaf=_is_masked)}"
            "); pass the params given to tx.update"
        ) from err
    out = grad_fn.grad_fn(full_point)
    full_def = jax.tree.structure(full_point)
    if jax.tree.structure(out) == full_def:
        return restrict(selected, out)
    if isinstance(out, tuple) and len(out) == 2 and jax.tree.structure(out[1]) == full_def:
        return out[0], restrict(selected, out[1])
    return out  # the caller's structure check names what came back


# -- m_sharpness_update's protocol with sam / samon --------------------------------------------


class PerturbationFound(Exception):
    """Raised by sam / samon when called with a :class:`PerturbationProbe`: carries the
    transformation's own perturbation rule, so that each chunk is perturbed by it."""

    def __init__(
        self, perturb: Callable[..., Any], params: Any, updates: Any, hyperparams: tuple
    ) -> None:
        super().__init__("sam_jax perturbation probe")
        #: ``perturb(p_leaves, g_leaves) -> (perturbed leaves, grad_norm)`` on the leaves the
        #: transformation received (flatten order).
        self.perturb = perturb
        #: bools like the full params: the leaves it perturbs and replaces the gradient of.
        self.selected = selection(params)
        #: the ``updates`` it received (``check_chain`` compares them with what it passed in).
        self.updates = updates
        #: the (possibly traced) numbers ``perturb`` closes over.
        self.hyperparams = hyperparams


class PerturbationProbe:
    """The ``grad_fn`` placeholder of a probe call: sam / samon raise
    :class:`PerturbationFound` instead of stepping. Anything else calling it is not a
    transformation m-sharpness supports."""

    def found(self, perturb: Callable[..., Any], params: Any, updates: Any, hyperparams: tuple) -> None:
        raise PerturbationFound(perturb, params, updates, hyperparams)

    def __call__(self, params: Any) -> Any:
        raise TypeError(
            "a transformation in tx called grad_fn during m_sharpness_update's search for "
            "sam_jax.sam / sam_jax.samon; m-sharpness supports only those two"
        )


class MSharpnessStep:
    """The ``grad_fn`` of m_sharpness_update's step: ``updates`` already is the m-sharpness
    gradient :math:`G` (or MultiSteps' mean of several); sam / samon pass it on and record
    these figures instead of perturbing."""

    __slots__ = ("grad_norm", "perturbed_value", "value")

    def __init__(self, value: Any, perturbed_value: Any, grad_norm: Any) -> None:
        self.value = value
        self.perturbed_value = perturbed_value
        self.grad_norm = grad_norm

    def __call__(self, params: Any) -> Any:
        raise TypeError(
            "a transformation in tx called grad_fn in m_sharpness_update's step; m-sharpness "
            "supports only sam_jax.sam and sam_jax.samon"
        )
