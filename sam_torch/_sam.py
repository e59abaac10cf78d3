r"""``sam_torch.SAM``: Sharpness-Aware Minimization as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

import sam_core

from ._bn import disable_running_stats
from ._entry import base_step, entry_point
from ._ops import SMALL_NUMEL, TorchOps, copy_is_non_blocking
from ._rng import RNGReplay

__all__ = ["SAM"]

_GroupPlan = tuple[dict[str, Any], TorchOps, list[Tensor], list[Tensor], list[Tensor]]

# Param-group keys SAM owns. SAM's epsilon is stored as "sam_eps" so that it never collides
# with the base optimizer's own "eps" (Adam, AdamW, RMSprop, ...).
_SAM_KEYS = ("rho", "adaptive", "eta", "sam_eps")

#: Consecutive skipped steps after which SAM warns (once per run of skips) that training
#: may have stalled.
STALL_WARNING_AFTER = 10


class SAM(Optimizer):
    r"""Sharpness-Aware Minimization (SAM) and Adaptive SAM (ASAM) around any base optimizer.

    Each step evaluates the gradient at the perturbed point :math:`w + e(w)` and lets the
    base optimizer apply it at :math:`w`:

    .. math::

        e(w) = \rho \, \frac{T_w^2 \, g}{\lVert T_w g \rVert_2 + \epsilon}, \qquad
        T_w = \begin{cases} 1 & \text{SAM} \\ |w| + \eta & \text{ASAM} \end{cases}

    References: Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
    Generalization", ICLR 2021; Kwon et al., "ASAM", ICML 2021. The math is
    :mod:`sam_core`'s; this class adapts it to torch.

    Two ways to drive it:

    * ``step(closure)`` (the ``torch.optim`` contract): the closure computes the loss,
      calls ``backward()`` and returns the loss (zeroing the gradients in it is optional:
      SAM sets them to ``None`` before each call). ``step`` calls it at :math:`w`,
      perturbs, calls it again at :math:`w + e`, restores :math:`w` and runs the base
      optimizer; it returns the clean loss. This works in loops that only ever call
      ``optimizer.step(closure)`` (e.g. Lightning's automatic optimization; pass
      ``model=`` so the perturbed pass leaves batch-norm statistics alone). If a backward
      pass already ran since the last step, as in the popular PyTorch SAM wrapper's loop
      ``loss.backward(); optimizer.step(closure); optimizer.zero_grad()``, that gradient
      is the clean one and the closure is called once, at :math:`w + e`: that loop gives
      the wrapper's trajectory (see :meth:`step`).
    * ``first_step()`` / ``second_step()``, exactly as users of that wrapper know them:
      backward at :math:`w`, ``first_step()``, backward at :math:`w + e`, ``second_step()``
      (optionally with ``loss=`` for :attr:`loss`, :attr:`perturbed_loss` and
      :attr:`sharpness`). The passes are the loop's own: for the same dropout masks in
      both, take a :class:`RNGReplay` before the clean pass and run the perturbed one in
      ``with replay:``.

    Migrating from the popular wrapper: the constructor takes the same ``rho``,
    ``adaptive`` and base-optimizer keywords (``eps=`` included, which goes to the base
    optimizer as there); ``adaptive=True, eta=0.0`` is that wrapper's adaptive mode, and the
    default ``eta=0.01`` is the official ASAM one; its ``enable_running_stats`` /
    ``disable_running_stats`` recipe works with :func:`enable_running_stats` and
    :func:`disable_running_stats`.

    Args:
        params: parameters, ``model.named_parameters()``, or parameter groups (their
            ``"params"`` may be (name, parameter) pairs too, stored as ``"param_names"``
            as ``torch.optim`` does). Groups may set their own ``rho``, ``adaptive``,
            ``eta`` and ``sam_eps`` (e.g. exclude biases and norm layers from adaptive
            scaling, as the ASAM authors do), and anything the base optimizer takes. A
            group may mix devices and dtypes (a bfloat16 ``Linear`` beside a float32
            ``LayerNorm``): SAM splits it by device and dtype internally, as the
            ``torch._foreach_*`` paths of ``torch.optim`` do; the norm stays global over
            every group and is accumulated in float32 for half types. Parameters on the
            meta device are rejected (they hold no values).
        base_optimizer: an optimizer *class* (``torch.optim.SGD``, ``AdamW``, ...). It is
            built on SAM's param groups, which the two share, so LR schedulers attached to
            SAM drive it. Its state (momentum, Adam moments) is SAM's state. ZeRO-1:
            ``SAM(params, ZeroRedundancyOptimizer, optimizer_class=torch.optim.AdamW,
            lr=...)`` under DDP shards that state across ranks (the perturbation needs no
            optimizer state, so SAM is unchanged); checkpoint with
            :meth:`consolidate_state_dict` on every rank, then :meth:`state_dict` on the
            target rank, and :meth:`load_state_dict` of that dict on every rank.
        rho: radius of the neighbourhood, :math:`\rho \ge 0`.
        adaptive: ASAM's scale-invariant neighbourhood.
        eta: ASAM's offset in :math:`T_w = |w| + \eta` (0.01 in the official code; 0
            reproduces the popular wrapper's adaptive mode).
        sam_eps: added to the norm, :math:`\epsilon > 0`; a zero gradient gives a zero
            perturbation, never NaN. Stored per group as ``"sam_eps"``. ``eps=`` is the base
            optimizer's (``SAM(params, torch.optim.Adam, lr=1e-3, eps=1e-6)`` sets Adam's,
            as the popular wrapper and ``pytorch_optimizer`` do).
        model: the module being trained, optional. ``step(closure)`` (and the
            :meth:`perturbed` block) then run the perturbed pass with its batch-norm
            running statistics frozen (:func:`disable_running_stats`), so they come from
            the clean pass only and ``num_batches_tracked`` grows by one per step, without
            the closure knowing about SAM.
        perturb_impl: ``"foreach"`` (multi-tensor kernels), ``"per_tensor"`` (one fused
            kernel per tensor into a preallocated buffer; on CPU ASAM's direction is built
            a cache block at a time) or ``"auto"``: per-tensor on CPU, foreach elsewhere.
            Both give the same numbers, bit for bit in every dtype (in float16/bfloat16
            both compute :math:`w + e` in float32 and round it once). ``"compiled"``: the same
            sam_core formulas fused by ``torch.compile`` into one reduction and one
            element-wise kernel per tensor for ASAM groups (its five passes over memory
            become two; SAM groups, which have nothing to fuse, keep the eager kernels). The
            first step of a
            parameter set compiles (seconds; on CPU a C++ compiler is needed); if compiling
            fails SAM warns once and uses the eager kernels. Reductions are summed in
            another order, so float32 results differ from eager in the last bits.
        storage: how :math:`w` is kept while the parameters hold :math:`w + e`.
            ``"swap"``: :math:`w + e` is written into one persistent spare buffer per
            parameter and the parameter's storage is swapped with it, then swapped back;
            restore is exact and copies nothing. ``"copy"``: :math:`w + e` is copied into
            the parameter and :math:`w` copied back (two buffers), for parameters that are
            views into a larger storage or tensor subclasses such as DTensor, whose storage
            must not change. ``"auto"`` picks ``"swap"`` when every parameter owns its
            storage.
        skip_nonfinite: the policy for non-finite gradients. ``"clean"`` (default): if the
            gradient at :math:`w` holds an ``inf`` or ``NaN``, nothing is perturbed and the
            base step is skipped; a non-finite perturbed loss skips the step too (the
            closure's, or ``second_step(loss=...)``'s), and when there is no perturbed loss
            (the two-step API without ``loss=``, a closure returning ``None``) the gradient
            at :math:`w + e` is checked instead, so no ``NaN`` of either pass reaches the
            weights by default. ``"both"`` always checks the gradient at :math:`w + e`
            (for NaNs that only the gradient shows). ``True`` is rejected (``ValueError``):
            it could mean either policy, so name the one you want.
            A skipped step leaves the weights and the optimizer state unchanged and sets
            :attr:`step_skipped`. ``False`` removes every check and sync and lets ``NaN``
            reach the weights, as ``torch.optim`` does. Cost on CPU: ``"clean"`` reads the
            0-d norm after the first pass (free there); ``"both"`` adds one read-only sum
            of squares of the gradients after the second pass (about a fifth of an SGD
            step on WRN-16-8; confirmed with ``GradScaler``'s exact kernel only when it is
            not finite). On accelerators ``first_step()`` does not sync: it records a
            device-side flag (one pass over the clean gradient) and perturbs anyway, which
            is harmless because :math:`w` is restored exactly; the one host sync per step
            happens in ``second_step()``, which reads the flags together (``GradScaler``
            also syncs once per step; a skipped step may take a second). So on
            accelerators a non-finite clean gradient still runs the perturbed pass (on
            non-finite weights) before the step is skipped. A finite gradient whose norm
            overflows the accumulation dtype gives a zero perturbation (the step is a
            plain base step). With ``torch.amp.GradScaler`` use :class:`ScaledSAM`, which
            checks both passes through the scaler whatever this policy.
        max_consecutive_skips: ``None`` (default) or an int :math:`\ge 1`: that many
            skipped steps in a row are tolerated and the next one raises ``RuntimeError``
            (the weights are the last finite ones), like the limit of
            ``optax.apply_if_finite(max_consecutive_errors=)`` but raising instead of
            applying the update. Whatever it is, SAM warns once (``RuntimeWarning``) when
            more than 10 steps in a row were skipped; :attr:`consecutive_skips` counts them.
        dropout: ``"same"`` (default): when ``step(closure)`` calls the closure twice, the
            perturbed call replays torch's random-number generators (CPU and the
            parameters' accelerators; :class:`RNGReplay`), so it draws the clean call's
            dropout masks: both passes evaluate one sampled objective, ``rho = 0`` is the
            base optimizer's step exactly and :attr:`sharpness` measures sharpness, not
            dropout noise. Each step draws fresh masks (the generators continue from where
            the clean call left them). ``"fresh"``: the perturbed call draws new masks.
            Whatever it is, the popular wrapper's loop (``loss.backward()`` before
            ``step(closure)``, one closure call at :math:`w + e`) draws fresh masks, since
            its clean pass ran before ``step`` was called; the two-step API gets the same
            masks with :class:`RNGReplay`.
        gc: gradient centralization (Yong et al., ECCV 2020), ``pytorch_optimizer``'s
            GCSAM: ``first_step()`` first replaces each clean gradient of two or more
            dimensions by :math:`g - \operatorname{mean}_{1..n-1}(g)` (``g - g.mean(dim=(1,
            ..., n-1), keepdim=True)``, in place in ``.grad``; one-dimensional ones stay),
            so the perturbation is formed from the centralized gradient
            (:func:`sam_core.centralize`); the gradient at :math:`w + e` is left alone.
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ``eps``,
            ``maximize``, ...). With ``maximize=True`` the base optimizer ascends on
            :math:`L`, i.e. minimizes :math:`-L`, so SAM's ascent step is on :math:`-L`:
            :math:`e` points along :math:`-g`.

    Gradient accumulation over micro-batches: SAM's perturbation uses whatever gradient is
    in ``.grad`` when ``first_step()`` runs, so accumulate the clean gradient over all
    micro-batches *before* ``first_step()`` (the perturbation then comes from the full-batch
    gradient, not from one micro-batch's), and accumulate the perturbed gradient over the
    *same* micro-batches before ``second_step()``; with each loss divided by the number of
    micro-batches this equals one SAM step on the full batch::

        for x, y in micro_batches:
            (loss_fn(model(x), y) / k).backward()
        sam.first_step(zero_grad=True)
        for x, y in micro_batches:
            (loss_fn(model(x), y) / k).backward()
        sam.second_step(zero_grad=True)

    (Perturbing each micro-batch with its own gradient is "m-sharpness", a different
    algorithm.)

    Between ``first_step()`` and ``second_step()`` the parameters hold :math:`w + e`;
    :meth:`restore` puts :math:`w` back exactly, ``step(closure)`` does so if the closure
    raises, and :meth:`state_dict` refuses to run so perturbed weights are never saved as
    if they were the model.

    Step hooks (SAM's own and ``torch.optim``'s global ones) fire once per SAM step in
    both APIs: the pre hooks on entry to ``step(closure)`` or ``first_step()``, the post
    hooks on return from ``step(closure)`` or ``second_step()`` (see
    :meth:`register_step_pre_hook`). Under ``torch.compile`` ``step``, ``first_step``,
    ``second_step`` and ``restore`` are graph breaks by design: they run eagerly, with
    eager's numbers, wherever a compiled function calls them (``docs/errors.md``).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Callable[..., Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        sam_eps: float = 1e-12,
        *,
        model: torch.nn.Module | None = None,
        perturb_impl: Literal["auto", "foreach", "per_tensor", "compiled"] = "auto",
        storage: Literal["auto", "swap", "copy"] = "auto",
        skip_nonfinite: Literal["clean", "both", False] = "clean",
        max_consecutive_skips: int | None = None,
        dropout: Literal["same", "fresh"] = "same",
        gc: bool = False,
        **base_kwargs: Any,
    ) -> None:
        sam_core.validate_sam(rho=rho, eps=sam_eps, eta=eta, adaptive=adaptive, eps_name="sam_eps")
        if not (isinstance(dropout, str) and dropout in ("same", "fresh")):
            raise ValueError(f"dropout must be 'same' or 'fresh', got {dropout!r}")
        sam_core.check_bool("gc", gc)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module (its batch-norm layers are frozen during the "
                f"perturbed pass of step(closure)), got {type(model).__name__}"
            )
        if max_consecutive_skips is not None:
            sam_core.check_positive_int("max_consecutive_skips", max_consecutive_skips)
        _check_skip_nonfinite(skip_nonfinite)
        if isinstance(base_optimizer, Optimizer):
            raise TypeError(
                "base_optimizer must be an optimizer class such as torch.optim.SGD, got an "
                f"instance of {type(base_optimizer).__name__}; pass the class and its keyword "
                "arguments instead: SAM(params, torch.optim.SGD, lr=0.1, momentum=0.9)"
            )
        if not callable(base_optimizer):
            raise TypeError(
                "base_optimizer must be an optimizer class such as torch.optim.SGD, got "
                f"{base_optimizer!r}; pass the class itself (not its name or an instance)"
            )
        if perturb_impl not in ("auto", "foreach", "per_tensor", "compiled"):
            raise ValueError(
                "perturb_impl must be 'auto', 'foreach', 'per_tensor' or 'compiled', got "
                f"{perturb_impl!r}"
            )
        if storage not in ("auto", "swap", "copy"):
            raise ValueError(f"storage must be 'auto', 'swap' or 'copy', got {storage!r}")
        _check_no_key_collision(base_optimizer)
        if isinstance(params, Tensor):
            raise TypeError(
                f"params must be an iterable of tensors or of param-group dicts, got a single "
                f"tensor of shape {tuple(params.shape)}; wrap it in a list: SAM([param], ...)"
            )
        params = list(params)
        if not params:
            raise ValueError(
                "params is empty: SAM got no parameters to optimize; pass "
                "model.parameters() of a model that has parameters, or a list of param groups"
            )
        #: Gradient centralization of the clean gradient before perturbing (``gc=``).
        self.gc = gc
        self._gc_done = False  # the clean gradients of this step are centralized already
        #: The non-finite gradient policy as given (truthy unless ``False``).
        self.skip_nonfinite = skip_nonfinite
        self._check_perturbed = skip_nonfinite == "both"
        self._perturbed_loss_finite: Tensor | None = None  # step(closure), policy "clean"
        self._perturb_impl = perturb_impl
        self._compiled: Any = None  # CompiledPerturbation once built, False if it failed
        self._storage_choice = storage
        self._building = True
        # Step hooks (sam_torch._entry): the depth of nested entry-point calls, and what
        # started the step whose pre hooks fired and whose post hooks are still due.
        self._entry_depth = 0
        self._step_open: str | None = None
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, sam_eps=sam_eps, **base_kwargs)
        super().__init__(params, defaults)
        try:
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        except TypeError as exc:
            if "eps" in base_kwargs and "eps" in str(exc):
                name = getattr(base_optimizer, "__name__", repr(base_optimizer))
                raise TypeError(
                    f"eps={base_kwargs['eps']!r} is passed to the base optimizer {name}, which "
                    f"does not take it ({exc}); SAM's own epsilon (added to the gradient norm) "
                    "is sam_eps=, e.g. SAM(params, torch.optim.SGD, lr=0.1, sam_eps=1e-12)"
                ) from exc
            raise
        self._building = False
        # One set of groups and one state for both: schedulers, zero_grad, state_dict and
        # the base optimizer all see the same dicts.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self._spare: dict[Tensor, Tensor] = {}
        self._saved: dict[Tensor, Tensor] = {}
        self._saved_swapped: list[tuple[Tensor, Tensor]] = []
        self._saved_copied: list[tuple[Tensor, Tensor]] = []
        self._perturbed = False
        self._skip_base_step = False
        self._clean_finite: Tensor | None = None  # device-side flag, accelerators only
        self._clean_loss: Any = None  # first_step(loss=...), kept for second_step
        self._in_closure_step = False
        #: The model whose batch-norm running statistics ``step(closure)`` freezes during
        #: the perturbed pass (``None``: the closure decides).
        self.model = model
        #: ``max_consecutive_skips`` as given: that many skipped steps in a row are
        #: tolerated, the next one raises ``RuntimeError``.
        self.max_consecutive_skips = max_consecutive_skips
        #: ``"same"``: ``step(closure)`` replays the random-number generators so that the
        #: perturbed closure call draws the clean call's dropout masks; ``"fresh"``: new ones.
        self.dropout = dropout
        #: Number of steps skipped in a row (non-finite gradients); 0 after a taken step.
        self.consecutive_skips = 0
        # Which gradients the last step (or zero_grad) left, to tell a fresh backward pass
        # done before step(closure) (the popular wrapper's loop) from stale gradients.
        self._grad_mark: list[Any] | None = self._grad_signature()
        #: ``True`` when the last step was skipped because a gradient was not finite
        #: (see ``skip_nonfinite``); the weights and optimizer state were left unchanged.
        self.step_skipped = False
        #: Norm the last perturbation was scaled by (``||g||``, or ``||T_w g||`` for ASAM),
        #: a 0-d tensor on the parameters' device (reading it syncs; SAM never does).
        self.grad_norm: Tensor | None = None
        #: Clean and perturbed losses of the last ``step(closure)``; their difference is the
        #: sharpness estimate ``L(w + e) - L(w)`` (see :attr:`sharpness`).
        self.loss: Tensor | None = None
        self.perturbed_loss: Tensor | None = None

    # -- param groups -----------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (validated like the constructor's) to SAM and its base optimizer."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        # Named parameters (model.named_parameters(), torch >= 2.6): names go to
        # "param_names", as torch.optim stores them.
        if params and all(_is_named(p) for p in params):
            param_group["param_names"] = [name for name, _ in params]
            params = [p for _, p in params]
        elif any(_is_named(p) for p in params):
            raise ValueError(
                f"param group {len(self.param_groups)} mixes (name, parameter) pairs with plain "
                "parameters; pass model.named_parameters() or model.parameters(), not both"
            )
        param_group["params"] = params
        _check_group_params(params, index=len(self.param_groups))
        _check_not_in_other_groups(params, self.param_groups)
        if "eps" in param_group and "sam_eps" not in param_group and _eps_is_sam_only(self):
            raise ValueError(
                f"param group {len(self.param_groups)} sets 'eps', which belongs to the base "
                "optimizer (it takes none here); SAM's own epsilon is the group key 'sam_eps'"
            )
        for key in _SAM_KEYS:
            param_group.setdefault(key, self.defaults[key])
        sam_core.validate_sam(
            rho=param_group["rho"],
            eps=param_group["sam_eps"],
            eta=param_group["eta"],
            adaptive=param_group["adaptive"],
            eps_name="sam_eps",
        )
        if getattr(self, "_building", True):
            super().add_param_group(param_group)
        else:  # after construction the list is shared: let the base optimizer append it
            self.base_optimizer.add_param_group(param_group)

    # -- step hooks -------------------------------------------------------------------
    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A subclass's own step / first_step / second_step / restore is the entry point its
        # users call: it fires the hooks and runs eagerly, its super() calls are its parts.
        super().__init_subclass__(**kwargs)
        for name in ("step", "first_step", "second_step", "restore"):
            if name in cls.__dict__:
                setattr(cls, name, entry_point(name)(cls.__dict__[name]))

    def _patch_step_function(self) -> None:
        # torch.optim wraps type(self).step to fire the step hooks around each call; SAM
        # fires them itself, once per SAM step in both APIs (see register_step_pre_hook).
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"

    def register_step_pre_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """Register ``hook(optimizer, args, kwargs)``, called once at the start of every SAM step.

        As ``torch.optim.Optimizer.register_step_pre_hook``, with a SAM step's start being
        the entry to ``step(closure)`` (``args``/``kwargs``: that call's, which the hook may
        replace by returning ``(new_args, new_kwargs)``) or, in the two-step API, the entry
        to ``first_step()`` (``args == (optimizer,)``, ``kwargs == {}``; a return value is
        not used), before anything of the step runs. Global hooks
        (``torch.optim.optimizer.register_optimizer_step_pre_hook``) fire at the same
        point, once, with SAM as the optimizer; the base optimizer's step inside fires
        only the hooks registered on ``base_optimizer`` itself. Returns a handle whose
        ``remove()`` unregisters the hook.
        """
        return super().register_step_pre_hook(hook)

    def register_step_post_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """Register ``hook(optimizer, args, kwargs)``, called once at the end of every SAM step.

        The end of ``step(closure)``, or of ``second_step()`` in the two-step API, after the
        base step and everything else of the step ran; a skipped step (non-finite
        gradient) ends too. A step that raises, or that ``restore()`` cancels, fires no
        post hook. Global post hooks fire at the same point, once, with SAM as the
        optimizer. Returns a handle whose ``remove()`` unregisters the hook.
        """
        return super().register_step_post_hook(hook)

    # -- the two SAM passes -----------------------------------------------------------
    @entry_point("first_step")
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, loss: Any = None) -> None:
        r"""Perturb every parameter with a gradient from :math:`w` to :math:`w + e(w)`.

        Call after the backward pass at :math:`w`. Parameters without ``.grad`` are left
        untouched. With ``zero_grad=True`` the gradients are cleared afterwards. If anything
        raises half-way (an out-of-memory error, a sparse gradient), the parameters are
        back at :math:`w` when the exception propagates. With ``skip_nonfinite`` a
        non-finite gradient perturbs nothing and marks the step as skipped.

        ``loss``: the clean loss :math:`L(w)`, optional; it is stored (detached) as
        :attr:`loss`, so that :attr:`sharpness` is known after ``second_step(loss=...)``.
        """
        if self._perturbed:
            raise RuntimeError(
                "first_step() was called twice without second_step(): the parameters already "
                "hold w + e. Call second_step() (or restore()) before perturbing again."
            )
        self._centralize_clean_gradients()
        plan = self._plan()
        self.step_skipped = False
        self._skip_base_step = False
        try:
            self._perturb(plan)
        except BaseException:
            self.restore()
            raise
        self._perturbed = True
        self._clean_loss = _detached(loss)
        if zero_grad:
            self.zero_grad()

    def _centralize_clean_gradients(self) -> None:
        """With ``gc=True``, centralize the clean gradients in ``.grad``, once per step.

        Subclasses that read or copy the clean gradient before ``first_step`` perturbs call
        it first; it runs once until the step ends (:meth:`restore`).
        """
        if not self.gc or self._perturbed or self._gc_done:
            return
        for _, ops, _, grads, _ in self._plan():
            sam_core.centralize(ops, grads, out=grads)
        self._gc_done = True

    def _perturb(self, plan: list[_GroupPlan]) -> None:
        if self._perturb_impl == "compiled" and self._compiled is not False:
            if self._compiled is None:
                from sam_torch._compiled import CompiledPerturbation

                self._compiled = CompiledPerturbation()
            try:
                self._perturb_with(plan, self._compiled)
                return
            except Exception as exc:
                if not type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
                    raise
                self.restore()
                self._compiled = False
                warnings.warn(
                    f"SAM(perturb_impl='compiled'): torch.compile failed ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}); using the eager "
                    "kernels from now on (perturb_impl='auto' avoids this warning).",
                    RuntimeWarning,
                    stacklevel=3,
                )
        self._perturb_with(plan, None)

    def _perturb_with(self, plan: list[_GroupPlan], compiled: Any) -> None:
        sq_norm: Tensor | None = None
        directions = []
        for group, ops, params, grads, out in plan:
            if compiled is not None and group["adaptive"]:  # d is recomputed in the kernel
                d = None
                sq = compiled.sq_norm(
                    params, grads, adaptive=group["adaptive"], eta=group["eta"], acc_dtype=ops.acc_dtype
                )
            elif group["adaptive"] and _blockable(ops, params, grads, out):
                d, sq = _blocked_direction(ops, params, grads, out, group["eta"])
            else:
                d, sq = sam_core.direction_and_sq_norm(
                    ops, params, grads, adaptive=group["adaptive"], eta=group["eta"], out=out
                )
            directions.append(d)
            sq_norm = sq if sq_norm is None else sq_norm + sq.to(sq_norm.device)
        if sq_norm is None:  # nothing has a gradient: nothing to perturb
            self.grad_norm = None
            return
        norm = torch.sqrt(sq_norm)
        self.grad_norm = norm
        if self.skip_nonfinite:
            grads = [g for _, _, _, gs, _ in plan for g in gs]
            if not _sync_is_cheap(norm.device):
                # No host sync here: second_step() reads this flag with its own, and the
                # possibly non-finite w + e installed below is undone exactly by restore().
                self._clean_finite = _finite_flag(grads)
            elif not bool(torch.isfinite(norm)):
                # The norm is finite for every finite gradient short of an overflow, so the
                # exact check only runs when it is not.
                if not _all_finite(grads):
                    self._skip_base_step = True
                    self.step_skipped = True
                return  # finite gradient, overflowing norm: e = 0 (rho / inf), nothing moves
        for (group, ops, params, grads, out), d in zip(plan, directions, strict=True):
            # maximize=True: the base optimizer minimizes -L, whose ascent direction is -g
            rho = -group["rho"] if group.get("maximize", False) else group["rho"]
            scale = sam_core.perturbation_scale(rho, norm, group["sam_eps"])
            if scale.dtype != ops.acc_dtype:
                # A group mixing dtypes: the global norm is in the widest one. Rounded once
                # to this part's precision here, the scale is the same number for every
                # kernel (foreach, per-tensor with or without a host read), which would
                # otherwise each round a wider scale their own way.
                scale = scale.to(ops.acc_dtype)
            if d is None:
                perturbed = compiled.perturb_into(
                    params, grads, out, scale, adaptive=group["adaptive"], eta=group["eta"],
                    acc_dtype=ops.acc_dtype,
                )
            else:
                perturbed = sam_core.apply_perturbation(ops, params, d, scale, out=out)
            self._install(params, perturbed)

    @entry_point("second_step")
    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, loss: Any = None) -> None:
        """Restore :math:`w` exactly and apply the base optimizer with the current gradient.

        Call after the backward pass at :math:`w + e`. With ``skip_nonfinite``, a
        non-finite gradient (here or in the clean pass) skips the base step: the weights
        are restored and nothing else changes (:attr:`step_skipped` tells).

        ``loss``: the perturbed loss :math:`L(w + e)`, optional. It is stored (detached) as
        :attr:`perturbed_loss` (with ``first_step(loss=...)`` this gives :attr:`sharpness`)
        and, under the default policy ``"clean"``, it is what is checked for the perturbed
        pass (a 0-d read). Without it the policy ``"clean"`` checks the perturbed gradient
        instead (a read-only pass over it), so a ``NaN`` that appears only at
        :math:`w + e` never reaches the weights whichever API drives the step.
        """
        if not self._perturbed:
            raise RuntimeError(
                "second_step() was called without first_step(): call first_step() after the "
                "backward pass at w, then backward at w + e, then second_step()."
            )
        skip = self._skip_base_step
        clean_finite = self._clean_finite
        loss_finite, self._perturbed_loss_finite = self._perturbed_loss_finite, None
        clean_loss = self._clean_loss
        if not self._in_closure_step:
            self.loss, self.perturbed_loss = clean_loss, _detached(loss)
            if (
                loss_finite is None and isinstance(loss, Tensor)
                and self.skip_nonfinite and not self._check_perturbed
            ):
                loss_finite = torch.isfinite(loss.detach()).all()
        self.restore()
        # Policy "clean" checks what the step is built from: the clean gradient and the
        # perturbed loss when there is one (0-d), else the perturbed gradient itself.
        check_grads = self._check_perturbed or loss_finite is None
        if not skip and self.skip_nonfinite and not check_grads:
            # Policy "clean" with a perturbed loss: the clean gradient's flag (accelerators;
            # CPU decided in first_step) and the perturbed loss: 0-d reads only.
            flag = clean_finite
            if loss_finite is not None:
                flag = loss_finite if flag is None else flag & loss_finite.to(flag.device)
            skip = flag is not None and not bool(flag)  # the one host sync of the step
        elif not skip and self.skip_nonfinite:
            grads = self._grads()
            # A read-only sum of squares first: finite for every finite gradient short of an
            # overflow, so the exact (read-and-rewrite) check only runs when it is not.
            flag = _finite_flag(grads, fast=True)
            if clean_finite is not None:
                flag = clean_finite if flag is None else flag & clean_finite.to(flag.device)
            if loss_finite is not None:
                flag = loss_finite if flag is None else flag & loss_finite.to(flag.device)
            skip = flag is not None and not bool(flag)  # the one host sync of the step
            if skip:
                flag = _finite_flag(grads)
                if clean_finite is not None:
                    flag = clean_finite if flag is None else flag & clean_finite.to(flag.device)
                if loss_finite is not None:
                    flag = loss_finite if flag is None else flag & loss_finite.to(flag.device)
                skip = flag is not None and not bool(flag)
        if not skip:
            base_step(self.base_optimizer)
        if zero_grad:
            self.zero_grad()
        self._finish_step(skip)

    def _finish_step(self, skipped: bool) -> None:
        """Book-keeping at the end of every step: skip counter, schedulers, gradient mark."""
        self.step_skipped = skipped
        self._opt_called = True  # tells LR schedulers an optimizer step happened
        self._grad_mark = self._grad_signature()
        if not skipped:
            self.consecutive_skips = 0
            return
        self.consecutive_skips += 1
        n = self.consecutive_skips
        limit = self.max_consecutive_skips
        if limit is not None and n > limit:
            raise RuntimeError(
                f"{n} consecutive SAM steps were skipped because a gradient or loss was not "
                f"finite (skip_nonfinite={self.skip_nonfinite!r}), more than "
                f"max_consecutive_skips={limit}; the weights are the last finite ones. Check "
                "the inputs and labels for NaN/inf, lower the learning rate or rho, and look "
                "for overflow in float16 (use ScaledSAM with a GradScaler, or bfloat16)"
            )
        if n == STALL_WARNING_AFTER + 1:
            warnings.warn(
                f"SAM skipped more than {STALL_WARNING_AFTER} consecutive steps because a "
                f"gradient or loss was not finite (skip_nonfinite={self.skip_nonfinite!r}): "
                "training is not progressing. Check the inputs and labels for NaN/inf, lower "
                "the learning rate or rho, and look for overflow in float16; pass "
                "max_consecutive_skips=N to raise instead.",
                RuntimeWarning,
                stacklevel=3,
            )

    @entry_point("restore")
    @torch.no_grad()
    def restore(self) -> None:
        """Put every perturbed parameter back at :math:`w`, bit for bit; no-op if not perturbed.

        Also cancels a pending ``second_step()``: after ``restore()`` the next call must be
        ``first_step()``.
        """
        for p, original in self._saved_swapped:
            p.data = original
        if self._saved_copied:
            params = [p for p, _ in self._saved_copied]
            saved = [s for _, s in self._saved_copied]
            _copy_all([p.data for p in params], saved)
        self._saved_swapped = []
        self._saved_copied = []
        self._perturbed = False
        self._gc_done = False
        self._skip_base_step = False
        self._clean_finite = None
        self._perturbed_loss_finite = None

    @contextlib.contextmanager
    def perturbed(self, zero_grad: bool = True) -> Iterator[None]:
        """The two-step API as a block that cannot leave the model perturbed.

        On entry ``first_step(zero_grad)``; inside, the parameters hold :math:`w + e` and the
        block runs the perturbed forward and backward; on a normal exit ``second_step(
        zero_grad)``; if the block raises (including ``KeyboardInterrupt`` or an
        out-of-memory error), ``restore()`` puts :math:`w` back, no base step is taken, and
        the exception propagates::

            loss_fn(model(x), y).backward()
            with sam.perturbed():
                loss_fn(model(x), y).backward()

        ``zero_grad`` defaults to ``True`` here because the perturbed backward must not add
        to the clean gradient. If the block itself calls ``second_step()`` or ``restore()``,
        the exit does nothing more. With ``SAM(..., model=model)`` the model's batch-norm
        running statistics are frozen inside the block (:func:`disable_running_stats`).
        """
        self.first_step(zero_grad=zero_grad)
        try:
            with self._frozen_stats():
                yield
        except BaseException:
            self.restore()
            raise
        if self._perturbed:
            self.second_step(zero_grad=zero_grad)

    def _frozen_stats(self) -> contextlib.AbstractContextManager[Any]:
        """Batch-norm running statistics frozen when SAM knows the model, else nothing."""
        if self.model is None:
            return contextlib.nullcontext()
        return disable_running_stats(self.model)

    # -- gradients --------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``; SAM also notes that the gradients are cleared."""
        super().zero_grad(set_to_none=set_to_none)
        self._grad_mark = None if set_to_none else self._grad_signature()

    def _grad_signature(self) -> list[Any] | None:
        """Which gradient tensor each parameter holds, and its version (``None``: no grads)."""
        mark = [
            None if p.grad is None else (weakref.ref(p.grad), p.grad._version)
            for g in self.param_groups
            for p in g["params"]
        ]
        return None if all(m is None for m in mark) else mark

    def _grad_freshness(self) -> Literal["new", "in_place"] | None:
        """Whether, and how, a backward pass may have run since SAM last looked.

        SAM looks at the end of each step, in its ``zero_grad()`` and at construction.
        ``"new"``: some parameter holds a gradient tensor SAM has not seen (only a backward
        pass, or an assignment to ``.grad``, makes one). ``"in_place"``: only tensors SAM
        saw were written to, by a backward pass accumulating into them or by
        ``zero_grad(set_to_none=False)``, which the values alone can tell apart. ``None``:
        nothing changed. No host sync.
        """
        mark = self._grad_mark
        params = [p for g in self.param_groups for p in g["params"]]
        if mark is None:
            return "new" if any(p.grad is not None for p in params) else None
        if len(mark) != len(params):  # a group was added: recompute the clean gradient
            return None
        fresh: Literal["new", "in_place"] | None = None
        for p, m in zip(params, mark, strict=True):
            grad = p.grad
            if grad is None:
                continue
            if m is None or m[0]() is not grad:
                return "new"
            if grad._version != m[1]:
                fresh = "in_place"
        return fresh

    @property
    def is_perturbed(self) -> bool:
        """True between ``first_step()`` and ``second_step()``/``restore()``."""
        return self._perturbed

    @property
    def sharpness(self) -> Tensor | None:
        r""":math:`L(w + e) - L(w)` of the last ``step(closure)`` (``None`` before one)."""
        if self.loss is None or self.perturbed_loss is None:
            return None
        return self.perturbed_loss - self.loss

    @entry_point("step")
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One SAM step through the ``torch.optim`` closure contract; returns the clean loss.

        (``None`` when the clean pass was the caller's own backward, as the popular
        wrapper's ``step`` returns nothing; :attr:`perturbed_loss` is set either way.)

        The closure computes the loss, calls ``backward()`` and returns the loss; SAM sets
        the gradients to ``None`` before *each* call, so a closure that does not zero them
        gives the same result as one that does. The rule for the clean gradient:

        * No backward pass since the last step (the ``torch.optim`` contract, Lightning's
          automatic optimization): the closure is called twice, at :math:`w` and at
          :math:`w + e`.
        * A backward pass ran since the last step or ``zero_grad()`` (new gradient
          tensors, or gradients written in place): that gradient is the clean one and the
          closure is called once, at :math:`w + e`. This is the popular PyTorch SAM
          wrapper's loop, ``loss.backward(); optimizer.step(closure);
          optimizer.zero_grad()``, which gives that wrapper's trajectory, batch-norm
          running statistics and dropout masks included (two forward passes per step;
          the perturbed pass draws fresh masks, as there: the clean pass ran before
          ``step`` could record the generators).
        * Gradients zeroed in place since the last step (``model.zero_grad(
          set_to_none=False)``) are not a backward pass: when the gradient tensors SAM
          last saw were only written in place and every one is now exactly zero, the
          closure is called twice, as in the first case (taking zeros as the clean
          gradient would perturb by 0, a plain base step). The check reads the gradients
          until one is not zero (after a real backward pass, one read of the first
          tensor), only in loops that keep gradient tensors across steps
          (``set_to_none=False``); an all-zero gradient that a backward pass really
          produced gives the same step, with one forward-backward pass more.

        With ``SAM(..., model=model)`` the perturbed call runs with the model's batch-norm
        running statistics frozen (:func:`disable_running_stats`), so they come from the
        clean pass only, without the closure knowing.

        When the closure is called twice, the perturbed call draws the clean call's dropout
        masks (``dropout="same"``, the default: the random-number generators are replayed,
        see :class:`RNGReplay`) and the next step draws fresh ones; ``dropout="fresh"`` draws
        new masks at :math:`w + e`. The replay is done whether or not the model is in
        training mode (it costs two small host copies of the generators' state).

        If the closure raises at :math:`w + e` (including ``KeyboardInterrupt`` or an
        out-of-memory error), the parameters are restored to :math:`w` before the
        exception propagates. A closure may return ``None`` (as ``torch.optim`` allows);
        the step still runs and :attr:`loss`, :attr:`perturbed_loss` and :attr:`sharpness`
        are ``None``. With ``skip_nonfinite`` and a non-finite clean gradient on CPU the
        closure is not called at :math:`w + e` (on accelerators it is, and the step is
        then skipped; see ``skip_nonfinite``).

        ``step()`` without a closure raises: SAM needs a second forward-backward pass. This
        includes ``GradScaler.step(optimizer)`` (Lightning's ``precision="16-mixed"``):
        use :class:`ScaledSAM` under manual optimization, or bfloat16 autocast.
        """
        if closure is None:
            raise RuntimeError(
                "SAM.step() needs a closure: it evaluates the loss twice (at w and at w + e). "
                "Pass one that computes the loss, calls backward() and returns the loss, or "
                "call first_step() and second_step() yourself. Under float16 mixed precision "
                "GradScaler.step(optimizer) (and Lightning's precision='16-mixed', which calls "
                "it) passes no closure: use sam_torch.ScaledSAM with manual optimization "
                "(Lightning: self.automatic_optimization = False), or bfloat16 "
                "(precision='bf16-mixed'), which needs no scaler."
            )
        if not callable(closure):
            raise TypeError(
                f"closure must be a callable taking no arguments, got {type(closure).__name__}; "
                "pass the function itself: sam.step(closure), not sam.step(closure())"
            )
        if self._perturbed:
            raise RuntimeError(
                "step(closure) called between first_step() and second_step(): finish the "
                "two-step API with second_step() (or restore()) before calling step()."
            )
        loss = None
        replay: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        fresh = self._grad_freshness()
        if fresh == "in_place" and self._grads_all_zero():
            # Written in place and now all zero: ``zero_grad(set_to_none=False)`` (the
            # model's or any other) ran since the last step, no backward pass. Taken as the
            # clean gradient, it would perturb by 0 and make this a plain base step.
            fresh = None
        if fresh is None:
            if self.dropout == "same":  # the clean call's dropout masks again at w + e
                replay = RNGReplay([p for g in self.param_groups for p in g["params"]])
            self.zero_grad()
            with torch.enable_grad():
                loss = closure()
        if self._one_pass_step(loss):  # a form that chose a plain step from the clean gradient
            return loss
        self.first_step()
        if self._skip_base_step:  # non-finite clean gradient: nothing perturbed, skip it all
            self.restore()
            self.loss, self.perturbed_loss = _detached(loss), None
            self._finish_step(True)
            return loss
        try:
            self.zero_grad()
            with torch.enable_grad(), self._frozen_stats(), replay:
                perturbed_loss = closure()
        except BaseException:
            self.restore()
            raise
        if self.skip_nonfinite and not self._check_perturbed and isinstance(perturbed_loss, Tensor):
            self._perturbed_loss_finite = torch.isfinite(perturbed_loss.detach()).all()
        self._in_closure_step = True
        try:
            self.second_step()
        finally:
            self._in_closure_step = False
        self.loss = _detached(loss)
        self.perturbed_loss = _detached(perturbed_loss)
        return loss

    def _one_pass_step(self, loss: Any) -> bool:
        """Hook of ``step(closure)`` after the clean pass: a form that decides from the clean
        gradient whether the step needs the perturbed pass (AE-SAM) takes a plain step here
        and returns True; SAM always returns False (the perturbed pass follows)."""
        return False

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state and every group's hyperparameters (SAM's included).

        Raises ``RuntimeError`` between ``first_step()`` and ``second_step()``: the
        parameters then hold perturbed weights, so a checkpoint taken at that point would
        not describe the model. Call ``second_step()`` or ``restore()`` first.
        """
        self._refuse_while_perturbed("state_dict()")
        if _is_zero(self.base_optimizer):
            # The state lives in each rank's local optimizer: ZeRO gathers it on the rank
            # that called consolidate_state_dict(to=rank) (it raises with that fix elsewhere).
            return self.base_optimizer.state_dict()
        return super().state_dict()

    def consolidate_state_dict(self, to: int = 0) -> None:
        """With ``ZeroRedundancyOptimizer`` as base optimizer: gather the sharded optimizer
        state on rank ``to`` (call on every rank), so :meth:`state_dict` works there."""
        if not _is_zero(self.base_optimizer):
            raise TypeError(
                "consolidate_state_dict() is for a ZeroRedundancyOptimizer base optimizer; "
                f"this SAM's is {type(self.base_optimizer).__name__}, whose state_dict() needs "
                "no consolidation"
            )
        self.base_optimizer.consolidate_state_dict(to=to)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict`; the base optimizer shares it.

        A checkpoint of the popular PyTorch SAM wrapper loads too. Its ``state_dict()`` is
        its own state, a copy of the weights per parameter (``"old_p"``; ``"e_w"``, the
        perturbation, in its versions before September 2021), with the param groups it
        shares with its base optimizer; the base optimizer's state (momentum buffers,
        Adam's moments) lives apart and is not in it. Those copies are dropped with a
        warning; the base optimizer then starts from fresh state, as that wrapper's
        own ``load_state_dict`` leaves it. Its ``optimizer.base_optimizer.state_dict()``,
        if it was saved too, holds the base state and the same groups: load that one (or a
        dict whose entries hold both) and training continues exactly. The groups' ``rho``,
        ``adaptive`` and the base hyperparameters come from the checkpoint; SAM's ``eta``
        and ``sam_eps``, which that wrapper has not, from this optimizer's constructor
        (``adaptive=True, eta=0.0`` is the wrapper's adaptive mode).
        """
        self._refuse_while_perturbed("load_state_dict()")
        if _is_zero(self.base_optimizer):
            # Every rank loads the consolidated dict; ZeRO keeps its own partition's state.
            self.base_optimizer.load_state_dict(state_dict)
            self.param_groups = self.base_optimizer.param_groups
            self.state = self.base_optimizer.state
        else:
            state_dict = _without_wrapper_copies(state_dict, self.base_optimizer)
            super().load_state_dict(state_dict)
            # Optimizer.load_state_dict builds new group dicts and a new state: share them.
            self.base_optimizer.param_groups = self.param_groups
            self.base_optimizer.state = self.state
        for group in self.param_groups:
            for key in _SAM_KEYS:
                group.setdefault(key, self.defaults[key])

    def _refuse_while_perturbed(self, what: str) -> None:
        if self._perturbed:
            raise RuntimeError(
                f"{what} called between first_step() and second_step(): the parameters hold "
                "the perturbed weights w + e, not the model. Call second_step() (or restore()) "
                "first."
            )

    # -- internals --------------------------------------------------------------------
    def _use_foreach(self, device: torch.device) -> bool:
        if self._perturb_impl == "auto":
            return device.type != "cpu"
        return self._perturb_impl == "foreach"

    def _use_swap(self, params: list[Tensor]) -> bool:
        if self._storage_choice != "auto":
            return self._storage_choice == "swap"
        return all(_owns_storage(p) for p in params)

    def _enter_skipped_step(self, zero_grad: bool) -> None:
        """Take the place of ``first_step()`` for a step that must be skipped (nothing moves)."""
        self._perturbed = True
        self._skip_base_step = True
        self.step_skipped = True
        if zero_grad:
            self.zero_grad()

    def _grads(self) -> list[Tensor]:
        return [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _grads_all_zero(self) -> bool:
        """Whether every gradient is exactly zero (``NaN`` is not zero).

        Reads one flag per gradient tensor until one is not zero: after a real backward
        pass that is the first tensor (one pass over it, one host read), and only gradients
        zeroed in place are read to the end.
        """
        for grad in self._grads():
            if grad.is_sparse or bool(grad.any()):
                return False
        return True

    def _grads_all_finite(self) -> bool:
        """Whether every gradient of every group is finite (one host sync)."""
        return _all_finite(self._grads())

    def _plan(self) -> list[_GroupPlan]:
        """Per group: its ops, the params with a grad, their grads and their spare buffers."""
        plan = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"SAM does not support sparse gradients (parameter of shape "
                        f"{tuple(p.shape)}); use dense gradients, e.g. nn.Embedding(sparse=False)"
                    )
            for part in _by_device_and_dtype(params):
                device, dtype = part[0].device, part[0].dtype
                ops = TorchOps(
                    device, dtype, foreach=self._use_foreach(device),
                    host_reads=_sync_is_cheap(device),
                )
                grads = [p.grad for p in part]
                out = [self._spare_for(p) for p in part]
                plan.append((group, ops, part, grads, out))
        return plan

    def _spare_for(self, p: Tensor) -> Tensor:
        spare = self._spare.get(p)
        if spare is None or spare.shape != p.shape or spare.dtype != p.dtype or spare.device != p.device:
            spare = torch.empty_like(p.detach(), memory_format=torch.preserve_format)
            self._spare[p] = spare
        return spare

    def _install(self, params: list[Tensor], perturbed: list[Tensor]) -> None:
        """Make each parameter hold ``w + e`` and remember how to get ``w`` back."""
        if self._use_swap(params):
            for p, value in zip(params, perturbed, strict=True):
                self._saved_swapped.append((p, p.data))
                p.data = value
            return
        saved = []
        for p in params:
            buf = self._saved.get(p)
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:
                buf = torch.empty_like(p.detach(), memory_format=torch.preserve_format)
                self._saved[p] = buf
            saved.append(buf)
        data = [p.data for p in params]
        _copy_all(saved, data)
        _copy_all(data, perturbed)
        self._saved_copied.extend(zip(params, saved, strict=True))


#: Elements per cache block of the CPU ASAM direction (see :func:`_blocked_direction`).
_CPU_BLOCK = 1 << 18
_PLAIN = (Tensor, torch.nn.Parameter)


def _blockable(ops: TorchOps, params: list[Tensor], grads: list[Tensor], out: list[Tensor]) -> bool:
    """CPU per-tensor kernels on plain contiguous float32/float64 tensors of one layout."""
    if ops.foreach or ops.device.type != "cpu" or ops.acc_dtype != ops.dtype:
        return False
    return all(
        type(x) in _PLAIN and x.is_contiguous()  # not a DTensor or other subclass
        for xs in (params, grads, out)
        for x in xs
    )


def _blocked_direction(
    ops: TorchOps, params: list[Tensor], grads: list[Tensor], out: list[Tensor], eta: float
) -> tuple[list[Tensor], Tensor]:
    r"""sam_core's ASAM direction :math:`T_w^2 g` and :math:`\lVert T_w g \rVert^2`, a cache block at a time.

    The same computation as :func:`sam_core.direction_and_sq_norm` (it is called on each
    block), but its element-wise passes (``|w|``, :math:`(|w| + \eta)^2` fused into one
    kernel on CPU, :math:`\cdot g`) and the reduction run over about
    ``_CPU_BLOCK`` elements (1 MiB per float32 array: ``w``, ``g`` and ``d`` of a block stay
    in the L2 caches) before moving on, so each pass after the first reads the cache, not
    memory. A tensor larger than a block is cut into flat views, each computed on its own
    (a one-tensor list: one torch call per operation, no stack of partial norms); smaller
    tensors are grouped until they fill a block. Only the summation order of the norm
    differs from the per-tensor passes. On the WRN-16-8 parameter set this takes
    sam_torch's ASAM step from 2.82x to 2.42-2.53x the base SGD step (2.58-2.69x before
    the fused square), the perturbation within 4-6% of a hand-written loop of the same
    kernels (``benchmarks/compare.py``, section 1, "eager floor").
    """
    parts = []
    bw: list[Tensor] = []
    bg: list[Tensor] = []
    bo: list[Tensor] = []
    filled = 0
    for w, g, o in zip(params, grads, out, strict=True):
        n = w.numel()
        if n > _CPU_BLOCK:  # a block at a time, each its own one-tensor list
            wf, gf, of = w.view(-1), g.view(-1), o.view(-1)
            for i in range(0, n, _CPU_BLOCK):
                j = i + _CPU_BLOCK
                parts.append(sam_core.direction_and_sq_norm(
                    ops, (wf[i:j],), (gf[i:j],), adaptive=True, eta=eta, out=(of[i:j],)
                )[1])
            continue
        bw.append(w)
        bg.append(g)
        bo.append(o)
        filled += n
        if filled >= _CPU_BLOCK:
            parts.append(sam_core.direction_and_sq_norm(ops, bw, bg, adaptive=True, eta=eta, out=bo)[1])
            bw, bg, bo, filled = [], [], [], 0
    if bw:
        parts.append(sam_core.direction_and_sq_norm(ops, bw, bg, adaptive=True, eta=eta, out=bo)[1])
    return list(out), torch.stack(parts).sum()


def _by_device_and_dtype(params: list[Tensor]) -> list[list[Tensor]]:
    """``params`` split by (device, dtype), in first-seen order, as torch's foreach paths do.

    The common case, one device and one dtype, returns ``[params]`` after one comparison per
    parameter.
    """
    device, dtype = params[0].device, params[0].dtype
    if all(p.dtype is dtype and p.device == device for p in params):
        return [params]
    parts: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in params:
        parts.setdefault((p.device, p.dtype), []).append(p)
    return list(parts.values())


def _copy_all(dst: list[Tensor], src: list[Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for all i; per tensor for DTensors (no ``_foreach_copy_`` rule)."""
    if any(type(t) is not Tensor for t in dst):
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)
    else:
        torch._foreach_copy_(dst, src)


def _sync_is_cheap(device: torch.device) -> bool:
    """Whether reading a tensor on ``device`` from the host costs no pipeline stall."""
    return device.type == "cpu"


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    """True if no tensor holds an inf or NaN (one host sync)."""
    flag = _finite_flag(tensors)
    return flag is None or bool(flag)


def _finite_flag(tensors: Sequence[Tensor], fast: bool = False) -> Tensor | None:
    """A 0-d bool tensor, True if no tensor holds an inf or NaN (``None`` if none has elements).

    No host sync. It uses ``GradScaler``'s own multi-tensor check, with an unscale factor of
    exactly 1 (so the values are rewritten unchanged): element-wise ``isfinite``, exact for
    any magnitude, and some 15x faster on CPU than a max-abs reduction
    (``_foreach_norm(ord=inf)``).

    With ``fast=True`` the float32/float64 tensors are only read: True means finite for
    sure, but False may also be an overflow of finite values (their sum of squares), so the
    caller must confirm a False with the exact check. On CPU it is about 25% cheaper.
    """
    by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        if t.is_sparse:
            t = t.coalesce().values()
        if t.numel() == 0:
            continue
        by_key.setdefault((t.device, t.dtype), []).append(t)
    flags = []
    for (device, dtype), ts in by_key.items():
        if fast and dtype in (torch.float32, torch.float64) and all(type(t) is Tensor for t in ts):
            if device.type == "cpu" and all(t.is_contiguous() for t in ts):
                big = [t for t in ts if t.numel() >= SMALL_NUMEL]
                # Small tensors: the exact multi-tensor check below is one call, cheaper
                # than a Python-level dot per tensor.
                ts = [t for t in ts if t.numel() < SMALL_NUMEL]
                if big:  # all large: TorchOps reads each with one BLAS dot
                    sq = TorchOps(device, dtype, foreach=False).sum_of_squares(big)
                    flags.append(torch.isfinite(sq))
                if not ts:
                    continue
            else:
                sq = torch.stack(torch._foreach_norm(ts)).sum()
                flags.append(torch.isfinite(sq))
                continue
        found_inf = torch.zeros((), dtype=torch.float32, device=device)
        one = torch.ones((), dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(ts, found_inf, one)
        flags.append(found_inf == 0)
    if not flags:
        return None
    device = flags[0].device
    return torch.stack(
        [f.to(device, non_blocking=copy_is_non_blocking(f.device, device)) for f in flags]
    ).all()


def _is_zero(base: Any) -> bool:
    """Whether ``base`` is ``torch.distributed.optim.ZeroRedundancyOptimizer`` (ZeRO-1)."""
    return type(base).__name__ == "ZeroRedundancyOptimizer" and hasattr(base, "consolidate_state_dict")


def _check_skip_nonfinite(value: Any) -> None:
    """``skip_nonfinite`` is ``"clean"``, ``"both"`` or ``False``; ``True`` is ambiguous."""
    if value is False or (isinstance(value, str) and value in ("clean", "both")):
        return
    accepted = "'clean' (the default), 'both' or False"
    if value is True:
        raise ValueError(
            f"skip_nonfinite=True is ambiguous; pass one of {accepted}: 'clean' checks the "
            "clean gradient and the perturbed loss (or, without one, the perturbed gradient), "
            "'both' always checks the perturbed gradient too, False checks nothing"
        )
    if isinstance(value, str):
        raise ValueError(f"skip_nonfinite must be one of {accepted}, got {value!r}")
    raise TypeError(
        f"skip_nonfinite must be one of {accepted}, got {type(value).__name__} {value!r}"
    )


def _detached(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x


#: Per-parameter entries of the popular SAM wrapper's own state: its copy of ``w`` between
#: the two steps (``"old_p"``), or its perturbation (``"e_w"``, its versions before 2021-09).
_WRAPPER_STATE_KEYS = ("old_p", "e_w")


def _without_wrapper_copies(state_dict: dict[str, Any], base: Optimizer) -> dict[str, Any]:
    """``state_dict`` without the popular wrapper's weight copies (warned once per load).

    The caller's dict is left as it is. Entries left empty are removed, so that the base
    optimizer initializes its state for those parameters (Adam checks for an empty entry).
    """
    state = state_dict.get("state") if isinstance(state_dict, dict) else None
    if not isinstance(state, dict):
        return state_dict
    found = sorted({
        key for entry in state.values() if isinstance(entry, dict)
        for key in _WRAPPER_STATE_KEYS if key in entry
    })
    if not found:
        return state_dict
    kept: dict[Any, Any] = {}
    for index, entry in state.items():
        if isinstance(entry, dict):
            entry = {k: v for k, v in entry.items() if k not in _WRAPPER_STATE_KEYS}
            if not entry:
                continue
        kept[index] = entry
    name = type(base).__name__
    keys = " and ".join(repr(k) for k in found)
    if kept:
        fate = f"The {name} state saved beside them is loaded, so training continues from it."
    else:
        fate = (
            f"It holds no state of the base optimizer {name}: that wrapper's state_dict() "
            f"saves only its own, so {name} starts from fresh state (no momentum buffers or "
            "moments, step count 0), as it does when that wrapper loads this checkpoint. If "
            "optimizer.base_optimizer.state_dict() was saved as well, load that one instead: "
            f"it holds the {name} state and the same param groups, and training continues "
            "exactly."
        )
    warnings.warn(
        f"load_state_dict(): this state dict is the popular SAM wrapper's; its per-parameter "
        f"{keys} entries (the weights, or perturbation, it keeps between its two steps, not "
        f"optimizer state) were dropped. {fate}",
        UserWarning,
        stacklevel=3,
    )
    return {**state_dict, "state": kept}


def _check_no_key_collision(base_optimizer: Any) -> None:
    """SAM's per-group keys must not be hyperparameters of the base optimizer (Adadelta's rho)."""
    try:
        names = set(inspect.signature(base_optimizer).parameters)
    except (TypeError, ValueError):
        return
    clash = sorted(names.intersection(("rho", "adaptive", "eta", "sam_eps")))
    if clash:
        name = getattr(base_optimizer, "__name__", repr(base_optimizer))
        raise ValueError(
            f"base_optimizer {name} takes {clash[0]!r}, which SAM also stores in every param "
            f"group under that name (SAM's {clash[0]!r}); SAM and its base optimizer share the "
            "group dicts, so each would read the other's value, and no keyword argument can "
            "separate them. Use another base optimizer (torch.optim.SGD, Adam, AdamW, RMSprop, "
            "Adagrad, ... have no such argument)."
        )


def _is_named(p: Any) -> bool:
    return isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)


def _eps_is_sam_only(sam: SAM) -> bool:
    """Whether the base optimizer has no ``eps`` of its own (so a group's ``eps`` is a slip)."""
    base = getattr(sam, "base_optimizer", None)
    return base is not None and "eps" not in base.defaults


def _owns_storage(p: Tensor) -> bool:
    if type(p.data) is not Tensor:  # DTensor and other subclasses manage their storage
        return False
    nbytes = p.untyped_storage().nbytes()
    return p.storage_offset() == 0 and nbytes == p.numel() * p.element_size()


def _check_not_in_other_groups(params: list[Any], groups: list[dict[str, Any]]) -> None:
    ids = {id(p) for p in params}
    for j, group in enumerate(groups):
        for p in group["params"]:
            if id(p) in ids:
                raise ValueError(
                    f"param group {len(groups)} repeats a parameter (shape {tuple(p.shape)}) "
                    f"of param group {j}; each parameter may belong to one group only: "
                    "remove it from one of them"
                )


def _check_group_params(params: list[Any], index: int) -> None:
    if not params:
        return
    seen: set[int] = set()
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(
                f"param group {index}: optimizer params must be tensors, got "
                f"{type(p).__name__}; pass the model's parameters, e.g. model.parameters()"
            )
        if id(p) in seen:
            raise ValueError(
                f"param group {index} lists the same parameter (shape {tuple(p.shape)}) twice; "
                "pass each parameter once (model.parameters() already deduplicates shared weights)"
            )
        seen.add(id(p))
        if p.device.type == "meta":
            raise ValueError(
                f"param group {index}: a parameter (shape {tuple(p.shape)}) is on the meta "
                "device, which holds no values; materialize the model first (e.g. "
                "model.to_empty(device='cpu') and initialize it, or load its weights) and "
                "build SAM on its parameters then"
            )
        if p.is_complex():
            raise TypeError(
                f"param group {index}: SAM does not support complex parameters (got {p.dtype}, "
                f"shape {tuple(p.shape)}); optimize torch.view_as_real(param) instead"
            )

