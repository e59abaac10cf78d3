r"""m-sharpness on one device: ``sam_torch.m_sharpness_step``.

m-sharpness (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021, Sec. 4.1 and Fig. 3) perturbs each chunk of ``m`` examples with
that chunk's own gradient. The batch of :math:`B` examples is split into :math:`k = B / m`
consecutive chunks; with :math:`L_c` the mean loss of chunk :math:`c` and
:math:`g_c = \nabla L_c(w)`,

.. math::

    e_c = \rho \, \frac{T_w^2 \, g_c}{\lVert T_w g_c \rVert_2 + \epsilon}, \qquad
    G = \frac{1}{k} \sum_{c=1}^{k} \nabla L_c(w + e_c),

and the base optimizer applies :math:`G` at :math:`w`. :math:`m = B` is batch SAM exactly.
The perturbation is :mod:`sam_core`'s (through :class:`~sam_torch.SAM`'s own machinery in the
loop, through :class:`~sam_torch.TorchOps` under ``torch.func`` in the vectorized path).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import sam_core

from ._bn import disable_running_stats
from ._entry import base_step, entry_point
from ._ops import TorchOps
from ._rng import RNGReplay
from ._sam import SAM, _finite_flag
from ._variants import SAMON

__all__ = ["m_sharpness_step"]

#: Per device type, whether ``vectorize="auto"`` takes the vectorized path (the loop stays the
#: fallback). From ``benchmarks/results/m-sharpness/`` (WRN-16-2, batch 128, 2 CPU threads):
#: on CPU the vectorized path measured faster at every m (1.39-1.66x a batch-SAM step against
#: 2.4-6.0x for the loop: convolutions at batch m cost 1.4-2.9x per example what they cost at
#: batch 128, and the vectorized path runs them as one batched-weight kernel); other devices
#: were not measured and get the vectorized path, one kernel for the k chunks.
_AUTO_VECTORIZE = {"cpu": True}

#: Models the vectorized path failed on under ``"auto"``, with the reason (warned once each).
_NOT_VECTORIZABLE: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()

#: SAM subclasses and why m-sharpness is not defined for them (see ``m_sharpness_step``).
_UNSUPPORTED = {
    "GSAM": "its ascent gradient is decomposed against the clean gradient of the whole batch",
    "WSAM": "it mixes the clean and perturbed gradients of the whole batch with a weight",
    "FriendlySAM": "its perturbation subtracts a momentum of full-batch gradients kept across steps",
    "VaSSO": "its perturbation follows a moving average of full-batch gradients kept across steps",
    "LookSAM": "it reuses one perturbed-gradient component across steps",
    "EveryKSAM": "it perturbs only every k-th step",
    "MomentumSAM": "it perturbs along the momentum buffer, the same for every chunk",
    "ScaledSAM": "GradScaler's loss scale would have to be shared by k perturbed passes",
}


@entry_point("step", sam_of=lambda args, kwargs: args[0] if args else kwargs.get("optimizer"))
def m_sharpness_step(
    optimizer: SAM,
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    *,
    m: int,
    vectorize: bool | Literal["auto"] = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    r"""One m-sharpness SAM step on one device; returns the clean loss (a 0-d tensor).

    The batch of :math:`B` examples is split into :math:`k = B / m` consecutive chunks of
    ``m``. Each chunk :math:`c` is perturbed with its own gradient :math:`g_c = \nabla L_c(w)`
    (SAM, or ASAM for adaptive groups, with each param group's ``rho``/``adaptive``/``eta``/
    ``sam_eps`` and one norm over all groups, as in :class:`~sam_torch.SAM`):

    .. math::

        e_c = \rho \, \frac{T_w^2 \, g_c}{\lVert T_w g_c \rVert_2 + \epsilon}, \qquad
        G = \frac{1}{k} \sum_{c} \nabla L_c(w + e_c),

    and the base optimizer applies :math:`G` at :math:`w`. ``m = B`` is batch SAM
    (``optimizer.step(closure)``) exactly; smaller ``m`` is the m-sharpness of Foret et al.,
    ICLR 2021 (Sec. 4.1, Fig. 3: smaller m generalizes better; ``m = 16`` per device in their
    CIFAR runs), and ``m = 1`` the 1-SAM of Baek, Kolter & Raghunathan, ICLR 2024.

    Usage (replaces ``loss = optimizer.step(closure)`` in a training loop)::

        def loss_fn(model, chunk):
            x, y = chunk
            return F.cross_entropy(model(x), y)   # the chunk's MEAN loss; no backward()

        sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.05)
        for x, y in loader:                       # batches of B = 128
            loss = m_sharpness_step(sam, model, loss_fn, (x, y), m=16)

    After the step: the weights are :math:`w` after the base step (between chunks they are
    restored bit for bit by :class:`~sam_torch.SAM`'s own restore, so k perturb/restore cycles
    do not drift); each optimized parameter's ``.grad`` holds :math:`G`;
    ``optimizer.loss`` is :math:`\frac1k \sum_c L_c(w)` (also returned),
    ``optimizer.perturbed_loss`` is :math:`\frac1k \sum_c L_c(w + e_c)`,
    ``optimizer.sharpness`` their difference, and ``optimizer.grad_norm`` the mean over the
    chunks of the norms the perturbations were scaled by. ``skip_nonfinite`` is honoured as
    by ``step(closure)``: a non-finite clean gradient of any chunk (or a non-finite perturbed
    loss under ``"clean"``, or perturbed gradient under ``"both"``) skips the base step and
    leaves the weights, the optimizer state and the batch-norm running statistics unchanged
    (``optimizer.step_skipped``). If anything raises (in ``loss_fn``, ``backward``, out of
    memory, ``KeyboardInterrupt``), the weights are :math:`w` bit for bit, the running
    statistics are those before the step and no base step is taken.

    Batch norm in training mode: every chunk is normalized with its own batch statistics
    (as every device is in the original multi-device code), in the clean and the perturbed
    pass. The running statistics are updated once per step, from the clean passes only:
    ``running = (1 - momentum) * running + momentum * mean_c(s_c)`` where ``s_c`` is chunk
    ``c``'s batch mean (and unbiased batch variance), i.e. the mean over the chunks of the
    running statistics each chunk alone would give, which is what a multi-device run whose
    replicas average their statistics (synced batch stats) holds; ``num_batches_tracked``
    grows by one (with ``momentum=None``, the cumulative average of these means).
    Other buffers a model updates in ``forward`` are not managed.

    Dropout (the optimizer's ``dropout``): ``"same"`` (default) replays the random-number
    generators (:class:`~sam_torch.RNGReplay`) so each chunk's perturbed pass draws the masks
    of its clean pass; every chunk and every step draws fresh ones. ``"fresh"``: new masks in
    the perturbed passes. The vectorized path runs dropout models under
    ``vmap(randomness="different")`` (each chunk its own masks, the same rule; another
    sample than the loop's, the same distribution).

    Args:
        optimizer: a :class:`~sam_torch.SAM` (SAM or ASAM, any base optimizer, any param
            groups) or :class:`~sam_torch.SAMON` (each chunk perturbs the masked parameters
            with its own gradient). The variants whose definition needs the whole batch's
            gradients or state carried across steps (GSAM, WSAM, FriendlySAM, VaSSO,
            LookSAM, EveryKSAM, MomentumSAM) and ``ScaledSAM`` raise ``TypeError``.
        model: the module ``loss_fn`` calls; its parameters in the optimizer's groups are
            the ones perturbed and stepped.
        loss_fn: ``loss_fn(model, chunk)`` returns the chunk's **mean** loss (a 0-d tensor)
            without calling ``backward()``. Under ``vectorize=True`` it runs under
            ``torch.func.vmap``: no data-dependent Python control flow, no ``.item()``.
        batch: a tensor, a tuple/list, or a dict of tensors (nesting allowed) whose leaves
            share the leading (batch) dimension :math:`B`; each chunk has the same structure.
        m: examples per chunk, a divisor of :math:`B` (``ValueError`` naming B, m and the
            divisors of B otherwise).
        vectorize: ``False``: a loop over the chunks (any model). ``True``: one
            ``torch.func.vmap`` over the chunks of ``grad`` through ``functional_call``
            (per-chunk weights, so convolutions become batched-weight ones); the same
            numbers (float64 to 1e-12). ``"auto"``: the path measured faster on the device
            (the vectorized path on CPU, by ``benchmarks/results/m-sharpness/``, and
            elsewhere), falling back to the loop, with a one-time warning that says why,
            for a model the vectorized path cannot run. The vectorized path holds the
            per-chunk perturbed weights and activations of ``chunk_size`` chunks at once
            (WRN-16-2, batch 128: about 1 GiB more peak memory than the loop); pass
            ``vectorize=False`` or a ``chunk_size`` where memory is short.
        chunk_size: with the vectorized path, at most this many chunks are computed at once
            (``torch.func.vmap``'s ``chunk_size``; bounds memory). ``None``: all k at once.

    Returns:
        The clean loss :math:`\frac1k \sum_c L_c(w)`, a detached 0-d tensor.

    Raises:
        TypeError: ``optimizer`` is not a SAM, or a variant m-sharpness is not defined for;
            ``batch`` of an unsupported type; ``vectorize``/``chunk_size`` of a wrong type.
        ValueError: ``m`` does not divide the batch size, leaves with different leading
            dimensions, an empty batch; ``vectorize=True`` on a model it cannot run
            (the reason is named).
        RuntimeError: called between ``first_step()`` and ``second_step()``.
    """
    _check_optimizer(optimizer)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be callable as loss_fn(model, chunk), got {type(loss_fn).__name__}"
        )
    if not (isinstance(vectorize, bool) or vectorize == "auto"):
        raise ValueError(f"vectorize must be True, False or 'auto', got {vectorize!r}")
    if chunk_size is not None:
        sam_core.check_positive_int("chunk_size", chunk_size)
    if optimizer.is_perturbed:
        raise RuntimeError(
            "m_sharpness_step() called between first_step() and second_step(): finish the "
            "two-step API with second_step() (or restore()) first."
        )
    batch_size = _batch_size(batch)
    k = sam_core.m_sharpness_chunks(batch_size, m)
    chunks = _split(batch, m)

    use_vmap = vectorize is True
    if vectorize == "auto":
        device = _device_of(optimizer)
        use_vmap = _AUTO_VECTORIZE.get(device.type, True) and model not in _NOT_VECTORIZABLE
    if optimizer.gc:  # first_step centralizes each chunk's clean gradient: the loop
        if vectorize is True:
            raise ValueError(
                "m_sharpness_step(vectorize=True) does not centralize gradients (the optimizer "
                "has gc=True); use vectorize=False or 'auto' (the loop over chunks)"
            )
        use_vmap = False
    if use_vmap:
        try:
            return _vectorized_step(optimizer, model, loss_fn, batch, k, m, chunk_size)
        except _NotVectorizable as exc:
            if vectorize is True:
                raise ValueError(
                    f"m_sharpness_step(vectorize=True) cannot run this model under "
                    f"torch.func.vmap: {exc.reason}. Use vectorize=False (the loop over "
                    "chunks, same numbers) or vectorize='auto'."
                ) from exc.__cause__
            _NOT_VECTORIZABLE[model] = exc.reason
            warnings.warn(
                f"m_sharpness_step(vectorize='auto'): the model cannot run under "
                f"torch.func.vmap ({exc.reason}); using the loop over chunks (same numbers) "
                "for this model from now on.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _loop_step(optimizer, model, loss_fn, chunks, k)


# -- the loop over chunks ---------------------------------------------------------------
def _loop_step(
    optimizer: SAM, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor],
    chunks: list[Any], k: int,
) -> Tensor:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:  # G is summed from zero
        p.grad = None
    stats = _RunningStats(model)
    step = _MStep()

    def chunk_loss(chunk: Any) -> Tensor:
        loss = loss_fn(model, chunk)
        _check_loss(loss)
        return loss

    clean_sum, perturbed_sum = step.run_chunks(
        optimizer, model, chunks, chunk_loss, stats, same_masks=optimizer.dropout == "same"
    )
    inv_k = 1.0 / k
    with torch.no_grad():
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, inv_k)
        step.add(clean_sum * inv_k, perturbed_sum * inv_k)
    skip = step.nonfinite(optimizer)
    if skip:
        stats.undo()
    else:
        stats.commit()
    return step.finish(optimizer, skip)


def _backward(loss: Tensor) -> None:
    loss.backward()


class _MStep:
    """One m-sharpness step: the chunk loop, the figures it gathers over its chunks (and, in
    ``SAMTrainer``, over the step's micro-batches), and its end (the ``skip_nonfinite``
    check and the base step). :func:`m_sharpness_step`'s loop and ``SAMTrainer(
    m_sharpness=)`` both run it."""

    def __init__(self) -> None:
        self.skip = False  # CPU: a chunk's clean gradient was not finite (first_step read it)
        self.clean_flags: Tensor | None = None  # accelerators: device-side finite flags
        self.norm_sum: Tensor | None = None
        self.norms = 0
        self.clean: Tensor | None = None
        self.perturbed: Tensor | None = None

    def run_chunks(
        self,
        optimizer: SAM,
        model: nn.Module,
        chunks: Sequence[Any],
        loss_fn: Callable[[Any], Tensor],
        stats: _RunningStats,
        *,
        backward: Callable[[Tensor], Any] = _backward,
        weight: float | None = None,
        same_masks: bool = True,
    ) -> tuple[Tensor, Tensor]:
        r"""For each chunk: ``loss_fn(chunk)`` and ``backward`` at :math:`w` (from no
        gradient), ``first_step()`` from that gradient alone, ``loss_fn(chunk)`` (times
        ``weight``) and ``backward`` at :math:`w + e_c` added into the sum of perturbed
        gradients, ``restore()``; returns the sums of the clean and of the perturbed losses.

        The sum starts from the ``.grad`` found on entry (``None``: zero; ``SAMTrainer``'s
        earlier micro-batches otherwise) and is in ``.grad`` on exit. ``same_masks``: each
        chunk's perturbed pass replays the random-number generators of its clean pass
        (:class:`~sam_torch.RNGReplay`), which then continue from where that clean pass
        left them. ``stats`` collects each chunk's clean-pass running statistics (the caller
        commits or undoes them); the perturbed passes leave them alone. If anything raises,
        :math:`w` is restored, ``stats`` undone and ``.grad`` holds the sum of the chunks
        done, then the exception propagates.
        """
        params = [p for g in optimizer.param_groups for p in g["params"]]
        sums = {p: p.grad for p in params if p.grad is not None}
        devices = list({p.device: None for p in params}) if same_masks else []
        clean_sum: Tensor | None = None
        perturbed_sum: Tensor | None = None
        try:
            for chunk in chunks:
                for p in params:
                    p.grad = None
                replay = RNGReplay(devices) if same_masks else contextlib.nullcontext()
                stats.before_clean_pass()
                with torch.enable_grad():
                    loss = loss_fn(chunk)
                    backward(loss)  # g_c, the chunk's own gradient
                stats.after_clean_pass()
                optimizer.first_step()
                self._after_first_step(optimizer)
                for p in params:
                    p.grad = sums.get(p)
                with torch.enable_grad(), disable_running_stats(model), replay:
                    perturbed = loss_fn(chunk)
                    backward(perturbed if weight is None else perturbed * weight)
                optimizer.restore()
                for p in params:
                    if p.grad is not None:
                        sums[p] = p.grad
                clean_sum = _add(clean_sum, loss.detach())
                perturbed_sum = _add(perturbed_sum, perturbed.detach())
        except BaseException:
            optimizer.restore()
            stats.undo()
            for p in params:
                p.grad = sums.get(p)
            raise
        if clean_sum is None or perturbed_sum is None:  # pragma: no cover - k >= 1
            raise RuntimeError("m-sharpness: no chunk was computed")
        return clean_sum, perturbed_sum

    def _after_first_step(self, optimizer: SAM) -> None:
        self.skip = self.skip or optimizer._skip_base_step
        self.clean_flags = _and(self.clean_flags, optimizer._clean_finite)
        if optimizer.grad_norm is not None:
            self.norm_sum = _add(self.norm_sum, optimizer.grad_norm)
            self.norms += 1

    def add(self, clean: Tensor, perturbed: Tensor) -> None:
        """Add the (weighted) clean and perturbed losses of a part of the step."""
        self.clean = _add(self.clean, clean)
        self.perturbed = _add(self.perturbed, perturbed)

    @property
    def grad_norm(self) -> Tensor | None:
        """The mean over the chunks of the norms the perturbations were scaled by."""
        return None if self.norm_sum is None else self.norm_sum / self.norms

    def nonfinite(self, optimizer: SAM) -> bool:
        """Whether ``skip_nonfinite`` skips this step, with the gradients of the step in
        ``.grad``: a chunk's clean gradient was not finite, or (``"clean"``) the perturbed
        loss, or (``"both"``) the stepped gradient. The one host sync of the step."""
        skip = self.skip
        if not optimizer.skip_nonfinite or skip:
            return skip
        with torch.no_grad():
            if optimizer._check_perturbed:  # "both": the stepped gradient G as well
                grads = [p.grad for g in optimizer.param_groups for p in g["params"]
                         if p.grad is not None]
                # A read-only check first; a False may be an overflow of finite values,
                # so it is confirmed with the exact one (as second_step does).
                flag = _and(self.clean_flags, _finite_flag(grads, fast=True))
                skip = flag is not None and not bool(flag)
                if skip:
                    flag = _and(self.clean_flags, _finite_flag(grads))
                    skip = flag is not None and not bool(flag)
            else:  # "clean": the perturbed loss, as step(closure) checks it
                if self.perturbed is None:  # pragma: no cover - add() ran
                    raise RuntimeError("m-sharpness: no loss was recorded")
                flag = _and(self.clean_flags, torch.isfinite(self.perturbed))
                skip = flag is not None and not bool(flag)
        return skip

    def finish(self, optimizer: SAM, skip: bool) -> Tensor:
        """The base step (unless ``skip``) and the figures ``step(closure)`` sets."""
        if self.clean is None or self.perturbed is None:  # pragma: no cover - add() ran
            raise RuntimeError("m-sharpness: no loss was recorded")
        return _finish(optimizer, skip, self.clean, self.perturbed, self.grad_norm)


def _finish(
    optimizer: SAM, skip: bool, clean_loss: Tensor, perturbed_loss: Tensor,
    grad_norm: Tensor | None,
) -> Tensor:
    """Apply the base step (or skip it) and set the figures ``step(closure)`` sets.

    The end-of-step book-keeping is SAM's own (``_finish_step``): ``step_skipped``, the LR
    schedulers' mark, and ``consecutive_skips`` (a skipped step counts towards
    ``max_consecutive_skips``, which raises after the figures are set; a step taken resets it).
    """
    if not skip:
        with torch.no_grad():
            base_step(optimizer.base_optimizer)
    optimizer.grad_norm = grad_norm
    optimizer.loss = clean_loss.detach()
    optimizer.perturbed_loss = perturbed_loss.detach()
    optimizer._finish_step(skip)
    return optimizer.loss


# -- the vectorized path ----------------------------------------------------------------
class _NotVectorizable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _VmapOps(TorchOps):
    """:class:`~sam_torch.TorchOps` with out-of-place element-wise operations.

    Under ``torch.func.vmap`` the gradients carry the chunk dimension and the weights do
    not, so nothing may be written into a weight-shaped buffer (``out=`` or in place): the
    same formulas, computed into new tensors.
    """

    def sum_of_squares(self, xs: Sequence[Tensor]) -> Tensor:
        return self.dot(xs, xs)

    def dot(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
        parts = [
            torch.dot(x.reshape(-1).to(self.acc_dtype), y.reshape(-1).to(self.acc_dtype))
            for x, y in zip(xs, ys, strict=True)
        ]
        return torch.stack(parts).sum() if len(parts) > 1 else parts[0]

    def abs_add_square(
        self, xs: Sequence[Tensor], c: float, out: Sequence[Tensor] | None = None
    ) -> list[Tensor]:
        ts = [torch.abs(x) + c for x in xs]
        return [t * t for t in ts]

    def mul(
        self, xs: Sequence[Tensor], ys: Sequence[Tensor], out: Sequence[Tensor] | None = None
    ) -> list[Tensor]:
        return [x * y for x, y in zip(xs, ys, strict=True)]

    def add_scaled(
        self, xs: Sequence[Tensor], ys: Sequence[Tensor], scale: Tensor,
        out: Sequence[Tensor] | None = None,
    ) -> list[Tensor]:
        return [
            torch.addcmul(x.to(scale.dtype), y.to(scale.dtype), scale).to(x.dtype)
            for x, y in zip(xs, ys, strict=True)
        ]

    def scale(
        self, xs: Sequence[Tensor], s: Tensor, out: Sequence[Tensor] | None = None
    ) -> list[Tensor]:
        return [(x.to(s.dtype) * s).to(x.dtype) for x in xs]


class _LossModule(nn.Module):
    """``loss_fn(model, chunk)`` as a module, so ``functional_call`` can rebind its tensors."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, chunk: Any) -> Tensor:
        return self.loss_fn(self.model, chunk)


