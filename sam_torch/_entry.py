r"""SAM's entry points: one firing of the step hooks per SAM step, and eager under ``torch.compile``.

**Step hooks.** ``torch.optim`` fires the step hooks (the global ones of
``torch.optim.optimizer.register_optimizer_step_pre_hook`` / ``_post_hook`` and an optimizer's
own ``register_step_pre_hook`` / ``register_step_post_hook``) around each call of ``step()``,
by wrapping the class's ``step``. A SAM step is ``step(closure)`` or ``first_step()`` ...
``second_step()``, and it runs the base optimizer's ``step()`` inside: torch's wrapping alone
would fire nothing of SAM's in the two-step API and the global hooks twice in
``step(closure)``. SAM fires them itself instead, once per SAM step:

* the pre hooks (global, then SAM's) on entry to ``step(closure)``, or to ``first_step()`` in
  the two-step API (and to ``m_sharpness_step`` and ``ScaledSAM``'s calls), before anything
  of the step runs;
* the post hooks (SAM's, then global) on return from ``step(closure)``, or from
  ``second_step()``, after everything of the step ran (skipped steps included);
* nothing global for the base optimizer's step inside: hooks registered on
  ``sam.base_optimizer`` itself still fire around it, as torch fires them;
* a step that raises, or that ``restore()`` cancels, fires no post hook (torch fires none
  when ``step()`` raises).

Hooks receive ``(optimizer, args, kwargs)`` as in torch: for ``step(closure)`` the call's
arguments (a pre hook may return new ones, as torch allows), in the two-step API
``args == (optimizer,)`` and ``kwargs == {}`` (there is no ``step()`` call whose arguments
a hook could replace, so what a pre hook returns is not used there).

**torch.compile.** Dynamo does not trace ``p.data = spare`` faithfully (the saved ``p.data``
aliases the new storage, so ``restore()`` would not restore), and SAM's book-keeping (the
gradient marks, the host reads of the skip policy) is Python state a graph cannot hold. So
every entry point runs eagerly (``torch.compiler.disable``): a graph break by design, with
eager's numbers, wherever a compiled function calls SAM. What such a call runs (the closure
of ``step(closure)``, ``m_sharpness_step``'s ``loss_fn``) runs eagerly too; a model compiled
on its own (``torch.compile(model)``) keeps its compiled graphs there, and so do the kernels
of ``perturb_impl="compiled"``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer

__all__ = ["base_step", "close_step", "entry_point", "nested", "open_step"]

_F = TypeVar("_F", bound=Callable[..., Any])

#: Entry points that start a SAM step (fire the pre hooks) and end one (the post hooks).
_OPENS = ("step", "first_step")
_ENDS = ("step", "second_step")
_KINDS = ("step", "first_step", "second_step", "restore")


def _checked(result: Any, hook: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(result, tuple) and len(result) == 2:
        return result
    raise RuntimeError(
        f"optimizer step pre hook {hook!r} must return None or a tuple (new_args, new_kwargs), "
        f"got {result!r}"
    )


def open_step(
    sam: Any,
    args: tuple[Any, ...] | None = None,
    kwargs: dict[str, Any] | None = None,
    opener: str = "step",
) -> tuple[bool, tuple[Any, ...], dict[str, Any]]:
    """Start a SAM step: fire the pre hooks unless one is running or already started.

    Returns ``(opened, args, kwargs)``: whether this call started it, and the arguments
    as the pre hooks left them. ``opener``: ``"first_step"`` for a step of the two-step
    API, which a later ``restore()`` cancels; ``"step"`` for a step that ends only with
    :func:`close_step` (its own calls of ``first_step()`` and ``restore()``, as in
    ``SAMTrainer``'s m-sharpness loop, are its parts).
    """
    args = (sam,) if args is None else args
    kwargs = {} if kwargs is None else kwargs
    if sam._entry_depth or sam._step_open:
        return False, args, kwargs
    hooks = [*_torch_optimizer._global_optimizer_pre_hooks.values(),
             *sam._optimizer_step_pre_hooks.values()]
    for hook in hooks:
        result = hook(sam, args, kwargs)
        if result is not None:
            args, kwargs = _checked(result, hook)
    sam._step_open = opener
    return True, args, kwargs


def close_step(sam: Any, completed: bool, args: tuple[Any, ...] | None = None,
               kwargs: dict[str, Any] | None = None) -> None:
    """End the started SAM step; fire the post hooks if it ``completed`` (no-op when nested)."""
    if sam._entry_depth or not sam._step_open:
        return
    sam._step_open = None
    if not completed:
        return
    args = (sam,) if args is None else args
    kwargs = {} if kwargs is None else kwargs
    hooks = [*sam._optimizer_step_post_hooks.values(),
             *_torch_optimizer._global_optimizer_post_hooks.values()]
    for hook in hooks:
        hook(sam, args, kwargs)


@contextmanager
def nested(sam: Any) -> Iterator[None]:
    """Calls of SAM's entry points inside this block are parts of the running step."""
    sam._entry_depth += 1
    try:
        yield
    finally:
        sam._entry_depth -= 1


def entry_point(
    kind: str, sam_of: Callable[[tuple[Any, ...], dict[str, Any]], Any] | None = None
) -> Callable[[_F], _F]:
    """Make ``fn`` a SAM entry point of ``kind`` (``"step"``, ``"first_step"``, ...).

    The outermost call fires the step hooks as the module docstring says; calls made from
    inside it (``super()``, ``step()`` calling ``first_step()``) are plain calls. Every
    call runs eagerly under ``torch.compile``. ``sam_of(args, kwargs)`` finds the SAM
    optimizer in the call's arguments (default: the first one, ``self``).
    """
    if kind not in _KINDS:  # pragma: no cover - internal use only
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")

    def decorate(fn: _F) -> _F:
        if getattr(fn, "_sam_entry_point", None) is not None:
            return fn

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sam = args[0] if sam_of is None else sam_of(args, kwargs)
            if getattr(sam, "_entry_depth", None) is None:  # not a SAM: fn raises the error
                return fn(*args, **kwargs)
            if sam._entry_depth:
                return fn(*args, **kwargs)
            opened, hook_args, hook_kwargs = False, (sam,), {}
            if kind in _OPENS:
                if kind == "step" and sam_of is None:
                    hook_args, hook_kwargs = args, kwargs
                opened, hook_args, hook_kwargs = open_step(sam, hook_args, hook_kwargs, kind)
                if kind == "step" and sam_of is None:  # a pre hook may replace step()'s arguments
                    args, kwargs = hook_args, hook_kwargs
            try:
                with nested(sam):
                    if kind == "step":
                        name = f"Optimizer.step#{type(sam).__name__}.step"
                        with torch.autograd.profiler.record_function(name):
                            out = fn(*args, **kwargs)
                            sam._optimizer_step_code()
                    else:
                        out = fn(*args, **kwargs)
            except BaseException:
                if opened or kind not in _OPENS:
                    close_step(sam, completed=False)
                raise
            if kind in _ENDS:
                close_step(sam, completed=True, args=hook_args, kwargs=hook_kwargs)
            elif kind == "restore" and sam._step_open == "first_step":
                close_step(sam, completed=False)
            return out

        # torch.compile(f) compiles what a disabled f wraps (it unwraps disable's marker), so
        # the disabled call sits one plain frame down: compiling this frame breaks the graph
        # at the call and runs it eagerly. torch.compiler.disable imports torch._dynamo
        # (about 2 s), so it is made on the first call (or now, if dynamo is loaded already):
        # ``import sam_torch`` does not pay for a compiler it may never use.
        eager: list[Callable[..., Any]] = []
        if "torch._dynamo" in sys.modules:
            eager.append(torch.compiler.disable(wrapper))

        @functools.wraps(fn)
        def entry(*args: Any, **kwargs: Any) -> Any:
            if not eager:
                eager.append(torch.compiler.disable(wrapper))
            return eager[0](*args, **kwargs)

        entry._sam_entry_point = kind  # type: ignore[attr-defined]
        return entry  # type: ignore[return-value]

    return decorate


def base_step(base: Optimizer) -> Any:
    """``base.step()`` around which only the base optimizer's own step hooks fire.

    SAM fires the global step hooks once per SAM step, with itself as the optimizer, so
    the base optimizer's step inside must not fire them again.
    """
    step = type(base).step
    raw = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None
    patched = vars(base).get("step")
    if raw is None or not (patched is None or getattr(patched, "_wrapped_by_lr_sched", False)):
        return base.step()  # no torch hook wrapper, or a wrapper of someone else's: keep it
    if patched is not None:  # an LR scheduler built on the base optimizer itself
        base._opt_called = True  # type: ignore[attr-defined]
    args: tuple[Any, ...] = (base,)
    kwargs: dict[str, Any] = {}
    for hook in list(base._optimizer_step_pre_hooks.values()):
        result = hook(base, args, kwargs)
        if result is not None:
            args, kwargs = _checked(result, hook)
    with torch.autograd.profiler.record_function(f"Optimizer.step#{type(base).__name__}.step"):
        out = raw(*args, **kwargs)
        base._optimizer_step_code()
    for hook in list(base._optimizer_step_post_hooks.values()):
        hook(base, args, kwargs)
    return out
