r"""m-sharpness on one device: ``sam_jax.m_sharpness_update`` and ``sam_jax.chunk_batch``.

m-sharpness (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021, Sec. 4.1 and Fig. 3) perturbs each chunk of ``m`` examples with
that chunk's own gradient. The batch of :math:`B` examples is split into :math:`k = B / m`
consecutive chunks; with :math:`L_c` the mean loss of chunk :math:`c` and
:math:`g_c = \nabla L_c(w)`,

.. math::

    e_c = \rho \, \frac{T_w^2 \, g_c}{\lVert T_w g_c \rVert_2 + \epsilon}, \qquad
    G = \frac{1}{k} \sum_{c=1}^{k} \nabla L_c(w + e_c),

and the rest of the chain turns :math:`G` into the step applied at :math:`w`. :math:`m = B`
is batch SAM exactly. The perturbation of each chunk is computed by the chain's own
:func:`sam_jax.sam` transformation (so rho schedules through ``optax.inject_hyperparams``,
``adaptive`` and ``eta`` apply as they do for batch SAM).

One call per training step, with the same ``tx`` as batch SAM::

    tx = optax.chain(sam_jax.sam(rho=0.05), optax.sgd(0.1, momentum=0.9))

    def loss_fn(params, chunk):                      # the chunk's MEAN loss
        x, y = chunk
        return cross_entropy(model.apply(params, x), y)

    @jax.jit
    def train_step(params, opt_state, batch):
        updates, opt_state, loss, _ = sam_jax.m_sharpness_update(
            tx, loss_fn, params, opt_state, batch, m=16)
        return optax.apply_updates(params, updates), opt_state, loss

Two execution forms, the same numbers (``impl=``): ``"scan"``, a ``lax.scan`` over the chunks
accumulating the perturbed gradients (one chunk at a time: shared-weight kernels; unrolled by
default, ``unroll=1`` for a rolled loop with the memory of one chunk); ``"vmap"``, one
``jax.vmap`` over the chunks (every chunk has its own perturbed weights, so convolutions become
batched-weight ones; ``chunk_size`` bounds how many chunks run at once). ``"auto"`` picks the
form measured faster on the backend (``benchmarks/results/m-sharpness/``): ``"scan"`` on CPU,
``"vmap"`` elsewhere (not measured here).

The named-axis form, for code that already maps over chunks (or shards, under ``shard_map``)
is what ``sam(axis_name=..., m_sharpness=True)`` computes::

    AXIS = "chunks"
    tx = optax.chain(sam_jax.sam(0.05, axis_name=AXIS, m_sharpness=True), optax.sgd(0.1))

    def chunk_update(params, opt_state, chunk):
        loss, grads = jax.value_and_grad(loss_fn)(params, chunk)
        grad_fn = jax.value_and_grad(lambda p: loss_fn(p, chunk))
        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn,
                                       value=jax.lax.pmean(loss, AXIS))
        return updates, opt_state

    updates, opt_state = jax.vmap(chunk_update, in_axes=(None, None, 0), out_axes=None,
                                  axis_name=AXIS)(params, opt_state, sam_jax.chunk_batch(batch, m))

(``value=`` must be ``pmean``'d: the state is one for all chunks.) It equals
``m_sharpness_update(..., impl="vmap")`` with the plain ``tx``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

import sam_core

from ._grad_fn import MSharpnessStep, PerturbationFound, PerturbationProbe, pick, restrict
from ._ops import accumulation_dtype
from ._sam import SAMState
from ._variants import SAMONState

__all__ = ["chunk_batch", "m_sharpness_update"]

#: Per backend, the form ``impl="auto"`` takes, from ``benchmarks/results/m-sharpness/``
#: (WRN-16-2, batch 128, m in {4, 16, 32}): on CPU the scan keeps shared-weight convolutions
#: and is the faster form at every m; on accelerators the vmap runs the chunks as one kernel.
_AUTO_IMPL = {"cpu": "scan"}


def chunk_batch(batch: Any, m: int) -> Any:
    """The batch pytree with every leaf reshaped from ``(B, ...)`` to ``(B // m, m, ...)``.

    Row ``c`` of every leaf is chunk ``c``: the examples ``c * m`` to ``c * m + m - 1``
    (consecutive, as ``sam_torch.m_sharpness_step`` splits them).

    Raises:
        ValueError: ``m`` does not divide the batch size (the message names B, m and the
            divisors of B), leaves with different leading dimensions, a 0-d leaf or an empty
            tree.
        TypeError: ``m`` not an int.
    """
    k, m = _chunks(batch, m)
    return jax.tree.map(lambda x: jnp.reshape(x, (k, m, *jnp.shape(x)[1:])), batch)


def m_sharpness_update(
    tx: optax.GradientTransformation,
    loss_fn: Callable[..., Any],
    params: optax.Params,
    opt_state: optax.OptState,
    batch: Any,
    *,
    m: int,
    impl: Literal["auto", "scan", "vmap"] = "auto",
    has_aux: bool = False,
    chunk_size: int | None = None,
    unroll: bool | int = True,
    key: jax.Array | None = None,
    **extra_args: Any,
) -> tuple[optax.Updates, optax.OptState, jax.Array, Any]:
    r"""One m-sharpness SAM update: ``(updates, new_opt_state, loss, aux)``.

    The batch of :math:`B` examples is split into :math:`k = B / m` consecutive chunks; each
    chunk is perturbed with its own gradient by the chain's :func:`sam_jax.sam`
    (:math:`e_c = \rho\, T_w^2 g_c / (\lVert T_w g_c \rVert + \epsilon)`, :math:`g_c =
    \nabla L_c(w)`), and the rest of ``tx`` receives
    :math:`G = \frac1k \sum_c \nabla L_c(w + e_c)` as the gradient of the step, once.
    ``m = B`` gives batch SAM's update exactly. Foret et al., ICLR 2021, Sec. 4.1.

    Pure and jit-friendly; call it inside your jitted train step and apply ``updates`` with
    ``optax.apply_updates``. The optimizer state has the structure of batch SAM's (nothing
    is k-fold); its :class:`~sam_jax.SAMState` records ``value`` :math:`= \frac1k \sum_c
    L_c(w)`, ``perturbed_value`` :math:`= \frac1k \sum_c L_c(w + e_c)`, ``sharpness`` their
    difference, and ``grad_norm`` the mean over the chunks of the norms the perturbations
    were scaled by.

    Flax linen with ``batch_stats`` (each chunk normalizes with its own batch statistics,
    the running averages are updated once from the clean passes: the mean over the chunks
    of what each chunk's clean pass gives, as replicas averaging their statistics would
    hold)::

        def loss_fn(params, chunk):
            x, y = chunk
            logits, new_vars = model.apply({"params": params, "batch_stats": state.batch_stats},
                                           x, train=True, mutable=["batch_stats"])
            return cross_entropy(logits, y), (logits, new_vars["batch_stats"])

        updates, opt_state, loss, (logits, stats) = sam_jax.m_sharpness_update(
            tx, loss_fn, state.params, state.opt_state, (x, y), m=16, has_aux=True)
        batch_stats = jax.tree.map(lambda s: s.mean(0), stats)   # (k, ...) -> mean
        logits = logits.reshape(-1, logits.shape[-1])            # (k, m, C) -> (B, C)

    ``loss_fn`` closes over the step's starting ``batch_stats``: every chunk's clean pass
    and perturbed pass starts from them, and the statistics the perturbed passes compute are
    discarded. ``flax.nnx``: split the model (``graphdef, params, rest = nnx.split(model,
    nnx.Param, ...)``), write ``loss_fn(params, chunk)`` with ``nnx.merge(graphdef, params,
    rest)`` returning ``nnx.state(merged, nnx.BatchStat)`` as ``aux``, and write back
    ``optax.apply_updates(params, updates)`` and the mean statistics with ``nnx.update``
    (``docs/m_sharpness.md`` has the full step).

    Args:
        tx: the chain, with :func:`sam_jax.sam` (no ``axis_name``) first, exactly as for batch
            SAM, or :func:`sam_jax.samon` (each chunk perturbs the masked parameters with
            its own gradient). The other variants (``gsam``, ``wsam``, ``friendly_sam``,
            ``vasso``, ``looksam``, ``every_k_sam``, ``momentum_sam``) raise ``TypeError``.
            The Optax wrappers work as with batch SAM, :math:`G` taking the place of the
            gradient: ``optax.MultiSteps(tx, n)`` averages the :math:`G` of ``n`` calls and
            steps on the ``n``-th; ``optax.apply_if_finite(tx, n)`` skips (and counts) a
            step whose :math:`G` is not finite; inside ``optax.masked`` /
            ``optax.partition`` sam perturbs only its own leaves (the others get the clean
            gradient :math:`\frac1k \sum_c g_c`); ``optax.inject_hyperparams`` schedules
            reach every chunk. A rho injected with ``inject_hyperparams`` inside ``apply_if_finite`` raises
            ``TypeError`` (put the wrapper after sam instead).
        loss_fn: ``loss_fn(params, chunk)`` returns the chunk's **mean** loss, or
            ``(loss, aux)`` with ``has_aux=True``; it sees one chunk (leaves of shape
            ``(m, ...)``) and is differentiated with respect to ``params``.
        params: the parameters :math:`w`.
        opt_state: ``tx``'s state.
        batch: a pytree whose leaves share the leading (batch) dimension :math:`B`.
        m: examples per chunk, a divisor of :math:`B`.
        impl: ``"scan"``: ``lax.scan`` over the chunks accumulating the perturbed gradients
            (memory of one chunk). ``"vmap"``: ``jax.vmap`` over the chunks (memory of
            ``chunk_size`` chunks, per-chunk weights included). ``"auto"``: the form measured
            faster on the default backend (``"scan"`` on CPU, ``"vmap"`` elsewhere). The
            same numbers either way.
        has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` of the clean passes is returned
            stacked over the chunks (leading dimension :math:`k`).
        chunk_size: with ``impl="vmap"``, run at most this many chunks at once (a scan over
            groups of ``chunk_size`` vmapped chunks); must divide :math:`k`.
        unroll: ``lax.scan``'s ``unroll`` for the loop over chunks (or groups of chunks).
            ``True`` (default): the loop is unrolled into straight-line code, one copy of the
            forward-backward passes per chunk; compile time grows with :math:`k`, but on
            XLA:CPU a rolled loop of convolutions measured about 20x slower per chunk
            (WRN-16-2, ``benchmarks/results/m-sharpness/``), and XLA:CPU then keeps about one
            parameter-sized buffer per chunk alive (scratch memory grows with :math:`k`).
            ``1``: a rolled loop, compiled once whatever :math:`k`, scratch memory of one
            chunk (e.g. for accelerators, or many small chunks of an MLP).
        key: a PRNG key for dropout (or any randomness of ``loss_fn``), a new one each step
            (e.g. ``jax.random.fold_in(base_key, step)``). ``loss_fn`` is then called as
            ``loss_fn(params, chunk, key_c)`` with ``key_c = jax.random.split(key, k)[c]``:
            chunk :math:`c`'s clean and perturbed passes get the same key (the same dropout
            masks: both evaluate one sampled objective), each chunk its own. ``None``
            (default): ``loss_fn(params, chunk)``.
        **extra_args: passed on to ``tx.update`` (for transformations later in the chain).
            ``value=`` reaches the chain (e.g. ``optax.contrib.reduce_on_plateau``); by
            default the chain gets the clean loss :math:`\frac1k \sum_c L_c(w)`. The
            state of sam records the m-sharpness figures either way.

    Returns:
        ``(updates, new_opt_state, loss, aux)``: the chain's updates for :math:`G`, its new
        state, the clean loss :math:`\frac1k \sum_c L_c(w)`, and the clean passes' ``aux``
        stacked over the chunks (``None`` without ``has_aux``).

    Raises:
        ValueError: ``m`` does not divide the batch size (naming B, m and the divisors of
            B); ``impl`` or ``chunk_size`` invalid.
        TypeError: ``tx`` has no :func:`sam_jax.sam` state, or a variant's; ``grad_fn=`` in
            ``extra_args``; an injected hyperparameter inside a wrapper's ``lax.cond``.
    """
    if impl not in ("auto", "scan", "vmap"):
        raise ValueError(f"impl must be 'auto', 'scan' or 'vmap', got {impl!r}")
    sam_core.check_bool("has_aux", has_aux)
    if chunk_size is not None:
        sam_core.check_positive_int("chunk_size", chunk_size)
    if not isinstance(unroll, bool):
        sam_core.check_positive_int("unroll", unroll)
    if key is not None and not isinstance(key, jax.Array):
        raise TypeError(
            f"key must be a PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)), got "
            f"{type(key).__name__}"
        )
    _check_state(opt_state)
    if "grad_fn" in extra_args:
        raise TypeError(
            "m_sharpness_update builds grad_fn itself (from loss_fn, for every chunk); do "
            "not pass grad_fn="
        )
    value = extra_args.pop("value", None)
    k, m = _chunks(batch, m)
    if impl == "auto":
        impl = _AUTO_IMPL.get(jax.default_backend(), "vmap")
    group = k if impl == "vmap" else 1
    if impl == "vmap" and chunk_size is not None and chunk_size < k:
        if k % chunk_size:
            raise ValueError(
                f"chunk_size must divide the number of chunks k = B / m = {k}, got "
                f"chunk_size={chunk_size}; use one of "
                f"{[d for d in range(1, k + 1) if k % d == 0]}"
            )
        group = chunk_size
    chunked = jax.tree.map(
        lambda x: jnp.reshape(x, (k // group, group, m, *jnp.shape(x)[1:])), batch
    )
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)
    # One key per chunk, laid out as the chunks are (None: loss_fn takes no key).
    keys = None if key is None else jax.random.split(key, k)
    if keys is not None:
        keys = jnp.reshape(keys, (k // group, group, *keys.shape[1:]))
    key_args = lambda key_c: () if key_c is None else (key_c,)  # noqa: E731

    # The chain's own sam (or samon) perturbs each chunk: found once, by a probe call that
    # stops at it (nothing of the chain runs), with the hyperparameters of this step.
    found = _perturbation_rule(tx, opt_state, params, value, extra_args)
    selected = found.selected

    def chunk_fn(chunk: Any, key_c: Any) -> tuple[Any, ...]:
        out, grads = value_and_grad(params, chunk, *key_args(key_c))
        loss, aux = out if has_aux else (out, None)
        own = restrict(selected, params)
        moved, norm = found.perturb(
            jax.tree.leaves(own), jax.tree.leaves(restrict(selected, grads))
        )
        point = pick(selected, jax.tree.unflatten(jax.tree.structure(own), moved), params)
        p_out, p_grads = value_and_grad(point, chunk, *key_args(key_c))  # same key
        p_loss = p_out[0] if has_aux else p_out
        # sam's leaves take the gradient at w + e_c; leaves outside its mask (optax.partition's
        # other groups) the clean gradient, as batch SAM gives them.
        return loss, aux, p_loss, pick(selected, p_grads, grads), norm

    def group_fn(chunks: Any, group_keys: Any) -> tuple[Any, ...]:
        if group == 1:
            first = None if group_keys is None else group_keys[0]
            out = chunk_fn(jax.tree.map(lambda x: x[0], chunks), first)
            return jax.tree.map(lambda x: x[None], out)
        return jax.vmap(chunk_fn)(chunks, group_keys)

    acc = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), accumulation_dtype(p.dtype)), params)

    def body(carry: Any, xs: Any) -> tuple[Any, Any]:
        loss, aux, p_loss, p_grads, norm = group_fn(*xs)
        carry = jax.tree.map(lambda a, g: a + jnp.sum(g.astype(a.dtype), 0), carry, p_grads)
        return carry, (loss, aux, p_loss, norm)

    if k // group == 1:
        grad_sum, (losses, aux, p_losses, norms) = body(
            acc, jax.tree.map(lambda x: x[0], (chunked, keys))
        )
    else:
        grad_sum, (losses, aux, p_losses, norms) = jax.lax.scan(
            body, acc, (chunked, keys), unroll=unroll
        )
    flat = lambda x: jnp.reshape(x, (k, *jnp.shape(x)[2:])) if k // group > 1 else x  # noqa: E731
    losses, p_losses, norms = flat(losses), flat(p_losses), flat(norms)
    aux = jax.tree.map(flat, aux) if has_aux else None

    gradient = jax.tree.map(lambda s, p: (s / k).astype(p.dtype), grad_sum, params)
    loss = jnp.mean(losses)
    perturbed_loss = jnp.mean(p_losses)
    grad_norm = jnp.mean(norms)
    # The step itself: the chain sees G once, as the gradient (MultiSteps accumulates it,
    # apply_if_finite checks it, a mask splits it); sam passes it on and records the figures.
    step = MSharpnessStep(value=loss, perturbed_value=perturbed_loss, grad_norm=grad_norm)
    updates, new_state = tx.update(
        gradient, opt_state, params, grad_fn=step, value=loss if value is None else value,
        **extra_args,
    )
    return updates, new_state, loss, aux


def _chunks(batch: Any, m: Any) -> tuple[int, int]:
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("m-sharpness needs a batch with at least one array, got an empty tree")
    sizes = []
    for i, x in enumerate(leaves):
        shape = jnp.shape(x)
        if not shape:
            raise ValueError(
                f"batch leaf {i} is 0-d; every leaf of the batch needs the leading (batch) "
                "dimension"
            )
        sizes.append(shape[0])
    if any(s != sizes[0] for s in sizes):
        raise ValueError(
            f"the batch's leaves must share the leading dimension, got sizes {sizes}"
        )
    k = sam_core.m_sharpness_chunks(int(sizes[0]), m)
    return k, int(m)


#: sam_jax's variant states: m-sharpness is not defined for them (see docs/m_sharpness.md).
_VARIANTS = {
    "GSAMState": "gsam (its ascent gradient is decomposed against the whole batch's)",
    "WSAMState": "wsam (it mixes the whole batch's clean and perturbed gradients)",
    "FriendlySAMState": "friendly_sam (a momentum of full-batch gradients across steps)",
    "VaSSOState": "vasso (a moving average of full-batch gradients across steps)",
    "LookSAMState": "looksam (reuses a perturbed-gradient component across steps)",
    "EveryKSAMState": "every_k_sam (perturbs only every k-th step)",
    "MomentumSAMState": "momentum_sam (perturbs along the momentum, the same for every chunk)",
}


def _is_sam(x: Any) -> bool:
    """sam's state, or samon's (SAM on a mask of the parameters: defined per chunk too)."""
    return isinstance(x, (SAMState, SAMONState))


def _is_state(x: Any) -> bool:
    return _is_sam(x) or type(x).__name__ in _VARIANTS


def _check_state(opt_state: Any) -> None:
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_state) if _is_state(s)]
    for s in found:
        name = type(s).__name__
        if name in _VARIANTS and type(s).__module__.startswith("sam_jax"):
            raise TypeError(
                f"m_sharpness_update does not support {_VARIANTS[name]}: perturbing each chunk "
                "with its own gradient is not defined for it. Use sam_jax.sam (adaptive=True "
                "for ASAM) first in the chain."
            )
    if sum(_is_sam(s) for s in found) != 1:
        raise TypeError(
            "m_sharpness_update needs tx = optax.chain(sam_jax.sam(...), ...) (or "
            "sam_jax.samon) with exactly one of them, and its state; found "
            f"{sum(_is_sam(s) for s in found)} SAMState in opt_state (pass tx.init(params)'s "
            "state)"
        )


#: Optax wrappers that run their inner chain inside a ``lax.cond`` (or ``eval_shape``): a
#: hyperparameter computed there (a rho scheduled with ``optax.inject_hyperparams``) cannot be
#: used outside it, to perturb the chunks.
_COND_WRAPPERS = {
    optax.ApplyIfFiniteState: "optax.apply_if_finite",
    optax.MultiStepsState: "optax.MultiSteps",
    optax.ConditionallyMaskState: "optax.conditionally_mask",
    optax.ConditionallyTransformState: "optax.conditionally_transform",
}


def _perturbation_rule(
    tx: Any, opt_state: Any, params: Any, value: Any, extra_args: dict[str, Any]
) -> PerturbationFound:
    """The perturbation of the chain's sam/samon at this step, found by a probe call.

    ``optax.MultiSteps`` around the chain is looked through (its public ``inner_opt``): the
    inner state holds the step's hyperparameters, and its ``lax.cond`` would trace them
    where they cannot be used."""
    while True:
        multi = tx if isinstance(tx, optax.MultiSteps) else getattr(tx.update, "__self__", None)
        if not isinstance(multi, optax.MultiSteps):
            break
        if not isinstance(opt_state, optax.MultiStepsState):
            break
        tx, opt_state = multi.inner_opt, opt_state.inner_opt_state
    placeholder = jnp.zeros((), jnp.float32) if value is None else value
    try:
        tx.update(
            jax.tree.map(jnp.zeros_like, params), opt_state, params,
            grad_fn=PerturbationProbe(), value=placeholder, **extra_args,
        )
    except PerturbationFound as found:
        traced = [h for h in found.hyperparams if isinstance(h, jax.core.Tracer)]
        around = _cond_wrappers_around_sam(opt_state)
        if traced and around:
            raise TypeError(
                "m_sharpness_update cannot perturb the chunks with the sam_jax "
                "transformation's hyperparameters: they are traced at this step (rho injected "
                "with optax.inject_hyperparams, scheduled or not) inside "
                f"{' and '.join(around)}, "
                "which runs the chain in a jax.lax.cond. Put the wrapper after sam: "
                "optax.chain(optax.inject_hyperparams(sam_jax.sam)(rho=schedule), "
                "optax.apply_if_finite(base, n)) (it then checks the m-sharpness gradient), "
                "wrap the chain in optax.MultiSteps only at the top, or give sam_jax.sam a "
                "constant rho (not injected)."
            ) from None
        return found.with_traceback(None)  # keep no frames (and their tracers) alive
    raise TypeError(
        "m_sharpness_update did not reach the sam_jax.sam / sam_jax.samon of tx when calling "
        "tx.update (a wrapper that does not call its inner transformation?); build tx as "
        "optax.chain(sam_jax.sam(rho), ...), optionally inside optax.MultiSteps, "
        "optax.apply_if_finite, optax.masked or optax.partition"
    )


def _cond_wrappers_around_sam(state: Any) -> list[str]:
    """The wrappers of :data:`_COND_WRAPPERS` on the way from ``state``'s root to sam's."""
    paths = [p for p, leaf in jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_sam)[0]
             if _is_sam(leaf)]
    if not paths:
        return []
    around, node = [], state
    for key in paths[0]:
        if type(node) in _COND_WRAPPERS:
            around.append(_COND_WRAPPERS[type(node)])
        if isinstance(key, jax.tree_util.GetAttrKey):
            node = getattr(node, key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            node = node[key.idx]
        elif isinstance(key, jax.tree_util.DictKey):
            node = node[key.key]
        else:
            break
    return around
