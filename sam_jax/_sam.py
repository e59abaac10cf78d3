r"""``sam_jax.sam``: Sharpness-Aware Minimization as an Optax gradient transformation.

The transformation receives the clean gradient :math:`g = \nabla L(w)`, computes the
perturbed point :math:`w + e(w)` with :mod:`sam_core`'s math (through :class:`~sam_jax.JaxOps`),
evaluates the gradient there through a user-supplied ``grad_fn`` and passes that gradient
down the chain, where the base optimizer applies it at :math:`w`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import sam_core

from ._grad_fn import MSharpnessStep, PerturbationProbe, call_grad_fn, has_masked_nodes
from ._ops import JaxOps, accumulation_dtype

__all__ = ["SAMState", "sam"]


class SAMState(NamedTuple):
    r"""State of the transformation returned by :func:`sam`: the figures users log.

    Every field is a scalar array; the floating ones have the accumulation dtype of the
    parameters (float32 for float32/bfloat16/float16 parameters, float64 for float64 ones),
    so the state's structure and dtypes never change between steps.

    Attributes:
        count: number of updates applied so far (int32, saturating).
        grad_norm: the norm the last perturbation was scaled by: :math:`\lVert g \rVert_2`
            for SAM, :math:`\lVert T_w g \rVert_2` for ASAM (after the ``pmean`` over
            ``axis_name`` for global SAM; with ``m_sharpness``, the mean over the replicas
            of their local norms). NaN before the first update.
        value: the clean loss :math:`L(w)` of the last update when it was passed as the
            extra argument ``value=`` (optax's name for it), else NaN.
        perturbed_value: the loss at the perturbed point :math:`L(w + e)` when ``grad_fn``
            returns ``(loss, grads)``, else NaN.
        sharpness: the sharpness estimate :math:`L(w + e) - L(w)`, i.e.
            ``perturbed_value - value`` (NaN unless both are known).
    """

    count: jax.Array
    grad_norm: jax.Array
    value: jax.Array
    perturbed_value: jax.Array
    sharpness: jax.Array


def _state_dtype(leaves: list[Any]) -> Any:
    """The dtype of the state's float fields, fixed by the parameters' dtypes alone."""
    if not leaves:
        return jnp.float32
    return jnp.result_type(*[accumulation_dtype(jnp.asarray(x).dtype) for x in leaves])


def _split_grad_fn_output(output: Any, params_treedef: Any) -> tuple[Any, Any]:
    """Return ``(value or None, grads)`` from what ``grad_fn`` returned.

    Decided statically from the tree structure (jit-safe): ``grads`` when the output has the
    structure of ``params``; ``(value, grads)`` or ``((value, aux), grads)`` (the forms of
    ``jax.value_and_grad``, with and without ``has_aux``) when it is a pair whose second
    element has that structure.
    """
    if jax.tree.structure(output) == params_treedef:
        return None, output
    if (
        isinstance(output, tuple)
        and len(output) == 2
        and jax.tree.structure(output[1]) == params_treedef
    ):
        value = output[0]
        if isinstance(value, tuple) and len(value) == 2:  # value_and_grad(has_aux=True)
            value = value[0]
        return value, output[1]
    raise ValueError(
        "grad_fn must return the gradient with the structure of params, or a pair "
        "(loss, gradient) as jax.value_and_grad does; got a tree of structure "
        f"{jax.tree.structure(output)} but params have structure {params_treedef}. "
        "Differentiate with respect to the params argument only (argnums=0)."
    )


def sam(
    rho: float | jax.Array = 0.05,
    *,
    adaptive: bool | Any = False,
    eta: float | jax.Array = 0.01,
    eps: float | jax.Array = 1e-12,
    axis_name: str | None = None,
    m_sharpness: bool = False,
    gc: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Sharpness-Aware Minimization (SAM) and Adaptive SAM (ASAM) as an Optax transformation.

    Given the clean gradient :math:`g = \nabla L(w)` as ``updates``, the transformation
    computes the perturbed point and returns the gradient there,

    .. math::

        e(w) = \rho \, \frac{T_w^2 \, g}{\lVert T_w g \rVert_2 + \epsilon}, \qquad
        T_w = \begin{cases} 1 & \text{SAM} \\ |w| + \eta & \text{ASAM,} \end{cases}
        \qquad u = \nabla L(w + e(w)),

    which the rest of the chain turns into the step applied at :math:`w`. The math is
    :func:`sam_core.perturbed_params`' (one pass, no parameter copy kept in the state).

    References: Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
    Generalization", ICLR 2021; Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization
    for Scale-Invariant Learning of Deep Neural Networks", ICML 2021.

    ``sam`` must be the **first** transformation of a chain: it needs the raw gradient
    (not one already scaled, clipped, decayed or given momentum) and it replaces that
    gradient by the perturbed-point gradient, which the following transformations treat as
    the gradient of the step::

        tx = optax.chain(
            sam_jax.sam(rho=0.05),
            optax.add_decayed_weights(5e-4),
            optax.sgd(0.1, momentum=0.9),
        )
        grad_fn = jax.value_and_grad(lambda p: loss_fn(p, batch))
        loss, grads = grad_fn(params)
        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn, value=loss)
        params = optax.apply_updates(params, updates)
        # opt_state[0].sharpness == L(w + e) - L(w)

    Anywhere else in a chain it runs without any error and the training diverges (after
    ``optax.sgd`` it perturbs downhill and the raw gradient at :math:`w + e` is *added* to
    the parameters): a transformation cannot see the chain it is in. Check the chain once
    with :func:`sam_jax.check_chain` (``sam_jax.check_chain(tx, params)``), which finds
    the transformation's position from the chain's state.

    Args:
        rho: radius of the neighbourhood, :math:`\rho \ge 0`. May be scheduled with
            ``optax.inject_hyperparams(sam_jax.sam)(rho=schedule)``.
        adaptive: ASAM's scale-invariant neighbourhood (static): a bool for every leaf, or
            a tree of Python bools like ``params`` (or a callable ``params -> tree``) that
            makes only the True leaves adaptive, the others plain SAM, under one norm
            (:func:`sam_core.perturbed_params_mixed`; the official ASAM recipe is
            ``adaptive=sam_jax.asam_mask``).
        eta: ASAM's offset in :math:`T_w = |w| + \eta`, :math:`\eta \ge 0` (0.01 in the
            official ASAM code).
        eps: added to the norm, :math:`\epsilon > 0`; a zero gradient gives a zero
            perturbation, never NaN.
        axis_name: a named axis (``shard_map``, ``pmap``, ``vmap(axis_name=...)``) over
            which the data is split. The clean gradient is ``jax.lax.pmean``'d over it
            before perturbing (global SAM: every replica uses the same :math:`e`), unless
            ``m_sharpness``; the perturbed-point gradient and loss are always ``pmean``'d.
        m_sharpness: with ``axis_name``, perturb each replica with its *local* gradient
            (the m-sharpness of the SAM paper, :math:`m` = the per-replica batch size).
        gc: gradient centralization (Yong et al., ECCV 2020; ``pytorch_optimizer``'s GCSAM,
            static): the perturbation is formed from the clean gradient with each leaf of
            two or more dimensions centralized, ``g - g.mean(axis=(1, ..., n-1),
            keepdims=True)`` (one-dimensional leaves unchanged; :func:`sam_core.centralize`).

    Returns:
        An :class:`optax.GradientTransformationExtraArgs` whose
        ``update(updates, state, params, *, grad_fn, value=None, **extra_args)`` takes:

        * ``updates``: the clean gradient :math:`\nabla L(w)`, structured like ``params``;
        * ``params``: the parameters :math:`w` (required);
        * ``grad_fn``: ``grad_fn(perturbed_params)`` returns the gradient at that point, or
          ``(loss, grads)`` / ``((loss, aux), grads)`` as ``jax.value_and_grad`` does (the
          loss is then recorded in :class:`SAMState` and ``aux`` is discarded; Flax
          ``batch_stats`` updated by the perturbed pass should be discarded too). The
          returned gradient must have the structure, shapes and dtypes of ``updates``.
          Inside ``optax.masked`` / ``optax.partition`` (which hand ``sam`` only its own
          leaves) pass ``sam_jax.with_full_params(grad_fn, params)``: ``sam`` then perturbs
          its leaves only (the norm over them) and keeps their gradient;
        * ``value``: optionally the clean loss :math:`L(w)`, recorded in the state.

    Raises:
        ValueError: ``rho`` negative or not finite, ``eps <= 0`` or ``eta < 0`` (the same
            messages as ``sam_torch.SAM``); ``m_sharpness`` without ``axis_name``.
        TypeError: ``adaptive`` or ``m_sharpness`` not a bool, ``axis_name`` not a string;
            at ``init``/``update``: parameters that are not floating point (integer, bool or
            complex), a ``grad_fn`` gradient of another dtype than ``updates``, or a plain
            ``grad_fn`` inside ``optax.masked`` / ``optax.partition``.
    """
    # A tree of bools (a container or a callable building one) makes ASAM per leaf; any
    # other non-bool is an error, as before.
    mask = adaptive if callable(adaptive) or isinstance(adaptive, Mapping | list | tuple) else None
    sam_core.validate_sam(rho=rho, eps=eps, eta=eta, adaptive=mask is not None or adaptive)
    sam_core.check_bool("m_sharpness", m_sharpness)
    sam_core.check_bool("gc", gc)
    if axis_name is not None and not isinstance(axis_name, str):
        raise TypeError(
            f"axis_name must be a string naming a mapped axis or None, got "
            f"{type(axis_name).__name__} {axis_name!r}"
        )
    if m_sharpness and axis_name is None:
        raise ValueError(
            "m_sharpness=True needs axis_name: it perturbs each replica with its local "
            "gradient along that named axis. Pass axis_name='batch' (the axis your "
            "shard_map/pmap maps over), or leave m_sharpness=False."
        )
    ops = JaxOps()

    def init_fn(params: optax.Params) -> SAMState:
        if params is None:
            raise ValueError(
                "sam_jax.sam needs the parameters: call tx.init(params) with the model's "
                "parameter tree, not None."
            )
        _check_floating(jax.tree.leaves(params))
        dtype = _state_dtype(jax.tree.leaves(params))
        nan = jnp.full((), jnp.nan, dtype)
        return SAMState(
            count=jnp.zeros((), jnp.int32),
            grad_norm=nan,
            value=nan,
            perturbed_value=nan,
            sharpness=nan,
        )

    def update_fn(
        updates: optax.Updates,
        state: SAMState,
        params: optax.Params | None = None,
        *,
        grad_fn: Callable[[optax.Params], Any] | None = None,
        value: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SAMState]:
        del extra_args  # other transformations' extra arguments
        if params is None:
            raise ValueError(
                "sam_jax.sam needs the parameters to perturb: call "
                "tx.update(grads, opt_state, params, grad_fn=...) with params, not "
                "params=None."
            )
        if grad_fn is None:
            raise TypeError(
                "sam_jax.sam needs grad_fn, the gradient of the loss at the perturbed point: "
                "call tx.update(grads, opt_state, params, "
                "grad_fn=lambda p: jax.grad(loss_fn)(p, batch)). "
                "(flax's TrainState.apply_gradients does not forward it: call tx.update "
                "yourself, see docs/jax.md.)"
            )
        if not callable(grad_fn):
            raise TypeError(f"grad_fn must be callable, got {type(grad_fn).__name__}")
        p_leaves, p_treedef = jax.tree.flatten(params)
        g_leaves, g_treedef = jax.tree.flatten(updates)
        if g_treedef != p_treedef:
            raise ValueError(
                "updates (the clean gradient) and params must have the same tree structure, "
                f"got updates {g_treedef} and params {p_treedef}. Is sam_jax.sam the first "
                "transformation of the chain, and was the gradient taken w.r.t. params?"
            )
        _check_floating(p_leaves)
        dtype = _state_dtype(p_leaves)

        def perturb(p_leaves: list[Any], g_leaves: list[Any]) -> tuple[list[Any], Any]:
            if axis_name is not None and not m_sharpness:
                g_leaves = jax.lax.pmean(g_leaves, axis_name=axis_name)
            clean = sam_core.centralize(ops, g_leaves) if gc else g_leaves
            if mask is None:
                return sam_core.perturbed_params(
                    ops, p_leaves, clean, rho=rho, adaptive=adaptive, eta=eta, eps=eps
                )
            return sam_core.perturbed_params_mixed(
                ops, p_leaves, clean, _mask_leaves(mask, params, p_treedef), rho=rho, eta=eta,
                eps=eps,
            )

        if isinstance(grad_fn, PerturbationProbe):  # m_sharpness_update asks for the rule
            grad_fn.found(perturb, params, updates, (rho, eta, eps))
        if isinstance(grad_fn, MSharpnessStep):  # updates is m-sharpness' G already
            new_leaves, grad_norm = g_leaves, grad_fn.grad_norm
            value, perturbed_value = grad_fn.value, grad_fn.perturbed_value
        elif not p_leaves and has_masked_nodes(params):  # a mask selecting no leaf
            perturbed_value, new_leaves, grad_norm = None, g_leaves, jnp.zeros((), dtype)
        else:
            perturbed, grad_norm = perturb(p_leaves, g_leaves)
            point = jax.tree.unflatten(p_treedef, perturbed)
            perturbed_value, new_grads = _split_grad_fn_output(
                call_grad_fn("sam_jax.sam", grad_fn, point), p_treedef
            )
            new_leaves = jax.tree.leaves(new_grads)
            _check_like(new_leaves, g_leaves)
        if axis_name is not None:
            new_leaves = jax.lax.pmean(new_leaves, axis_name=axis_name)

        nan = jnp.full((), jnp.nan, dtype)
        perturbed_value = nan if perturbed_value is None else _scalar("loss", perturbed_value)
        if axis_name is not None:
            perturbed_value = jax.lax.pmean(perturbed_value, axis_name=axis_name)
        perturbed_value = perturbed_value.astype(dtype)
        clean_value = nan if value is None else _scalar("value", value).astype(dtype)
        grad_norm = jnp.asarray(grad_norm).astype(dtype)
        if axis_name is not None and m_sharpness:
            # Each replica scaled by its own norm; the state must be replicated (shard_map
            # out_specs=P()), so it records their mean.
            grad_norm = jax.lax.pmean(grad_norm, axis_name=axis_name)
        new_state = SAMState(
            count=optax.safe_increment(state.count),
            grad_norm=grad_norm,
            value=clean_value,
            perturbed_value=perturbed_value,
            sharpness=perturbed_value - clean_value,
        )
        return jax.tree.unflatten(p_treedef, new_leaves), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_like(new_leaves: list[Any], g_leaves: list[Any]) -> None:
    """grad_fn's gradient must have the clean gradient's shapes and dtypes, leaf by leaf."""
    for i, (new, old) in enumerate(zip(new_leaves, g_leaves, strict=True)):
        if jnp.shape(new) != jnp.shape(old):
            raise ValueError(
                f"grad_fn returned a gradient leaf {i} of shape {jnp.shape(new)} where "
                f"the parameter has shape {jnp.shape(old)}; return the gradient with "
                "respect to the params argument."
            )
    for i, (new, old) in enumerate(zip(new_leaves, g_leaves, strict=True)):
        new_dtype, old_dtype = jnp.asarray(new).dtype, jnp.asarray(old).dtype
        if new_dtype != old_dtype:
            raise TypeError(
                f"grad_fn returned a gradient leaf {i} of dtype {new_dtype} where the "
                f"clean gradient has dtype {old_dtype}; the gradient at the perturbed "
                "point must have the dtype of the clean one. Differentiate the same loss "
                "with respect to the params argument (jax.grad casts nothing), or cast in "
                "grad_fn: jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)."
            )


def _mask_leaves(mask: Any, params: Any, treedef: Any) -> list[bool]:
    """The per-leaf ``adaptive`` flags from a tree of bools (or a callable building one)."""
    tree = mask(params) if callable(mask) else mask
    flags, mask_def = jax.tree.flatten(tree)
    if mask_def != treedef:
        raise ValueError(
            f"adaptive, given as a tree of bools, must have the structure of params, got "
            f"{mask_def} for params {treedef}; build it with sam_jax.asam_mask(params)"
        )
    for f in flags:
        if not isinstance(f, bool):
            raise TypeError(
                "adaptive, given as a tree, must hold Python bools (a static choice per leaf), "
                f"got {type(f).__name__}"
            )
    return flags


def _check_floating(leaves: list[Any]) -> None:
    """SAM perturbs real floating-point parameters only (as ``sam_torch.SAM``)."""
    for i, x in enumerate(leaves):
        dtype = jnp.asarray(x).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"sam_jax.sam perturbs real floating-point parameters only; parameter leaf "
                f"{i} has dtype {dtype}. Keep integer/bool state out of the optimized tree "
                "(e.g. in Flax collections), and split complex parameters into real and "
                "imaginary parts."
            )


def _scalar(name: str, x: Any) -> jax.Array:
    x = jnp.asarray(x)
    if x.shape != ():
        what = "the loss returned by grad_fn" if name == "loss" else "value="
        raise ValueError(
            f"{what} must be a scalar, got an array of shape {x.shape}; reduce it to the "
            "mean loss of the batch."
        )
    return x