def _vectorized_step(
    optimizer: SAM, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any, k: int, m: int, chunk_size: int | None,
) -> Tensor:
    from torch.func import functional_call, grad, vmap

    names = {p: n for n, p in model.named_parameters(remove_duplicate=True)}
    # SAM-ON perturbs (and takes the norm over) its masked parameters only.
    mask = getattr(optimizer, "_mask", None) if isinstance(optimizer, SAMON) else None
    plan = []  # per group with perturbed parameters: (group, ops, names of those params)
    opt_names = []  # every optimized parameter: all get the perturbed-point gradient
    for group in optimizer.param_groups:
        group_names = []
        for p in group["params"]:
            if not p.requires_grad:
                continue
            name = names.get(p)
            if name is None:
                raise ValueError(
                    f"m_sharpness_step: the optimizer holds a parameter (shape "
                    f"{tuple(p.shape)}) that is not a parameter of model; pass the model "
                    "whose parameters the optimizer was built on"
                )
            opt_names.append(name)
            if mask is None or id(p) in mask:
                group_names.append(name)
        if group_names:
            p0 = dict(model.named_parameters())[group_names[0]]
            ops = _VmapOps(p0.device, p0.dtype, foreach=False, host_reads=False)
            plan.append((group, ops, group_names))
    if not plan:
        raise ValueError("m_sharpness_step: no parameter of the optimizer requires a gradient")
    opt_set = set(opt_names)
    frozen = {
        "model." + n: p.detach() for n, p in model.named_parameters() if n not in opt_set
    }
    # Batch-norm running statistics: one copy per chunk, updated by that chunk's clean pass
    # (torch.func needs mutated tensors as inputs); their mean is the step's update. Other
    # buffers are constants of the call.
    bn_modules = set(_RunningStats(model, save=False).modules)
    tracked = {
        f"{mn}.{bn}" if mn else bn: b
        for mn, mod in model.named_modules() if mod in bn_modules
        for bn, b in mod.named_buffers(recurse=False) if b is not None
    }
    frozen.update(
        {"model." + n: b for n, b in model.named_buffers() if n not in tracked}
    )
    per_chunk_bufs = {
        "model." + n: b.unsqueeze(0).expand(k, *b.shape).clone()
        for n, b in tracked.items() if b.is_floating_point()
    }
    # num_batches_tracked is the same for every chunk and read as a number by momentum=None
    # (no per-chunk copy: a batched tensor cannot be read); each call gets a fresh copy.
    counters = {"model." + n: b for n, b in tracked.items() if not b.is_floating_point()}
    weights = {"model." + n: p.detach() for n, p in model.named_parameters() if n in opt_set}
    module = _LossModule(model, loss_fn)
    same_masks = optimizer.dropout == "same"
    devices = list({p.device: None for p in weights.values()}) if same_masks else []

    def perturb(w: dict[str, Tensor], g: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        # SAM's _perturb_with, functionally: a direction and squared norm per group, one
        # global norm, each group's own rho / sam_eps.
        sq_norm = None
        directions = []
        for group, ops, ns in plan:
            ws = [w["model." + n] for n in ns]
            gs = [g["model." + n] for n in ns]
            d, sq = sam_core.direction_and_sq_norm(
                ops, ws, gs, adaptive=group["adaptive"], eta=group["eta"]
            )
            directions.append(d)
            sq_norm = sq if sq_norm is None else sq_norm + sq
        norm = torch.sqrt(sq_norm)
        out = dict(w)  # parameters outside the plan (SAM-ON's unmasked ones) stay at w
        for (group, ops, ns), d in zip(plan, directions, strict=True):
            scale = sam_core.perturbation_scale(group["rho"], norm, group["sam_eps"])
            ws = [w["model." + n] for n in ns]
            for n, x in zip(ns, sam_core.apply_perturbation(ops, ws, d, scale), strict=True):
                out["model." + n] = x
        return out, norm

    def chunk_update(w: dict[str, Tensor], bufs: dict[str, Tensor], chunk: Any) -> Any:
        bufs = {**bufs, **{n: b.clone() for n, b in counters.items()}}
        def clean(w_: dict[str, Tensor], b_: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            loss = functional_call(module, {**w_, **frozen, **b_}, (chunk,))
            _check_loss(loss)
            return loss, loss

        def perturbed(w_: dict[str, Tensor], b_: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            with disable_running_stats(model):
                loss = functional_call(module, {**w_, **frozen, **b_}, (chunk,))
            return loss, loss

        # dropout="same": the perturbed pass replays the generators of the clean one. Under
        # vmap(randomness="different") each random op draws one sample per chunk, so each
        # chunk gets its own masks, the same in its two passes (other numbers than the
        # loop's, which draws chunk after chunk: the same distribution).
        replay = RNGReplay(devices) if same_masks else contextlib.nullcontext()
        g, loss = grad(clean, has_aux=True)(w, bufs)
        w_pert, norm = perturb(w, g)
        with replay:
            g_pert, ploss = grad(perturbed, has_aux=True)(w_pert, bufs)
        # Per chunk: is the clean gradient finite (the check first_step makes)?
        finite = torch.stack([torch.isfinite(x).all() for x in g.values()]).all()
        return g_pert, loss, ploss, norm, finite, {n: bufs[n] for n in per_chunk_bufs}

    chunked = _split_stacked(batch, k, m)
    try:
        with torch.enable_grad():
            g_pert, losses, plosses, norms, clean_finite, new_bufs = vmap(
                chunk_update, in_dims=(None, 0, 0), chunk_size=chunk_size,
                randomness="different",
            )(weights, per_chunk_bufs, chunked)
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
        reason = _vmap_failure_reason(exc, model)
        if reason is None:
            raise
        raise _NotVectorizable(reason) from exc

    with torch.no_grad():
        skip = False
        finite: Tensor | None
        if optimizer.skip_nonfinite:
            finite = clean_finite.all()
            if optimizer._check_perturbed:
                finite = _and(finite, _finite_flag(list(g_pert.values())))
            else:
                finite = _and(finite, torch.isfinite(plosses).all())
            skip = finite is not None and not bool(finite)
        param_of = dict(model.named_parameters())
        for n in opt_names:
            param_of[n].grad = g_pert["model." + n].mean(0)
        if not skip:
            for n, b in tracked.items():
                if b.is_floating_point():
                    b.copy_(new_bufs["model." + n].mean(0))
                else:  # num_batches_tracked: one more batch
                    b.add_(1)
    return _finish(optimizer, skip, losses.mean(), plosses.mean(), norms.mean())


def _vmap_failure_reason(exc: BaseException, model: nn.Module) -> str | None:
    """Why ``torch.func`` could not run the model, or ``None`` for an error of the user's."""
    msg = str(exc)
    first = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
    if "data-dependent control flow" in msg:
        return "its forward has data-dependent control flow (" + first[:200] + ")"
    if "Batching rule not implemented" in msg or "vmap" in msg or "functorch" in msg:
        return f"{type(exc).__name__}: {first[:300]}"
    if "in-place" in msg or "inplace" in msg or "mutate a captured Tensor" in msg:
        return f"it mutates a tensor in place ({first[:200]})"
    return None


# -- batch-norm running statistics ------------------------------------------------------
class _RunningStats:
    """One running-statistics update per step, the mean of the chunks' clean-pass updates.

    Before each clean pass the statistics are reset to their values at the start of the
    step; after it the updated values are added to a sum. :meth:`commit` writes the mean
    (``(1 - mu) r + mu * mean_c s_c``: the update is affine in the batch statistic) and one
    more ``num_batches_tracked``; :meth:`undo` puts the values at the start back.
    """

    def __init__(self, model: nn.Module, save: bool = True) -> None:
        self.modules = [
            mod for mod in model.modules()
            if isinstance(mod, _BatchNorm) and mod.training and mod.track_running_stats
            and mod.running_mean is not None
        ]
        self.saved: list[tuple[Tensor, ...]] = []
        self.sums: list[list[Tensor]] | None = None
        self.count = 0
        self.committed = False
        for mod in self.modules if save else ():
            self.saved.append(tuple(b.detach().clone() for b in _buffers(mod)))

    def before_clean_pass(self) -> None:
        if self.count:
            self._reset()

    def after_clean_pass(self) -> None:
        if not self.modules:
            return
        with torch.no_grad():
            if self.sums is None:
                self.sums = [[b.detach().clone() for b in _floats(mod)] for mod in self.modules]
            else:
                for acc, mod in zip(self.sums, self.modules, strict=True):
                    torch._foreach_add_(acc, list(_floats(mod)))
        self.count += 1

    def commit(self) -> None:
        if self.committed or not self.modules:
            return
        with torch.no_grad():
            if self.sums is not None and self.count > 1:
                for acc, mod in zip(self.sums, self.modules, strict=True):
                    torch._foreach_mul_(acc, 1.0 / self.count)
                    torch._foreach_copy_(list(_floats(mod)), acc)
            for saved, mod in zip(self.saved, self.modules, strict=True):
                if mod.num_batches_tracked is not None:
                    mod.num_batches_tracked.copy_(saved[-1] + 1)
        self.committed = True

    def undo(self) -> None:
        if self.committed:
            return
        self._reset()
        self.committed = True

    def _reset(self) -> None:
        with torch.no_grad():
            for saved, mod in zip(self.saved, self.modules, strict=True):
                for b, s in zip(_buffers(mod), saved, strict=True):
                    b.copy_(s)


def _buffers(mod: _BatchNorm) -> tuple[Tensor, ...]:
    bufs = (mod.running_mean, mod.running_var)
    if mod.num_batches_tracked is not None:
        bufs = (*bufs, mod.num_batches_tracked)
    return tuple(b for b in bufs if b is not None)


def _floats(mod: _BatchNorm) -> tuple[Tensor, ...]:
    return tuple(b for b in (mod.running_mean, mod.running_var) if b is not None)


# -- batches ----------------------------------------------------------------------------
def _leaves(batch: Any, path: str = "batch") -> Iterator[tuple[str, Tensor]]:
    if isinstance(batch, Tensor):
        yield path, batch
    elif isinstance(batch, (tuple, list)):
        for i, x in enumerate(batch):
            yield from _leaves(x, f"{path}[{i}]")
    elif isinstance(batch, dict):
        for key, x in batch.items():
            yield from _leaves(x, f"{path}[{key!r}]")
    else:
        raise TypeError(
            f"m_sharpness_step: {path} is a {type(batch).__name__}; the batch must be a tensor, "
            "a tuple/list or a dict of tensors sharing the leading (batch) dimension"
        )


def _batch_size(batch: Any) -> int:
    sizes = []
    for path, x in _leaves(batch):
        if x.ndim == 0:
            raise ValueError(
                f"m_sharpness_step: {path} is a 0-d tensor; every tensor of the batch needs the "
                "leading (batch) dimension"
            )
        sizes.append((path, x.shape[0]))
    if not sizes:
        raise ValueError("m_sharpness_step: the batch holds no tensor")
    first_path, first = sizes[0]
    for path, size in sizes[1:]:
        if size != first:
            raise ValueError(
                f"m_sharpness_step: the batch's tensors must share the leading dimension, but "
                f"{first_path} has {first} rows and {path} has {size}"
            )
    return int(first)


def _map(fn: Callable[[Tensor], Any], batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a NamedTuple
        return type(batch)(*(_map(fn, x) for x in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map(fn, x) for x in batch)
    return type(batch)((key, _map(fn, x)) for key, x in batch.items())


def _split(batch: Any, m: int) -> list[Any]:
    """The chunks of ``m`` consecutive examples, each a view with the batch's structure."""
    k = _batch_size(batch) // m
    return [_map(lambda x, c=c: x.narrow(0, c * m, m), batch) for c in range(k)]


def _split_stacked(batch: Any, k: int, m: int) -> Any:
    """The batch with each leaf viewed as ``(k, m, ...)``: chunk c is row c."""
    return _map(lambda x: x.reshape(k, m, *x.shape[1:]), batch)


# -- small helpers ----------------------------------------------------------------------
def _check_optimizer(optimizer: Any) -> None:
    name = type(optimizer).__name__
    for cls in type(optimizer).__mro__:
        if cls.__name__ in _UNSUPPORTED and cls.__module__.startswith("sam_torch"):
            raise TypeError(
                f"m_sharpness_step does not support {name}: {_UNSUPPORTED[cls.__name__]}, so "
                "perturbing each chunk with its own gradient is not defined for it. Use "
                "sam_torch.SAM (adaptive=True for ASAM)."
            )
    if not isinstance(optimizer, SAM):
        raise TypeError(
            f"m_sharpness_step needs a sam_torch.SAM optimizer, got {name}; build one with "
            "SAM(model.parameters(), torch.optim.SGD, lr=..., rho=...)"
        )


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        what = (
            f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor)
            else type(loss).__name__
        )
        raise ValueError(
            f"loss_fn(model, chunk) must return the chunk's mean loss as a 0-d tensor, got "
            f"{what}; reduce it with .mean()"
        )


def _device_of(optimizer: SAM) -> torch.device:
    for group in optimizer.param_groups:
        for p in group["params"]:
            return p.device
    return torch.device("cpu")


def _add(acc: Tensor | None, x: Tensor) -> Tensor:
    return x.clone() if acc is None else acc + x.to(acc.device)


def _and(flag: Tensor | None, x: Tensor | None) -> Tensor | None:
    if x is None:
        return flag
    return x if flag is None else flag & x.to(flag.device)

