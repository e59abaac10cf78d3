r"""``sam_jax.saf`` and ``sam_jax.mesa``: sharpness-aware training for free (Du et al., NeurIPS 2022).

Each wraps a base Optax transformation and adds nothing to its updates: the sharpness-aware
part is a term of the loss, :func:`saf_trajectory_loss` / :func:`mesa_trajectory_loss`
(also the states' ``trajectory_loss`` methods), that the user's loss adds, inside ``jit``.
The math is :mod:`sam_core`'s ``trajectory_loss``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import sam_core

from ._ops import JaxOps

__all__ = ["MESAState", "SAFState", "mesa", "mesa_trajectory_loss", "saf", "saf_trajectory_loss"]

_OPS = JaxOps()
_NO_END = jnp.iinfo(jnp.int32).max


def _kl(logits: jax.Array, reference: jax.Array, temperature: Any, lmbda: Any) -> jax.Array:
    dtype = jnp.promote_types(jnp.asarray(logits).dtype, jnp.float32)
    return sam_core.trajectory_loss(
        jnp.asarray(logits, dtype),
        jax.lax.stop_gradient(jnp.asarray(reference, dtype)),
        temperature=jnp.asarray(temperature, dtype),
        lmbda=jnp.asarray(lmbda, dtype),
        log_softmax=lambda x: jax.nn.log_softmax(x, axis=-1),
        exp=jnp.exp,
    )


def _check_logits(logits: Any) -> jax.Array:
    logits = jnp.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(
            f"logits must be the model's outputs of shape (batch, num_classes), got shape "
            f"{logits.shape}; flatten extra axes first"
        )
    return logits


def _check_indices(indices: Any, num_examples: int) -> jax.Array:
    indices = jnp.asarray(indices)
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"indices must be integers (training-set positions), got dtype {indices.dtype}")
    if not isinstance(indices, jax.core.Tracer) and indices.size:
        # Out-of-range positions would be clamped silently by JAX's indexing; checked where
        # the values are known (outside jit).
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= num_examples:
            raise ValueError(
                f"indices must be training-set positions in [0, num_examples={num_examples}), "
                f"got values in [{low}, {high}]; pass num_examples=len(train_set)"
            )
    return indices


def _gated(loss: jax.Array, epoch: Any, start_epoch: jax.Array, end_epoch: jax.Array) -> jax.Array:
    active = sam_core.trajectory_active(jnp.asarray(epoch, jnp.int32), start_epoch, end_epoch)
    return jnp.where(active, loss, jnp.zeros_like(loss))


class SAFState(NamedTuple):
    """State of :func:`saf`.

    Attributes:
        base: the base transformation's state.
        memory: ``(lag_epochs, num_examples, num_classes)``: slot ``e % lag_epochs`` holds
            each example's outputs recorded at epoch ``e - lag_epochs`` until the updates of
            epoch ``e`` overwrite them (:func:`sam_core.saf_slot`).
        lmbda: :math:`\\lambda`; temperature: :math:`\\tau`; start_epoch, end_epoch: the
            loss is on for ``start_epoch < epoch < end_epoch`` (int32 max: no end).
    """

    base: Any
    memory: jax.Array
    lmbda: jax.Array
    temperature: jax.Array
    start_epoch: jax.Array
    end_epoch: jax.Array

    def trajectory_loss(self, logits: jax.Array, indices: jax.Array, epoch: Any) -> jax.Array:
        """:func:`saf_trajectory_loss` of this state."""
        return saf_trajectory_loss(self, logits, indices, epoch)


class MESAState(NamedTuple):
    """State of :func:`mesa`.

    Attributes:
        base: the base transformation's state.
        ema: the EMA weights :math:`\\bar w`, a tree like the parameters.
        lmbda, temperature, start_epoch, end_epoch: as in :class:`SAFState`.
    """

    base: Any
    ema: Any
    lmbda: jax.Array
    temperature: jax.Array
    start_epoch: jax.Array
    end_epoch: jax.Array

    def trajectory_loss(self, logits: jax.Array, ema_logits: jax.Array, epoch: Any) -> jax.Array:
        """:func:`mesa_trajectory_loss` of this state."""
        return mesa_trajectory_loss(self, logits, ema_logits, epoch)


def _hyper(lmbda: Any, temperature: Any, start_epoch: int, end_epoch: int | None, dtype: Any) -> dict[str, jax.Array]:
    return {
        "lmbda": jnp.asarray(lmbda, dtype),
        "temperature": jnp.asarray(temperature, dtype),
        "start_epoch": jnp.asarray(start_epoch, jnp.int32),
        "end_epoch": jnp.asarray(_NO_END if end_epoch is None else end_epoch, jnp.int32),
    }


def saf_trajectory_loss(state: SAFState, logits: jax.Array, indices: jax.Array, epoch: Any) -> jax.Array:
    r"""SAF's trajectory loss of a batch: pure, for the user's (jitted, differentiated) loss.

    .. math::

        \lambda \tau^2 \frac{1}{B} \sum_i \mathrm{KL}\bigl(\sigma(m_{e \bmod \tilde E,\,
        \mathrm{idx}_i} / \tau) \,\Vert\, \sigma(z_i / \tau)\bigr) \ \text{if}\
        E_{\mathrm{start}} < e < E_{\mathrm{end}},\ \text{else } 0,

    ``logits`` :math:`z` ``(B, C)``, ``indices`` the examples' training-set indices ``(B,)``,
    ``epoch`` the zero-based epoch (an int or an int array; traced is fine). Reads
    ``state.memory`` as the update left it; the update of the same step then records
    ``logits`` (pass them to ``update(..., logits=, indices=, epoch=)``).
    """
    logits = _check_logits(logits)
    lag = state.memory.shape[0]
    slot = sam_core.saf_slot(jnp.asarray(epoch, jnp.int32), lag)
    reference = state.memory[slot][_check_indices(indices, state.memory.shape[1])]
    loss = _kl(logits, reference, state.temperature, state.lmbda)
    return _gated(loss, epoch, state.start_epoch, state.end_epoch)


def mesa_trajectory_loss(state: MESAState, logits: jax.Array, ema_logits: jax.Array, epoch: Any) -> jax.Array:
    r"""MESA's trajectory loss of a batch: pure, for the user's loss.

    ``ema_logits`` are the model's outputs with ``state.ema`` as its parameters (the gradient
    is stopped here); 0 outside ``start_epoch < epoch < end_epoch``.
    """
    logits = _check_logits(logits)
    ema_logits = _check_logits(ema_logits)
    if ema_logits.shape != logits.shape:
        raise ValueError(
            f"ema_logits has shape {ema_logits.shape} and logits {logits.shape}; pass the "
            "outputs of the model with state.ema as its parameters on the same batch"
        )
    loss = _kl(logits, ema_logits, state.temperature, state.lmbda)
    return _gated(loss, epoch, state.start_epoch, state.end_epoch)


def _check_base(name: str, base: Any) -> optax.GradientTransformationExtraArgs:
    if not (hasattr(base, "init") and hasattr(base, "update")):
        raise TypeError(
            f"base must be an Optax GradientTransformation, e.g. sam_jax.{name}(optax.sgd(0.1, "
            f"momentum=0.9)), got {type(base).__name__} {base!r}"
        )
    return optax.with_extra_args_support(base)


def saf(
    base: optax.GradientTransformation,
    *,
    num_examples: int,
    num_classes: int,
    lmbda: float = sam_core.SAF_DEFAULTS["lmbda"],
    temperature: float = sam_core.SAF_DEFAULTS["temperature"],
    start_epoch: int = sam_core.SAF_DEFAULTS["start_epoch"],
    end_epoch: int | None = None,
    lag_epochs: int = sam_core.SAF_DEFAULTS["lag_epochs"],
    memory_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
    r"""Sharpness-Aware training for Free around the base transformation ``base``.

    The updates are ``base``'s; the state keeps a memory of the model's outputs per training
    example, which :func:`saf_trajectory_loss` (``state.trajectory_loss``) turns into the term
    :math:`\lambda \tau^2 \mathrm{KL}(\sigma(z^{(e - \tilde E)}/\tau) \Vert \sigma(z/\tau))`
    of the loss (module docstring of :mod:`sam_core._saf`). One forward-backward per step;
    a memory of ``lag_epochs * num_examples * num_classes`` values.

    Contract: ``update(grads, state, params, *, logits, indices, epoch)``, with the
    step's ``logits`` (``(B, C)``, the forward that gave ``grads``), the examples'
    ``indices`` ``(B,)`` and the zero-based ``epoch``; each example at most once per
    epoch. The update writes ``B`` rows of the memory; jit the step with the state donated
    (``jax.jit(step, donate_argnums=...)``) so that XLA writes them in place instead of
    copying the memory each step::

        opt = sam_jax.saf(optax.sgd(0.1, momentum=0.9), num_examples=n, num_classes=10)
        def loss_fn(p, x, y, idx, epoch, state):
            logits = model.apply(p, x)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return ce + state.trajectory_loss(logits, idx, epoch), logits
        (loss, logits), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, y, idx, epoch, state)
        updates, state = opt.update(g, state, p, logits=logits, indices=idx, epoch=epoch)

    Reference: Du et al., "Sharpness-Aware Training for Free", NeurIPS 2022. Defaults from
    the official code (github.com/AngusDujw/SAF) and its README: ``lmbda=0.3``,
    ``temperature=5``, ``start_epoch=5``, ``lag_epochs=3``.
    """
    sam_core.validate_saf(
        num_examples=num_examples, num_classes=num_classes, lmbda=lmbda, temperature=temperature,
        start_epoch=start_epoch, end_epoch=end_epoch, lag_epochs=lag_epochs,
    )
    inner = _check_base("saf", base)

    def init_fn(params: optax.Params) -> SAFState:
        return SAFState(
            base=inner.init(params),
            memory=jnp.zeros((lag_epochs, num_examples, num_classes), memory_dtype),
            **_hyper(lmbda, temperature, start_epoch, end_epoch, memory_dtype),
        )

    def update_fn(
        updates: optax.Updates,
        state: SAFState,
        params: optax.Params | None = None,
        *,
        logits: jax.Array | None = None,
        indices: jax.Array | None = None,
        epoch: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SAFState]:
        if logits is None or indices is None or epoch is None:
            raise ValueError(
                "sam_jax.saf's update records the step's outputs: pass them, "
                "opt.update(grads, state, params, logits=logits, indices=indices, epoch=epoch)"
            )
        logits = _check_logits(logits)
        indices = _check_indices(indices, num_examples)
        if indices.shape != (logits.shape[0],):
            raise ValueError(
                f"indices must have shape ({logits.shape[0]},), one training-set index per row "
                f"of logits, got {indices.shape}"
            )
        if logits.shape[1] != num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes, but num_classes={num_classes}")
        new_updates, base_state = inner.update(updates, state.base, params, **extra_args)
        slot = sam_core.saf_slot(jnp.asarray(epoch, jnp.int32), lag_epochs)
        recorded = jax.lax.stop_gradient(logits).astype(state.memory.dtype)
        memory = state.memory.at[slot, indices].set(recorded)
        return new_updates, state._replace(base=base_state, memory=memory)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mesa(
    base: optax.GradientTransformation,
    *,
    decay: float = sam_core.MESA_DEFAULTS["decay"],
    lmbda: float = sam_core.MESA_DEFAULTS["lmbda"],
    temperature: float = sam_core.MESA_DEFAULTS["temperature"],
    start_epoch: int = sam_core.MESA_DEFAULTS["start_epoch"],
    end_epoch: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Memory-Efficient Sharpness-Aware training around the base transformation ``base``.

    The updates are ``base``'s; the state keeps the EMA of the weights,
    :math:`\bar w \leftarrow \beta \bar w + (1 - \beta) w` with :math:`w` the parameters
    after this update (``params + updates``; :func:`sam_core.ema_update`), starting at the
    parameters given to ``init``. :func:`mesa_trajectory_loss` (``state.trajectory_loss``)
    is the loss's term against the model's outputs with ``state.ema``: one forward-backward
    plus one forward without backward per step, one parameter-sized buffer.

    Contract: ``update(grads, state, params)`` (``params`` required)::

        opt = sam_jax.mesa(optax.sgd(0.1, momentum=0.9))
        def loss_fn(p, x, y, epoch, state):
            logits = model.apply(p, x)
            ema_logits = model.apply(state.ema, x)          # gradient stopped by the loss
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return ce + state.trajectory_loss(logits, ema_logits, epoch)
        g = jax.grad(loss_fn)(p, x, y, epoch, state)
        updates, state = opt.update(g, state, p)

    Reference: Du et al., "Sharpness-Aware Training for Free", NeurIPS 2022. Defaults from
    the official code (github.com/AngusDujw/SAF) and its README: ``decay=0.9998``,
    ``lmbda=0.8``, ``temperature=5``, ``start_epoch=5``.
    """
    sam_core.validate_mesa(
        lmbda=lmbda, temperature=temperature, start_epoch=start_epoch, end_epoch=end_epoch, decay=decay
    )
    inner = _check_base("mesa", base)

    def init_fn(params: optax.Params) -> MESAState:
        leaves = jax.tree.leaves(params)
        dtype = jnp.result_type(jnp.float32, *[jnp.asarray(x).dtype for x in leaves]) if leaves else jnp.float32
        return MESAState(
            base=inner.init(params),
            ema=jax.tree.map(jnp.array, params),
            **_hyper(lmbda, temperature, start_epoch, end_epoch, dtype),
        )

    def update_fn(
        updates: optax.Updates, state: MESAState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, MESAState]:
        if params is None:
            raise ValueError(
                "sam_jax.mesa averages the weights: pass params to update, "
                "opt.update(grads, state, params)"
            )
        new_updates, base_state = inner.update(updates, state.base, params, **extra_args)
        new_params = optax.apply_updates(params, new_updates)
        e_leaves, treedef = jax.tree.flatten(state.ema)
        ema = sam_core.ema_update(_OPS, e_leaves, jax.tree.leaves(new_params), decay)
        return new_updates, state._replace(base=base_state, ema=jax.tree.unflatten(treedef, ema))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
