"""Optimizer factories for the examples, one registry per backend.

``make_torch_optimizer("sam", model, args)`` and ``make_optax("sam", args, steps_per_epoch)``
build the same optimizer from the scripts' arguments (``lr``, ``momentum``,
``weight_decay``, ``nesterov``, ``rho``, ``eta``, ``schedule``, ``epochs``). To add a variant,
add one entry to :data:`TORCH_OPTIMIZERS` and one to :data:`OPTAX_OPTIMIZERS`; a torch
optimizer with ``first_step``/``second_step`` is trained with two passes, an optax chain
whose update needs ``grad_fn`` is given one (``OptaxEntry.needs_grad_fn``).

Weight decay is coupled as in ``torch.optim.SGD`` (added to the gradient before momentum),
which in optax is ``add_decayed_weights`` before ``sgd``; for SAM the decay is taken at
:math:`w` with the perturbed-point gradient, in both backends.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from examples.cli import FORM_OPTIONS, TRAJECTORY_FORMS, form_option
from examples.trajectory import make_optax_trajectory, make_torch_trajectory

__all__ = [
    "ESAM_BETA",
    "ESAM_GAMMA",
    "NO_M_SHARPNESS",
    "OPTAX_OPTIMIZERS",
    "TORCH_OPTIMIZERS",
    "OptaxEntry",
    "check_m_sharpness",
    "make_optax",
    "make_torch_optimizer",
    "optax_schedule",
]


def _params(model_or_params: Any) -> Any:
    return (
        model_or_params.parameters()
        if hasattr(model_or_params, "parameters")
        else (model_or_params)
    )


def _sgd_kwargs(args: Any) -> dict[str, Any]:
    return {
        "lr": args.lr,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "nesterov": bool(getattr(args, "nesterov", False)),
    }


def _torch_sgd(model_or_params: Any, args: Any) -> Any:
    import torch

    return torch.optim.SGD(_params(model_or_params), **_sgd_kwargs(args))


def _torch_sam(adaptive: bool) -> Callable[[Any, Any], Any]:
    def build(model_or_params: Any, args: Any) -> Any:
        import torch

        import sam_torch

        return sam_torch.SAM(
            _params(model_or_params),
            torch.optim.SGD,
            rho=args.rho,
            adaptive=adaptive,
            eta=args.eta,
            **_sgd_kwargs(args),
        )

    return build


def _torch_bsam(model_or_params: Any, args: Any) -> Any:
    """Bayesian SAM (its own Adam-like optimizer): ``lr``, ``rho``, ``weight_decay`` (the
    prior precision) from the arguments, ``betas=(momentum, 0.999)``, ``num_data`` set by the
    training loop (the training set's size)."""
    import sam_torch

    num_data = getattr(args, "num_data", None)
    if num_data is None:
        raise ValueError("bsam needs args.num_data, the number of training examples")
    model = model_or_params if hasattr(model_or_params, "parameters") else None
    return sam_torch.BSAM(
        _params(model_or_params), num_data=num_data, lr=args.lr, betas=(args.momentum, 0.999),
        rho=args.rho, weight_decay=args.weight_decay, seed=getattr(args, "seed", 0), model=model,
    )


#: Forms the loops do not run with m-sharpness: AE-SAM decides per batch from the whole
#: batch's gradient, ESAM selects examples of the whole batch, BSAM is its own optimizer;
#: SAF and MESA perturb nothing (a trajectory loss, no rho).
NO_M_SHARPNESS = ("aesam", "esam", "bsam", *TRAJECTORY_FORMS)


def check_m_sharpness(name: str, m: int | None) -> None:
    """Raise for ``m`` (m-sharpness) with a form of :data:`NO_M_SHARPNESS`."""
    if m is not None and name in TRAJECTORY_FORMS:
        raise ValueError(
            f"m_sharpness={m} is not supported with optimizer {name!r}: it is no SAM-family "
            "form (a trajectory loss, no perturbation or rho); drop m_sharpness, or use sam "
            "or asam with it"
        )
    if m is not None and name in NO_M_SHARPNESS:
        raise ValueError(
            f"m_sharpness={m} is not supported with optimizer {name!r} (its step is defined on "
            "the whole batch); drop m_sharpness, or use sam or asam with it"
        )


#: ESAM's knobs in both registries (the library's defaults, the paper's CIFAR runs): each
#: parameter tensor perturbed with probability beta, the perturbed gradient on the gamma
#: fraction of the batch whose loss rises most.
ESAM_BETA, ESAM_GAMMA = 0.5, 0.5

#: name -> ``build(model_or_params, args)`` returning a ``torch.optim.Optimizer``.
TORCH_OPTIMIZERS: dict[str, Callable[[Any, Any], Any]] = {
    "sgd": _torch_sgd,
    "sam": _torch_sam(adaptive=False),
    "asam": _torch_sam(adaptive=True),
    "bsam": _torch_bsam,
}


def _torch_variant(cls_name: str, **variant_kwargs: Any) -> Callable[[Any, Any], Any]:
    """A SAM-family class of sam_torch (docs/variants.md) with its defaults; ``rho`` and
    ``eta`` from the arguments. SAM-ON needs the model (its normalization layers)."""

    def build(model_or_params: Any, args: Any) -> Any:
        import torch

        import sam_torch

        cls = getattr(sam_torch, cls_name)
        extra = dict(variant_kwargs)
        for flag in set(extra) & set(FORM_OPTIONS):  # --k / --alpha when given
            value = getattr(args, flag, None)
            extra[flag] = extra[flag] if value is None else value
        if cls_name == "SAMON":
            if not hasattr(model_or_params, "parameters"):
                raise TypeError("samon needs the model (its normalization layers), not params")
            extra["norm_params"] = model_or_params
        if cls_name == "AESAM":  # the paper's c schedule over the run (set by the loop)
            extra["total_steps"] = getattr(args, "total_steps", None)
        if cls_name == "ESAM":  # its perturbed calls freeze the batch-norm statistics
            extra["seed"] = getattr(args, "seed", 0)
            if hasattr(model_or_params, "parameters"):
                extra["model"] = model_or_params
        if cls_name != "MomentumSAM":
            extra["eta"] = args.eta
        return cls(
            _params(model_or_params), torch.optim.SGD, rho=args.rho, **extra, **_sgd_kwargs(args)
        )

    return build


TORCH_OPTIMIZERS.update(
    gsam=_torch_variant("GSAM", alpha=0.2),
    samon=_torch_variant("SAMON"),
    looksam=_torch_variant("LookSAM", k=5, alpha=0.7),
    everyk=_torch_variant("EveryKSAM", k=5),
    msam=_torch_variant("MomentumSAM"),
    fsam=_torch_variant("FriendlySAM", sigma=1.0, lmbda=0.9),
    wsam=_torch_variant("WSAM", gamma=0.88),
    vasso=_torch_variant("VaSSO", theta=0.9),
    # AE-SAM: the library's delta 0.9 and c from 1 to -1 over the run (total_steps)
    aesam=_torch_variant("AESAM"),
    esam=_torch_variant("ESAM", beta=ESAM_BETA, gamma=ESAM_GAMMA),
)


def _torch_trajectory(name: str) -> Callable[[Any, Any], Any]:
    """SAF / MESA around SGD (:func:`examples.trajectory.make_torch_trajectory`) with the
    library's defaults unless ``args.saf_*`` / ``args.mesa_*`` say otherwise; SAF's memory
    has ``args.num_data`` rows (set by the loop: the training set's size)."""

    def build(model_or_params: Any, args: Any) -> Any:
        num_data = getattr(args, "num_data", None)
        if name == "saf" and num_data is None:
            raise ValueError("saf needs args.num_data, the number of training examples")
        return make_torch_trajectory(name, model_or_params, args, num_examples=num_data)

    return build


TORCH_OPTIMIZERS.update(saf=_torch_trajectory("saf"), mesa=_torch_trajectory("mesa"))


def make_torch_optimizer(name: str, model_or_params: Any, args: Any) -> Any:
    """Build the torch optimizer ``name`` (a key of :data:`TORCH_OPTIMIZERS`).

    The learning rate is ``args.lr``; the training script sets ``group["lr"]`` each step
    from :func:`examples.cli.lr_at`.
    """
    if name not in TORCH_OPTIMIZERS:
        raise ValueError(
            f"optimizer must be one of {sorted(TORCH_OPTIMIZERS)}, got {name!r}; register new "
            "ones in examples.optimizers.TORCH_OPTIMIZERS"
        )
    return TORCH_OPTIMIZERS[name](model_or_params, args)


def optax_schedule(args: Any, steps_per_epoch: int) -> Callable[[Any], Any]:
    """:func:`examples.cli.lr_at` as a jit-friendly optax schedule of the update count."""
    import jax.numpy as jnp

    from examples.cli import STEP_GAMMA, step_milestones

    lr, epochs = args.lr, args.epochs
    if args.schedule == "step":
        milestones = jnp.asarray(step_milestones(epochs))

        def step_schedule(count: Any) -> Any:
            passed = jnp.sum(count // steps_per_epoch >= milestones)
            return lr * jnp.asarray(STEP_GAMMA, jnp.float32) ** passed

        return step_schedule
    if args.schedule == "cosine":
        total = epochs * steps_per_epoch

        def cosine_schedule(count: Any) -> Any:
            t = jnp.minimum(count, total) / total
            return 0.5 * lr * (1.0 + jnp.cos(jnp.pi * t))

        return cosine_schedule
    raise ValueError(f"schedule must be 'step' or 'cosine', got {args.schedule!r}")


@dataclass(frozen=True)
class OptaxEntry:
    """An optax optimizer of the registry: ``build(args, schedule)``, whether its update
    needs ``grad_fn`` (the SAM family) and, for the variants that alternate full SAM steps
    with one-pass steps (LookSAM, every-k), ``full_step(t, k)`` for step ``t`` (0-based) and
    interval ``k``: the training loop then passes ``full_step=`` as a static choice (one
    jitted step per value), which avoids ``lax.cond``'s slow path for convolutions on
    XLA:CPU. ``needs_clean_grad=False`` (Momentum-SAM, BSAM): the update reads no clean
    gradient, so the loop makes no clean pass (Momentum-SAM: one forward-backward per step).
    ``decided_on_host`` (AE-SAM) and ``per_example_loss`` (ESAM): the loop's own steps for
    those forms."""

    build: Callable[[Any, Callable[[Any], Any]], Any]
    needs_grad_fn: bool
    full_step: Callable[[int, int], bool] | None = None
    needs_clean_grad: bool = True
    #: forward-backward passes ``grad_fn`` makes on a full step (BSAM: 2, at the posterior
    #: sample and at the perturbed mean; its transformation reads no clean gradient)
    grad_fn_passes: int = 1
    #: AE-SAM: the full/one-pass choice is the rule's, from the clean gradient; the loop
    #: reads it on the host (``state.is_sam_step``) and runs the perturbed pass only then
    decided_on_host: bool = False
    #: ESAM: ``update(..., loss_fn=, losses=)`` with per-example losses instead of ``grad_fn``
    per_example_loss: bool = False
    #: SAF / MESA: a trajectory term in the loss (:mod:`examples.trajectory`); the loop hands
    #: the step the batch's example indices and the epoch
    trajectory: bool = False


def _optax_base(args: Any, schedule: Callable[[Any], Any]) -> list[Any]:
    import optax

    return [
        optax.add_decayed_weights(args.weight_decay),
        optax.sgd(schedule, momentum=args.momentum, nesterov=bool(args.nesterov)),
    ]


def _optax_sgd(args: Any, schedule: Callable[[Any], Any]) -> Any:
    import optax

    return optax.chain(*_optax_base(args, schedule))


def _optax_sam(adaptive: bool) -> Callable[[Any, Callable[[Any], Any]], Any]:
    def build(args: Any, schedule: Callable[[Any], Any]) -> Any:
        import optax

        import sam_jax

        warmup = getattr(args, "rho_warmup_steps", 0)
        if warmup:  # rho as a schedule of the update count
            first = optax.inject_hyperparams(sam_jax.sam, static_args=("adaptive",))(
                rho=sam_jax.rho_warmup_schedule(args.rho, warmup),
                adaptive=adaptive,
                eta=args.eta,
            )
        else:
            first = sam_jax.sam(rho=args.rho, adaptive=adaptive, eta=args.eta)
        return optax.chain(first, *_optax_base(args, schedule))

    return build


#: name -> :class:`OptaxEntry`.
OPTAX_OPTIMIZERS: dict[str, OptaxEntry] = {
    "sgd": OptaxEntry(_optax_sgd, needs_grad_fn=False),
    "sam": OptaxEntry(_optax_sam(adaptive=False), needs_grad_fn=True),
    "asam": OptaxEntry(_optax_sam(adaptive=True), needs_grad_fn=True),
}


def _optax_variant(name: str) -> OptaxEntry:
    """A SAM-family transformation of sam_jax (docs/variants.md) first in the SGD chain,
    with the same defaults as the torch entry; ``rho`` and ``eta`` from the arguments."""

    def build(args: Any, schedule: Callable[[Any], Any]) -> Any:
        import optax

        import sam_jax

        eta = args.eta
        warmup = getattr(args, "rho_warmup_steps", 0)

        def first(factory: Callable[..., Any], *static: str, **kwargs: Any) -> Any:
            # rho ramped (--rho-warmup-epochs): a schedule of the update count through
            # optax.inject_hyperparams; the arguments that are no numbers stay static
            if not warmup:
                return factory(args.rho, **kwargs)
            return optax.inject_hyperparams(factory, static_args=static)(
                rho=sam_jax.rho_warmup_schedule(args.rho, warmup), **kwargs
            )

        if name == "wsam":  # decoupled WSAM wraps the base optimizer
            base = optax.chain(*_optax_base(args, schedule))
            return optax.chain(
                first(
                    sam_jax.wsam, "base", "learning_rate",
                    gamma=0.88, eta=eta, base=base, learning_rate=schedule,
                )
            )
        transformation = {
            "gsam": lambda: first(sam_jax.gsam, alpha=form_option(args, "alpha", name), eta=eta),
            # the Flax WideResNet names its BatchNorm layers bn, bn1, bn2
            "samon": lambda: first(
                sam_jax.samon,
                "mask",
                eta=eta,
                mask=lambda p: sam_jax.normalization_mask(
                    p, lambda path, _: any(n.startswith("bn") for n in path)
                ),
            ),
            "looksam": lambda: first(
                sam_jax.looksam, "k",
                k=form_option(args, "k", name), alpha=form_option(args, "alpha", name), eta=eta,
            ),
            "everyk": lambda: first(
                sam_jax.every_k_sam, "k", k=form_option(args, "k", name), eta=eta
            ),
            "msam": lambda: first(sam_jax.momentum_sam, momentum=args.momentum),
            "fsam": lambda: first(sam_jax.friendly_sam, sigma=1.0, lmbda=0.9, eta=eta),
            "vasso": lambda: first(sam_jax.vasso, theta=0.9, eta=eta),
            # the library's delta and c schedule over the run's steps (make_optax sets them)
            "aesam": lambda: first(
                sam_jax.ae_sam, "total_steps", total_steps=args.total_steps, eta=eta
            ),
            "esam": lambda: first(
                sam_jax.esam, "beta", "gamma", "mask", "seed",
                beta=ESAM_BETA, gamma=ESAM_GAMMA, seed=int(getattr(args, "seed", 0) or 0),
                eta=eta,
            ),
        }[name]()
        return optax.chain(transformation, *_optax_base(args, schedule))

    full_step = {
        "looksam": lambda t, k: t % k == 0,  # sam_jax.looksam: full when count % k == 0
        # sam_jax.every_k_sam: full when (count + 1) % k == 0
        "everyk": lambda t, k: (t + 1) % k == 0,
    }.get(name)
    return OptaxEntry(
        build, needs_grad_fn=name != "esam", full_step=full_step,
        needs_clean_grad=name != "msam", decided_on_host=name == "aesam",
        per_example_loss=name == "esam",
    )


OPTAX_OPTIMIZERS.update(
    {
        name: _optax_variant(name)
        for name in (
            "gsam", "samon", "looksam", "everyk", "msam", "fsam", "wsam", "vasso", "aesam",
            "esam",
        )
    }
)


def _optax_bsam(args: Any, schedule: Callable[[Any], Any]) -> Any:
    """Bayesian SAM, a complete optimizer (the torch entry's settings): ``lr`` as the
    schedule, ``betas=(momentum, 0.999)``, ``rho``, ``weight_decay`` (the prior precision),
    ``num_data`` (the training set's size, set by the loop) and the run's seed for its
    noise; in a one-element chain, so that the state is found where the loop looks."""
    import optax

    import sam_jax

    num_data = getattr(args, "num_data", None)
    if num_data is None:
        raise ValueError("bsam needs args.num_data, the number of training examples")
    return optax.chain(
        sam_jax.bsam(
            num_data=num_data, lr=schedule, betas=(args.momentum, 0.999), rho=args.rho,
            weight_decay=args.weight_decay, seed=int(getattr(args, "seed", 0) or 0),
        )
    )


OPTAX_OPTIMIZERS["bsam"] = OptaxEntry(
    _optax_bsam, needs_grad_fn=True, needs_clean_grad=False, grad_fn_passes=2
)


def _optax_trajectory(name: str) -> OptaxEntry:
    """``sam_jax.saf`` / ``mesa`` around the SGD chain
    (:func:`examples.trajectory.make_optax_trajectory`, the torch entry's settings); SAF's
    memory needs ``args.num_data`` and ``args.num_classes`` (set by the loop)."""

    def build(args: Any, schedule: Callable[[Any], Any]) -> Any:
        num_data, num_classes = getattr(args, "num_data", None), getattr(args, "num_classes", None)
        if name == "saf" and (num_data is None or num_classes is None):
            raise ValueError("saf needs args.num_data and args.num_classes (its output memory)")
        return make_optax_trajectory(
            name, args, schedule, num_examples=num_data, num_classes=num_classes
        )

    return OptaxEntry(build, needs_grad_fn=False, trajectory=True)


OPTAX_OPTIMIZERS.update(saf=_optax_trajectory("saf"), mesa=_optax_trajectory("mesa"))


def make_optax(name: str, args: Any, steps_per_epoch: int) -> Any:
    """Build the optax optimizer ``name`` (a key of :data:`OPTAX_OPTIMIZERS`).

    The learning rate follows :func:`optax_schedule` (the torch script's schedule); with
    ``args.rho_warmup_epochs`` > 0, every SAM-family form's rho follows
    :func:`sam_jax.rho_warmup_schedule` (``optax.inject_hyperparams``). Whether
    ``tx.update`` needs ``grad_fn`` is ``OPTAX_OPTIMIZERS[name].needs_grad_fn``.
    """
    if name not in OPTAX_OPTIMIZERS:
        raise ValueError(
            f"optimizer must be one of {sorted(OPTAX_OPTIMIZERS)}, got {name!r}; register new "
            "ones in examples.optimizers.OPTAX_OPTIMIZERS"
        )
    from examples.cli import RHO_WARMUP_OPTIMIZERS, rho_warmup_steps

    entry = OPTAX_OPTIMIZERS[name]
    warmup = rho_warmup_steps(args, steps_per_epoch)
    if warmup and name not in RHO_WARMUP_OPTIMIZERS:
        raise ValueError(
            f"rho_warmup_epochs supports {', '.join(RHO_WARMUP_OPTIMIZERS)}, got {name!r}"
        )
    args = copy.copy(args)
    args.rho_warmup_steps = warmup  # read by the SAM-family builders
    if getattr(args, "total_steps", None) is None:  # AE-SAM's schedule of c over the run
        args.total_steps = args.epochs * steps_per_epoch
    return entry.build(args, optax_schedule(args, steps_per_epoch))
