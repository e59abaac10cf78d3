"""What the sections of the main job share: hyperparameters, run modes, the torch device,
the models, and the optional peers (``pytorch_optimizer``, the JAX side).

A section is a function ``run(config, progress) -> dict``. ``config`` is a plain dict built by
the command line (:func:`benchmarks.compare.make_config`):

* ``mode``: ``"smoke"`` (tiny sizes, seconds: the tests), ``"quick"`` (the default: every
  section with fewer repeats and smaller models, minutes) or ``"full"`` (the figures to quote);
* ``device``: the torch device of the torch sections (``"cpu"``, ``"cuda"``, ...);
* ``backends``: a tuple of ``"torch"`` and/or ``"jax"``;
* ``threads``: torch's intra-op thread count; ``repeats``: a ``--repeats`` override or ``None``;
* ``data_dir``, ``budget``, ``optimizers``: the accuracy section's flags;
* ``out``: the folder this run writes into (a :class:`pathlib.Path`).

``progress`` is a :class:`benchmarks._progress.Progress`: ``progress(iterable, desc=...)`` or
``progress(total=n, desc=...)`` gives a tqdm bar inside the section.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

RHO = 0.05
ASAM_RHO = 0.5  # the ASAM paper's CIFAR value (eta = 0.01)
LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
# Agreement section: at lr 0.1 a few steps on random labels amplify float32 rounding ~1e4-fold
# (torch float32 vs torch float64 differ by 1e-2), which would hide the backends' agreement.
AGREE_LR = 0.01

MODES = ("smoke", "quick", "full")

T = TypeVar("T")


def sized(config: Mapping[str, Any], table: Mapping[str, T]) -> T:
    """The entry of a section's size table for this run: ``table[mode]``, or ``table["gpu"]``
    for a full run on a CUDA device when the table has one."""
    mode = config.get("mode", "quick")
    if mode not in MODES:
        raise ValueError(f"config['mode'] must be one of {MODES}, got {mode!r}")
    if mode == "full" and "gpu" in table and device_of(config).type == "cuda":
        return table["gpu"]
    return table[mode]


def device_of(config: Mapping[str, Any]) -> torch.device:
    return torch.device(config.get("device", "cpu"))


def sync_for(device: torch.device) -> Callable[[Any], None] | None:
    """What the timer calls before reading the clock: wait for the device's queued kernels
    (nothing to wait for on CPU)."""
    if device.type == "cuda":
        return lambda _=None: torch.cuda.synchronize(device)
    return None


def try_import(name: str) -> tuple[Any, str | None]:
    """``(module, None)``, or ``(None, "why it is missing")``."""
    try:
        return __import__(name, fromlist=["_"]), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def pytorch_optimizer() -> tuple[Any, str | None]:
    return try_import("pytorch_optimizer")


def torch_wrn(depth: int, width: int, num_classes: int = 10) -> tuple[torch.nn.Module, str]:
    """The examples' WideResNet, or a shape-equivalent fallback if ``examples`` is missing."""
    try:
        from examples.wrn_torch import WideResNet
    except ImportError:
        return FallbackWRN(depth, width, num_classes), "benchmark fallback WRN"
    return WideResNet(depth, width, num_classes), "examples.wrn_torch.WideResNet"


class FallbackWRN(torch.nn.Module):
    """Pre-activation WRN with the parameter shapes of ``examples.wrn_torch`` (used only
    when the examples package is not importable)."""

    def __init__(self, depth: int, width: int, num_classes: int) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = (16, 16 * width, 32 * width, 64 * width)
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)
        layers: list[torch.nn.Module] = []
        c = 16
        for g, stride in enumerate((1, 2, 2)):
            for i in range(n):
                out = widths[g + 1]
                s = stride if i == 0 else 1
                layers += [
                    torch.nn.BatchNorm2d(c),
                    torch.nn.ReLU(),
                    torch.nn.Conv2d(c, out, 3, stride=s, padding=1, bias=False),
                    torch.nn.BatchNorm2d(out),
                    torch.nn.ReLU(),
                    torch.nn.Conv2d(out, out, 3, padding=1, bias=False),
                ]
                if c != out or s != 1:  # shortcut weights (not wired residually here)
                    layers.append(torch.nn.Conv2d(out, out, 1, bias=False))
                c = out
        self.body = torch.nn.Sequential(*layers, torch.nn.BatchNorm2d(c), torch.nn.ReLU())
        self.fc = torch.nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.stem(x)).mean(dim=(2, 3)))


# --------------------------------------------------------------------------------------
# the JAX side
# --------------------------------------------------------------------------------------
AA_CONTROL = "optax.contrib.sam opaque (A/A copy)"


@functools.lru_cache(maxsize=1)
def jax_side() -> JaxSide:
    """The JAX side, imported once, on first use; ``.error`` says what is missing."""
    return JaxSide()


