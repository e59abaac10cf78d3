"""SAF and MESA in the examples' training loops: what a loop calls, per backend.

Both forms add a term to the loss (``docs/variants.md``, "SAF and MESA"); SAF needs the
examples' indices, which :func:`indexed_batches` hands out beside the batches of
:func:`examples.data.batches` (the same order: the epoch's generator draws the permutation
first). A loop that trains ``--optimizer saf`` or ``mesa``:

torch, per step (``term`` is 0 before ``start_epoch``; MESA's extra forward runs only when
the term is on)::

    for x, y, idx in indexed_batches(split, bs, seed=seed, epoch=epoch, dataset=..., augment=...):
        logits = model(xt)
        loss = loss_fn(logits, yt) + torch_trajectory_term(optimizer, model, logits, xt, idx, epoch)
        loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)

JAX, inside the jitted step (``epoch`` may be a traced int32)::

    def loss_fn(params):
        logits = apply(params, x)
        term = jax_trajectory_term(opt_state, logits, lambda p: apply(p, x), idx, epoch)
        return ce(logits, y) + term, logits
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, **jax_update_kwargs(opt_state, logits, idx, epoch))

Passes per step: SAF 1 (forward-backward); MESA 1 forward-backward plus 1 forward without
backward on the epochs with the term (:func:`extra_forwards`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from examples.data import Split, batches, epoch_rng

__all__ = [
    "TRAJECTORY_FORMS",
    "extra_forwards",
    "indexed_batches",
    "jax_trajectory_term",
    "jax_update_kwargs",
    "make_optax_trajectory",
    "make_torch_trajectory",
    "torch_trajectory_term",
]

#: The forms this module builds.
TRAJECTORY_FORMS = ("saf", "mesa")


def indexed_batches(
    split: Split, batch_size: int, *, seed: int, epoch: int, **batches_kwargs: Any
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """:func:`examples.data.batches` of a training epoch (``train=True``, the generator
    ``epoch_rng(seed, epoch)``) with each batch's indices into ``split``: ``(x, y, idx)``."""
    order = epoch_rng(seed, epoch).permutation(len(split))
    stream = batches(split, batch_size, rng=epoch_rng(seed, epoch), train=True, **batches_kwargs)
    for i, (x, y) in enumerate(stream):
        yield x, y, order[i * batch_size : i * batch_size + len(y)]


def _form_kwargs(name: str, args: Any) -> dict[str, Any]:
    """The form's own hyperparameters from ``args`` where it has them (``saf_lmbda``,
    ``trajectory_temperature``, ...), else the library's defaults."""
    keys = {"saf": ("lmbda", "temperature", "start_epoch", "lag_epochs"),
            "mesa": ("lmbda", "temperature", "start_epoch", "decay")}[name]
    out = {}
    for key in keys:
        value = getattr(args, f"{name}_{key}", None)
        if value is not None:
            out[key] = value
    return out


def make_torch_trajectory(name: str, model: Any, args: Any, num_examples: int) -> Any:
    """``sam_torch.SAF`` / ``MESA`` around SGD with the examples' SGD arguments."""
    import torch

    import sam_torch
    from examples.optimizers import _sgd_kwargs  # not at the top: optimizers imports this module

    if name == "saf":
        return sam_torch.SAF(model.parameters(), torch.optim.SGD, num_examples=num_examples,
                             **_form_kwargs(name, args), **_sgd_kwargs(args))
    if name == "mesa":
        return sam_torch.MESA(model, torch.optim.SGD, **_form_kwargs(name, args), **_sgd_kwargs(args))
    raise ValueError(f"name must be one of {TRAJECTORY_FORMS}, got {name!r}")


def torch_trajectory_term(optimizer: Any, model: Any, logits: Any, x: Any, indices: Any, epoch: int) -> Any:
    """The loss term of a step for a SAF or MESA optimizer (0 for any other optimizer)."""
    import torch

    import sam_torch

    if isinstance(optimizer, sam_torch.SAF):
        return optimizer.trajectory_loss(logits, torch.as_tensor(indices), epoch)
    if isinstance(optimizer, sam_torch.MESA):
        ema_logits = optimizer.ema_outputs(model, x) if optimizer.active(epoch) else None
        return optimizer.trajectory_loss(logits, ema_logits, epoch)
    return torch.zeros((), device=logits.device, dtype=logits.dtype)


def make_optax_trajectory(
    name: str, args: Any, schedule: Callable[[Any], Any], *, num_examples: int, num_classes: int
) -> Any:
    """``sam_jax.saf`` / ``mesa`` around the examples' SGD chain (coupled weight decay)."""
    import optax

    import sam_jax

    base = optax.chain(
        optax.add_decayed_weights(args.weight_decay),
        optax.sgd(schedule, momentum=args.momentum, nesterov=bool(getattr(args, "nesterov", False))),
    )
    if name == "saf":
        return sam_jax.saf(base, num_examples=num_examples, num_classes=num_classes, **_form_kwargs(name, args))
    if name == "mesa":
        return sam_jax.mesa(base, **_form_kwargs(name, args))
    raise ValueError(f"name must be one of {TRAJECTORY_FORMS}, got {name!r}")


def jax_trajectory_term(state: Any, logits: Any, apply_fn: Callable[[Any], Any], indices: Any, epoch: Any) -> Any:
    """The loss term inside the jitted loss: ``apply_fn(params) -> logits`` of the batch
    (MESA calls it with the EMA weights); 0 for any other optimizer state."""
    import jax.numpy as jnp

    import sam_jax

    if isinstance(state, sam_jax.SAFState):
        return state.trajectory_loss(logits, indices, epoch)
    if isinstance(state, sam_jax.MESAState):
        return state.trajectory_loss(logits, apply_fn(state.ema), epoch)
    return jnp.zeros((), logits.dtype)


def jax_update_kwargs(state: Any, logits: Any, indices: Any, epoch: Any) -> dict[str, Any]:
    """The extra arguments of ``tx.update``: SAF records the step's logits."""
    import sam_jax

    if isinstance(state, sam_jax.SAFState):
        return {"logits": logits, "indices": indices, "epoch": epoch}
    return {}


def extra_forwards(optimizer_or_state: Any, epoch: int) -> int:
    """Forwards without backward a step adds: 1 for MESA on the epochs with the term."""
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        import sam_torch

        if isinstance(optimizer_or_state, sam_torch.MESA):
            return int(optimizer_or_state.active(epoch))
    if importlib.util.find_spec("jax") is not None:
        import sam_core
        import sam_jax

        if isinstance(optimizer_or_state, sam_jax.MESAState):
            state = optimizer_or_state
            return int(bool(sam_core.trajectory_active(epoch, int(state.start_epoch), int(state.end_epoch))))
    return 0