def jax_unavailable(config: Mapping[str, Any]) -> str | None:
    """Why this run has no JAX side (``--backends`` or a missing package), or ``None``."""
    if "jax" not in config.get("backends", ("torch", "jax")):
        return "--backends torch"
    err = jax_side().error
    return f"JAX side missing ({err})" if err else None


class JaxSide:
    """jax, optax, sam_jax and the examples' Flax WideResNet, with the jitted steps the
    sections time; ``error`` says what is missing."""

    def __init__(self) -> None:
        self.error: str | None = None
        try:
            import flax  # noqa: F401
            import jax
            import jax.numpy as jnp
            import optax
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            return
        self.jax, self.jnp, self.optax = jax, jnp, optax
        self.sam_jax, err = try_import("sam_jax")
        if self.sam_jax is None:
            self.error = f"sam_jax: {err}"
        try:
            from examples.wrn_flax import WideResNet
            self.WideResNet: Any = WideResNet
        except ImportError as exc:
            self.error = f"examples.wrn_flax: {exc}"

    def loss_fn(self, model: Any) -> Callable[..., Any]:
        optax = self.optax

        def loss(params: Any, stats: Any, x: Any, y: Any) -> tuple[Any, Any]:
            logits, new = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                      mutable=["batch_stats"])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return ce, new["batch_stats"]

        return loss

    def steps(self, model: Any, rho: float, adaptive: bool, lr: Any,
              weight_decay: float = 0.0, names: tuple[str, ...] | None = None
              ) -> dict[str, Any]:
        """name -> jitted ``step(params, stats, opt_state, x, y) -> (params, stats, state, loss)``
        and the matching ``tx`` under ``name + ':tx'`` (only ``names`` when given)."""
        jax, optax = self.jax, self.optax
        loss = self.loss_fn(model)
        vg = jax.value_and_grad(loss, has_aux=True)

        def want(name: str) -> bool:
            return names is None or name in names

        def base(lr_: Any) -> Any:
            parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
            return optax.chain(*parts, optax.sgd(lr_, momentum=MOMENTUM))

        out: dict[str, Any] = {}
        tx_sgd = base(lr)

        def sgd_step(params: Any, stats: Any, state: Any, x: Any, y: Any) -> Any:
            (value, new_stats), g = vg(params, stats, x, y)
            updates, state = tx_sgd.update(g, state, params)
            return optax.apply_updates(params, updates), new_stats, state, value

        if want("optax.sgd"):
            out["optax.sgd"], out["optax.sgd:tx"] = jax.jit(sgd_step), tx_sgd
        tx_ours = optax.chain(
            self.sam_jax.sam(rho=rho, adaptive=adaptive), base(lr)) if self.sam_jax else None

        def ours_step(params: Any, stats: Any, state: Any, x: Any, y: Any) -> Any:
            (value, new_stats), g = vg(params, stats, x, y)

            def grad_fn(p: Any) -> Any:  # perturbed pass: its batch statistics are discarded
                return jax.value_and_grad(lambda q: loss(q, stats, x, y)[0])(p)

            updates, state = tx_ours.update(g, state, params, grad_fn=grad_fn, value=value)
            return optax.apply_updates(params, updates), new_stats, state, value

        if tx_ours is not None and want("sam_jax"):
            out["sam_jax"], out["sam_jax:tx"] = jax.jit(ours_step), tx_ours
        if not adaptive:
            adv = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
            tx_opaque = optax.contrib.sam(base(lr), adv, opaque_mode=True)

            def opaque_step(params: Any, stats: Any, state: Any, x: Any, y: Any) -> Any:
                (value, new_stats), g = vg(params, stats, x, y)

                def grad_fn(p: Any, _: int) -> Any:
                    return jax.grad(lambda q: loss(q, stats, x, y)[0])(p)

                updates, state = tx_opaque.update(g, state, params, grad_fn=grad_fn)
                return optax.apply_updates(params, updates), new_stats, state, value

            if want("optax.contrib.sam opaque"):
                out["optax.contrib.sam opaque"] = jax.jit(opaque_step)
                out["optax.contrib.sam opaque:tx"] = tx_opaque
            if want(AA_CONTROL):
                # A/A control: the same program compiled again as a separate executable. How
                # far its time is from the first copy's is the noise floor of comparing steps.
                out[AA_CONTROL] = jax.jit(lambda *a: opaque_step(*a))
                out[AA_CONTROL + ":tx"] = tx_opaque
            tx_alt = optax.contrib.sam(base(lr), adv, opaque_mode=False)

            def alt_half(params: Any, stats: Any, state: Any, x: Any, y: Any) -> Any:
                (value, new_stats), g = vg(params, stats, x, y)
                updates, state = tx_alt.update(g, state, params)
                return optax.apply_updates(params, updates), new_stats, state, value

            if want("optax.contrib.sam alternating"):
                out["optax.contrib.sam alternating"] = jax.jit(alt_half)
                out["optax.contrib.sam alternating:tx"] = tx_alt
        return out
