r"""Sharpness diagnostics for PyTorch models: Hessian spectrum and trace, sharpness, landscapes.

Every function takes ``(model, loss_fn, data, ...)``:

* ``model``: an ``nn.Module``; the measures are over its trainable parameters
  (``requires_grad=True``), frozen parameters and buffers held fixed.
* ``loss_fn``: either ``loss_fn(model, batch)`` returning the batch's **mean** loss as a 0-d
  tensor (the convention of :func:`sam_torch.m_sharpness_step`), or a criterion such as
  ``nn.CrossEntropyLoss()`` / ``torch.nn.functional.cross_entropy`` (an ``nn.Module`` or a
  function of ``torch.nn.functional``), which is called as ``loss_fn(model(inputs), targets)``
  on batches ``(inputs, targets)``.
* ``data``: one batch, or an iterable of batches (a ``DataLoader``, a list; an iterator is
  read once and kept). A batch is a tensor, a dict, or a tuple/list whose items are tensors;
  anything else iterable is a sequence of batches (wrap one nested batch as ``[batch]``).
  Over several batches the loss is the full pass's mean over examples,
  :math:`L = \sum_b n_b L_b / \sum_b n_b` with :math:`n_b` the leading dimension of the
  batch's first tensor, so gradients, Hessian-vector products and losses are exact for the
  whole data set whatever the batch sizes (give the loader a fixed order and no random
  augmentation: every pass must see the same data).

The model is evaluated in eval mode (BatchNorm with its running statistics, dropout off).
``bn_mode="train"`` normalizes with each batch's own statistics instead (BatchNorm layers
in training mode, dropout still off, running statistics not updated). Modes are restored
afterwards. Weights are never written: every evaluation is a ``torch.func.functional_call``
at :math:`w + \delta`, so the parameters are bit for bit what they were and no ``.grad`` is
created or changed.

Hessian-vector products: ``hvp="double_backward"`` (``torch.autograd.grad`` of the gradient
built with ``create_graph=True``, PyHessian's way) or ``"func"`` (``torch.func``). Over one
batch (a batch, or a one-element list) the part that does not depend on the vector is built
once per call of a function and every product reuses it: the gradient's graph for the double
backward, ``torch.func.vjp(torch.func.grad(f))`` for ``"func"`` (reverse over reverse: the
Hessian is symmetric, so the vjp of the gradient is :math:`Hv`), each product one backward
through it. Over several batches each product rebuilds it per batch (one batch's graph held
at a time): the double backward, or ``torch.func.jvp(torch.func.grad(f))`` (forward over
reverse) for ``"func"``. In the reverse-over-reverse products, convolutions and eval-mode
BatchNorm record a cheaper second derivative than torch's own (the weight-gradient term by
the native kernel, BatchNorm as its per-channel affine map; same numbers up to rounding,
``sam_torch/_hvp_ops.py``). ``"auto"`` is the double backward, the faster as measured on CPU
by ``benchmarks/diagnostics.py`` (WRN-16-2, batch 128, float32): over one batch 2.17
gradients per product against 2.21 for ``torch.func``'s vjp, over several 3.54 against 3.78
for the forward-over-reverse.

The math is :mod:`sam_core`'s; ``sam_jax.diagnostics`` computes the same numbers.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from sam_core import _diagnostics as core
from sam_core._diagnostics import Landscape, SharpnessEstimate, TraceEstimate
from sam_core._plots import plot_landscape, plot_spectrum
from sam_core._validation import check_nonnegative, check_positive_int

from ._hvp_ops import HVPFriendly
from ._ops import TorchOps

__all__ = [
    "Landscape",
    "SharpnessEstimate",
    "TraceEstimate",
    "hessian_eigenvalues",
    "hessian_trace",
    "loss_landscape",
    "plot_landscape",
    "plot_spectrum",
    "sharpness",
]

HVPMethod = Literal["auto", "func", "double_backward"]
BNMode = Literal["eval", "train"]


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def _is_batch(data: Any) -> bool:
    if isinstance(data, Tensor) or isinstance(data, Mapping):
        return True
    if isinstance(data, (tuple, list)):
        return len(data) > 0 and all(isinstance(x, Tensor) for x in data)
    return False


def _batches(data: Any) -> Iterable[Any]:
    """``data`` as a re-iterable sequence of batches."""
    if _is_batch(data):
        return (data,)
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a batch (a tensor, a tuple/list of tensors or a dict) or an iterable "
            f"of batches, got {type(data).__name__}"
        )
    if isinstance(data, Iterator):
        data = list(data)  # read once, used by every pass
    return data


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for x in values:
        t = _first_tensor(x)
        if t is not None:
            return t
    return None


def _batch_size(batch: Any) -> int:
    t = _first_tensor(batch)
    if t is None:
        raise TypeError(f"a batch must contain a tensor (its leading dimension is the batch size), got {type(batch).__name__}")
    return int(t.shape[0]) if t.ndim else 1


def _slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[start:stop] if batch.ndim else batch
    if isinstance(batch, Mapping):
        return {k: _slice(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_slice(x, start, stop) for x in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(x, start, stop) for x in batch)
    return batch


def _chunks(data: Any, m: int | None) -> Iterator[tuple[Any, int]]:
    """``(chunk, examples)``: the whole data as one chunk (``m=None``) or chunks of ``m``."""
    batches = _batches(data)
    if m is None:
        yield batches, -1
        return
    for batch in batches:
        n = _batch_size(batch)
        for start in range(0, n, m):
            stop = min(start + m, n)
            yield (_slice(batch, start, stop),), stop - start


# ---------------------------------------------------------------------------------------
# The objective: the loss as a function of the trainable parameters
# ---------------------------------------------------------------------------------------


def _is_criterion(loss_fn: Any) -> bool:
    if isinstance(loss_fn, nn.Module):
        return True
    module = getattr(loss_fn, "__module__", None) or ""
    return isinstance(loss_fn, (types.FunctionType, types.BuiltinFunctionType)) and module.startswith(
        "torch.nn.functional"
    )


class _LossModule(nn.Module):
    """``batch -> loss_fn(...)`` as a module, so ``functional_call`` swaps the model's weights."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.criterion = _is_criterion(loss_fn)

    def forward(self, batch: Any) -> Tensor:
        if self.criterion:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise TypeError(
                    "with a criterion as loss_fn (called as loss_fn(model(inputs), targets)) each "
                    f"batch must be a pair (inputs, targets), got {type(batch).__name__}; or pass "
                    "loss_fn(model, batch) returning the batch's mean loss"
                )
            inputs, targets = batch[0], batch[1]
            return self.loss_fn(self.model(inputs), targets)
        return self.loss_fn(self.model, batch)


class _Objective:
    """The full-pass loss :math:`L(w + \\delta)`, its gradient and Hessian-vector products."""

    def __init__(self, model: nn.Module, loss_fn: Any, hvp: HVPMethod, bn_mode: BNMode) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        core.check_choice("hvp", hvp, ("auto", "func", "double_backward"))
        core.check_choice("bn_mode", bn_mode, ("eval", "train"))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                "model has no trainable parameters (none with requires_grad=True): there is no "
                "Hessian or sharpness to measure"
            )
        kinds = {(p.device, p.dtype) for _, p in named}
        if len(kinds) > 1:
            raise ValueError(
                "the trainable parameters must share one device and dtype, got "
                f"{sorted(str(k) for k in kinds)}; cast the model (e.g. model.double())"
            )
        if not named[0][1].is_floating_point():
            raise ValueError(f"trainable parameters must be floating point, got {named[0][1].dtype}")
        self.model = model
        self.wrapper = _LossModule(model, loss_fn)
        self.names = ["model." + n for n, _ in named]
        self.param_names = [n for n, _ in named]
        self.params = [p.detach() for _, p in named]
        self.device, self.dtype = next(iter(kinds))
        self.ops = TorchOps(self.device, self.dtype, foreach=False)
        self.shapes = [tuple(p.shape) for p in self.params]
        self.dim = sum(p.numel() for p in self.params)
        self.hvp_method = hvp
        self.bn_mode = bn_mode

    # -- modes ------------------------------------------------------------------------
    def __enter__(self) -> _Objective:
        self._modes = [(m, m.training) for m in self.model.modules()]
        self._tracking = []
        self.model.eval()
        if self.bn_mode == "train":
            for m in self.model.modules():
                if isinstance(m, _BatchNorm):
                    # Batch statistics without touching the running ones: forward then passes
                    # no running buffers to the kernel (and does not count the batch).
                    self._tracking.append((m, m.track_running_stats))
                    m.train()
                    m.track_running_stats = False
        return self

    def __exit__(self, *exc: Any) -> None:
        for m, tracking in self._tracking:
            m.track_running_stats = tracking
        for m, training in self._modes:
            m.training = training

    # -- conversions ------------------------------------------------------------------
    def tensors(self, arrays: Sequence[Any]) -> list[Tensor]:
        return [torch.as_tensor(np.asarray(a), dtype=self.dtype).to(self.device) for a in arrays]

    def vector(self, given: Any, what: str) -> list[Tensor]:
        """A user's vector: a sequence aligned with the trainable parameters or a name dict."""
        if isinstance(given, Mapping):
            missing = [n for n in self.param_names if n not in given]
            if missing:
                raise ValueError(f"{what} lacks entries for the trainable parameters {missing[:5]}")
            given = [given[n] for n in self.param_names]
        given = list(given)
        if len(given) != len(self.params):
            raise ValueError(
                f"{what} must have one array per trainable parameter ({len(self.params)}), got {len(given)}"
            )
        out = []
        for g, p, name in zip(given, self.params, self.param_names, strict=True):
            t = g.detach() if isinstance(g, Tensor) else torch.as_tensor(np.array(g))
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{what}: entry for {name!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            out.append(t.to(device=self.device, dtype=self.dtype))
        return out

    # Lanczos, power iteration and Hutchinson run on flat NumPy vectors (see sam_core).
    def host_dtype(self) -> np.dtype:
        return np.dtype(np.float64) if self.dtype == torch.float64 else np.dtype(np.float32)

    def split(self, v: np.ndarray) -> list[Tensor]:
        flat = torch.from_numpy(np.ascontiguousarray(v)).to(device=self.device, dtype=self.dtype)
        sizes = [p.numel() for p in self.params]
        return [t.view(shape) for t, shape in zip(torch.split(flat, sizes), self.shapes, strict=True)]

    def to_host(self, xs: Sequence[Tensor]) -> np.ndarray:
        return torch.cat([x.reshape(-1) for x in xs]).cpu().numpy().astype(self.host_dtype(), copy=False)

    def flat_hvp(self, batches: Iterable[Any]) -> Callable[[np.ndarray], np.ndarray]:
        product = self.hvp_operator(batches)
        return lambda v: self.to_host(product(self.split(v)))

    # -- evaluations ------------------------------------------------------------------
    def _call(self, point: Sequence[Tensor], batch: Any) -> Tensor:
        loss = torch.func.functional_call(self.wrapper, dict(zip(self.names, point, strict=True)), (batch,))
        return loss

    def _checked(self, loss: Any) -> Tensor:
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
        if loss.ndim != 0:
            raise ValueError(
                f"loss_fn must return a scalar (0-d) loss, the batch's mean; got shape {tuple(loss.shape)}"
                " (reduce it, e.g. with reduction='mean')"
            )
        return loss

    def point(self, delta: Sequence[Tensor] | None) -> list[Tensor]:
        if delta is None:
            return list(self.params)
        return [p + d for p, d in zip(self.params, delta, strict=True)]

    def loss(self, delta: Sequence[Tensor] | None, batches: Iterable[Any]) -> float:
        point = self.point(delta)
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                n = _batch_size(batch)
                total += n * float(self._checked(self._call(point, batch)))
                count += n
        if count == 0:
            raise ValueError("data holds no batches")
        return total / count

    def value_and_grad(self, delta: Sequence[Tensor] | None, batches: Iterable[Any]) -> tuple[float, list[Tensor]]:
        point = [p.detach().requires_grad_(True) for p in self.point(delta)]
        total, count = 0.0, 0
        grad: list[Tensor] | None = None
        for batch in batches:
            n = _batch_size(batch)
            loss = self._checked(self._call(point, batch))
            g = torch.autograd.grad(loss, point, allow_unused=True, materialize_grads=True)
            total += n * float(loss.detach())
            grad = [gi.mul(n) for gi in g] if grad is None else self.ops.add_scaled(grad, list(g), float(n))
            count += n
        if count == 0 or grad is None:
            raise ValueError("data holds no batches")
        return total / count, self.ops.scale(grad, 1.0 / count)

    def _hvp_double_backward(self, point: list[Tensor], v: list[Tensor], batch: Any) -> list[Tensor]:
        ps = [p.detach().requires_grad_(True) for p in point]
        with HVPFriendly():
            loss = self._checked(self._call(ps, batch))
        grads = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True, materialize_grads=True)
        pairs = [(g, vi, i) for i, (g, vi) in enumerate(zip(grads, v, strict=True)) if g.requires_grad]
        out = [torch.zeros_like(p) for p in ps]
        if pairs:
            hv = torch.autograd.grad(
                [g for g, _, _ in pairs], ps, grad_outputs=[vi for _, vi, _ in pairs],
                allow_unused=True, materialize_grads=True,
            )
            out = [h.detach() for h in hv]
        return out

    def _hvp_func(self, point: list[Tensor], v: list[Tensor], batch: Any) -> list[Tensor]:
        names = self.names

        def loss_of(params: dict[str, Tensor]) -> Tensor:
            return self._checked(torch.func.functional_call(self.wrapper, params, (batch,)))

        primals = dict(zip(names, point, strict=True))
        tangents = dict(zip(names, v, strict=True))
        _, hv = torch.func.jvp(torch.func.grad(loss_of), (primals,), (tangents,))
        return [hv[n] for n in names]

    def hvp_operator(self, batches: Iterable[Any]) -> Callable[[list[Tensor]], list[Tensor]]:
        """``v -> H v`` at the weights over ``batches``, for many products in a row.

        Over one batch (a batch, or a one-element tuple/list) what does not depend on ``v`` is
        computed once: the gradient's graph (``create_graph=True``) for the double backward, the
        ``torch.func.vjp`` of the gradient for ``"func"``; each product is then one backward
        through it (about two gradients instead of three), and the graph (the activations of
        one forward and backward pass) is held until the operator is dropped. Over several
        batches each product rebuilds it per batch (:meth:`hvp`): one batch's graph at a time.
        """
        if not (isinstance(batches, (tuple, list)) and len(batches) == 1):
            return lambda v: self.hvp(v, batches)
        (batch,) = batches
        _batch_size(batch)  # validates the batch
        if self.hvp_method == "func":
            return self._func_operator(batch)
        with torch.enable_grad(), HVPFriendly():
            ps = [p.detach().requires_grad_(True) for p in self.params]
            loss = self._checked(self._call(ps, batch))
            grads = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True, materialize_grads=True)
        index = [i for i, g in enumerate(grads) if g.requires_grad]
        outputs = [grads[i] for i in index]

        def product(v: list[Tensor]) -> list[Tensor]:
            if not outputs:  # the loss is linear in every parameter
                return [torch.zeros_like(p) for p in ps]
            hv = torch.autograd.grad(outputs, ps, grad_outputs=[v[i] for i in index], retain_graph=True,
                                     allow_unused=True, materialize_grads=True)
            return [h.detach() for h in hv]

        return product

    def _func_operator(self, batch: Any) -> Callable[[list[Tensor]], list[Tensor]]:
        names = self.names

        def loss_of(params: dict[str, Tensor]) -> Tensor:
            return self._checked(torch.func.functional_call(self.wrapper, params, (batch,)))

        # The Hessian is symmetric: the vjp of the gradient is H v (reverse over reverse), and
        # its vjp_fn replays the recorded backward for each v.
        with HVPFriendly():
            _, vjp_fn = torch.func.vjp(torch.func.grad(loss_of), dict(zip(names, self.params, strict=True)))

        def product(v: list[Tensor]) -> list[Tensor]:
            (hv,) = vjp_fn(dict(zip(names, v, strict=True)))
            return [hv[n].detach() for n in names]

        return product

    def hvp(self, v: list[Tensor], batches: Iterable[Any]) -> list[Tensor]:
        point = list(self.params)
        total: list[Tensor] | None = None
        count = 0
        for batch in batches:
            n = _batch_size(batch)
            hv = self._one_hvp(point, v, batch)
            total = [h.mul(n) for h in hv] if total is None else self.ops.add_scaled(total, hv, float(n))
            count += n
        if count == 0 or total is None:
            raise ValueError("data holds no batches")
        return self.ops.scale(total, 1.0 / count)

    def _one_hvp(self, point: list[Tensor], v: list[Tensor], batch: Any) -> list[Tensor]:
        # "auto": the double backward, measured faster than the forward-over-reverse when
        # each product starts from the weights.
        if self.hvp_method == "func":
            return self._hvp_func(point, v, batch)
        return self._hvp_double_backward(point, v, batch)

    def check(self, batches: Iterable[Any]) -> float:
        """The clean loss, which also validates ``loss_fn`` before any long computation."""
        return self.loss(None, batches)


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    k: int = 1,
    *,
    method: Literal["lanczos", "power"] = "lanczos",
    which: core.Which = "largest",
    max_iter: int = 100,
    tol: float | None = None,
    seed: int | np.random.Generator = 0,
    hvp: HVPMethod = "auto",
    bn_mode: BNMode = "eval",
    return_eigenvectors: bool = False,
    progress: bool = False,
) -> np.ndarray | tuple[np.ndarray, list[list[Tensor]]]:
    r"""The top ``k`` eigenvalues of the Hessian :math:`\nabla^2 L(w)` of the loss over ``data``.

    ``method="lanczos"`` (default): Lanczos with full reorthogonalization from a Gaussian start
    (drawn from ``seed``), stopped when the ``k`` Ritz values have relative residuals below
    ``tol`` (1e-10 in float64, 1e-5 in float32 by default), after ``max_iter`` Hessian-vector
    products or when the Krylov basis spans all parameters (the result is then exact up to
    rounding). ``which``: ``"largest"`` (algebraic, default), ``"smallest"`` or
    ``"magnitude"``. ``method="power"``: power iteration with deflation (PyHessian's
    algorithm: the eigenvalues of largest magnitude, one after the other, each to a relative
    change ``tol``; ``max_iter`` products per eigenvalue).

    Cost: one Hessian-vector product (about two gradients, see ``hvp``) over the whole
    ``data`` per iteration, and ``max_iter`` parameter-sized vectors of memory for the basis.

    Returns:
        The eigenvalues as a float64 NumPy array of shape ``(k,)`` (largest first for
        ``which="largest"``); with ``return_eigenvectors``, ``(eigenvalues, vectors)`` where
        ``vectors[i]`` is the unit eigenvector as one tensor per trainable parameter.

    References: Lanczos (1950); Ghorbani, Krishnan & Xiao, ICML 2019; Yao et al., "PyHessian",
    IEEE BigData 2020.
    """
    check_positive_int("k", k)
    check_positive_int("max_iter", max_iter)
    core.check_choice("method", method, ("lanczos", "power"))
    obj = _Objective(model, loss_fn, hvp, bn_mode)
    if k > obj.dim:
        raise ValueError(f"k must be at most the number of trainable parameters ({obj.dim}), got {k}")
    tol = core.default_tolerance(str(obj.dtype)) if tol is None else tol
    check_nonnegative("tol", tol)
    rng = _rng(seed)
    batches = _batches(data)
    with obj:
        obj.check(batches)
        bar = core.progress_bar(progress, max_iter if method == "lanczos" else k * max_iter, "Hessian eigenvalues")
        try:
            matvec = obj.flat_hvp(batches)

            def random_start() -> np.ndarray:
                return core.flat(core.gaussian_vector(obj.shapes, rng)).astype(obj.host_dtype())

            if method == "lanczos":
                values, vectors, _ = core.lanczos(
                    matvec, random_start(), k=k, max_iter=max_iter, tol=tol, which=which, restart=random_start, return_vectors=return_eigenvectors, progress=bar,
                )
            else:
                values, vectors, _ = core.power_iteration(
                    matvec, random_start, k=k, max_iter=max_iter, tol=tol,
                    return_vectors=return_eigenvectors, progress=bar,
                )
        finally:
            bar.close()
    if return_eigenvectors:
        return values, [obj.split(v) for v in vectors]
    return values


def hessian_trace(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    probes: int | Sequence[Any] = 100,
    *,
    seed: int | np.random.Generator = 0,
    hvp: HVPMethod = "auto",
    bn_mode: BNMode = "eval",
    progress: bool = False,
) -> TraceEstimate:
    r"""Hutchinson's estimate of the Hessian trace :math:`\operatorname{tr}\nabla^2 L(w)`.

    .. math::

        \operatorname{tr} H \approx \frac1P \sum_{i=1}^P z_i^\top H z_i, \qquad
        z_i \in \{-1, +1\}^d \text{ (Rademacher)}.

    ``probes``: the number :math:`P` of Rademacher probes, drawn from ``seed`` with NumPy
    (the same numbers as ``sam_jax.diagnostics.hessian_trace`` for parameters of the same
    shapes in the same order), or the probes themselves: a sequence of vectors, each a
    sequence of arrays/tensors aligned with the trainable parameters (or a dict by
    parameter name).

    Returns:
        A :class:`TraceEstimate`: a ``float`` (the mean) with ``.std_error`` (standard error of
        the mean; the exact trace lies within 3 of them about 99.7% of the time) and
        ``.samples``. Cost: one Hessian-vector product over ``data`` per probe.

    Reference: Hutchinson, "A stochastic estimator of the trace of the influence matrix",
    1989; Yao et al., "PyHessian", 2020.
    """
    obj = _Objective(model, loss_fn, hvp, bn_mode)
    if isinstance(probes, bool):
        raise TypeError(f"probes must be an int or a sequence of probe vectors, got {probes!r}")
    if isinstance(probes, (int, np.integer)):
        check_positive_int("probes", int(probes))
        rng = _rng(seed)
        count = int(probes)
        vectors: Iterable[np.ndarray] = (core.flat(core.rademacher_vector(obj.shapes, rng)) for _ in range(count))
    else:
        given = list(probes)
        if not given:
            raise ValueError("probes must hold at least one probe vector, got an empty sequence")
        count = len(given)
        vectors = [obj.to_host(obj.vector(z, f"probe {i}")) for i, z in enumerate(given)]
    batches = _batches(data)
    with obj:
        obj.check(batches)
        bar = core.progress_bar(progress, count, "Hessian trace")
        try:
            return core.hutchinson(obj.flat_hvp(batches), vectors, progress=bar)
        finally:
            bar.close()


def sharpness(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    *,
    rho: float,
    kind: Literal["worst", "average"] = "worst",
    adaptive: bool = False,
    m: int | None = None,
    eta: float = 0.0,
    steps: int = 100,
    samples: int = 10,
    seed: int | np.random.Generator = 0,
    bn_mode: BNMode = "eval",
    progress: bool = False,
) -> SharpnessEstimate:
    r"""Worst-case or average (adaptive) m-sharpness (Andriushchenko et al., ICML 2023).

    .. math::

        S^{\rho}_{\max} = \frac{1}{n}\sum_{c} n_c \max_{\lVert T_w^{-1}\delta\rVert_2\le\rho}
            \big[L_c(w+\delta) - L_c(w)\big], \qquad
        S^{\rho}_{\mathrm{avg}} = \frac{1}{n}\sum_{c} n_c \,
            \mathbb{E}_{\lVert T_w^{-1}\delta\rVert_2=\rho}\big[L_c(w+\delta) - L_c(w)\big],

    over chunks :math:`c` of ``m`` consecutive examples of each batch (:math:`n_c` examples;
    the last chunk of a batch may be smaller), or over the whole ``data`` as one chunk when
    ``m`` is ``None``. :math:`T_w = 1` is SAM's ball; ``adaptive=True`` takes
    :math:`T_w = |w| + \eta` (element-wise), the scale-invariant ball of ASAM and of the
    paper's adaptive sharpness (``eta=0`` there: a weight at zero is not perturbed).

    ``kind="worst"``: projected normalized gradient ascent in the ball from the SAM/ASAM
    perturbation (a random point of the sphere where the gradient is zero), at most ``steps``
    steps of one gradient each, with an adaptive step length (see
    :func:`sam_core._diagnostics.worst_case_sharpness`); the value is a lower bound of the
    maximum, which it reaches on a quadratic (at a stationary point,
    :math:`\tfrac12\rho^2\lambda_{\max}(T H T)`). ``kind="average"``: ``samples``
    directions uniform on the sphere per chunk, one loss each.

    Returns:
        A :class:`SharpnessEstimate`: a ``float`` with ``.per_chunk``, ``.weights`` (examples
        per chunk) and ``.loss`` (the clean loss).
    """
    check_nonnegative("rho", rho)
    core.check_choice("kind", kind, ("worst", "average"))
    if not isinstance(adaptive, bool):
        raise TypeError(f"adaptive must be a bool, got {adaptive!r}")
    if m is not None:
        check_positive_int("m", m)
    check_nonnegative("eta", eta)
    check_positive_int("steps", steps)
    check_positive_int("samples", samples)
    obj = _Objective(model, loss_fn, "auto", bn_mode)
    rng = _rng(seed)
    transform = [p.abs().add(eta) for p in obj.params] if adaptive else None
    values, weights, losses = [], [], []
    with obj:
        bar = core.progress_bar(progress, None, f"{kind}-case sharpness" if kind == "worst" else "average sharpness")
        try:
            for batches, n in _chunks(data, m):
                n = max(n, 1)  # m=None: one chunk, its weight is irrelevant
                if kind == "worst":
                    start = obj.tensors([rho * x for x in core.unit_sphere_vector(obj.shapes, rng)])
                    value, loss, _ = core.worst_case_sharpness(
                        obj.ops, lambda d, b=batches: obj.value_and_grad(d, b), start, rho=float(rho),
                        transform=transform, base=obj.value_and_grad(None, batches), steps=steps,
                        progress=bar,
                    )
                else:
                    directions = (obj.tensors(core.unit_sphere_vector(obj.shapes, rng)) for _ in range(samples))
                    value, loss = core.average_sharpness(
                        obj.ops, lambda d, b=batches: obj.loss(d, b), directions, rho=float(rho),
                        transform=transform, base_loss=obj.loss(None, batches), progress=bar,
                    )
                values.append(value)
                weights.append(n)
                losses.append(loss)
        finally:
            bar.close()
    if not values:
        raise ValueError("data holds no examples")
    return SharpnessEstimate(values, weights, losses, kind)


def loss_landscape(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    *,
    dims: Literal[1, 2] = 1,
    steps: int = 21,
    span: float | tuple[float, float] = 1.0,
    directions: Sequence[Any] | None = None,
    normalization: Literal["filter", "layer", "none"] = "filter",
    ignore_1d: bool = True,
    seed: int | np.random.Generator = 0,
    bn_mode: BNMode = "eval",
    progress: bool = False,
) -> Landscape:
    r"""The loss on a line (``dims=1``) or plane (``dims=2``) through the weights (Li et al., 2018).

    .. math::

        f(a) = L(w + a\,d_1) \quad\text{or}\quad f(a, b) = L(w + a\,d_1 + b\,d_2),

    at ``steps`` evenly spaced coefficients over ``span`` (:math:`[-s, s]`, or a ``(lo, hi)``
    pair) per direction. ``directions=None`` draws Gaussian directions from ``seed`` and
    normalizes them against the weights (``"filter"``: each output filter, i.e. each slice
    along axis 0 of a weight, to the norm of the weights' filter, Li et al.'s filter
    normalization; ``"layer"``: per tensor; ``"none"``), with zero direction for 1-D
    parameters (biases, norm scales) when ``ignore_1d``. Given ``directions`` (``dims`` of
    them, each aligned with the trainable parameters or a dict by name) are used as they are.

    Cost: ``steps ** dims`` loss evaluations (forward passes) over ``data``.

    Returns:
        A :class:`Landscape` with ``coords``, ``loss`` and ``base_loss``; draw it with
        :func:`plot_landscape`.
    """
    if dims not in (1, 2) or isinstance(dims, bool):
        raise ValueError(f"dims must be 1 or 2, got {dims!r}")
    coords = core.landscape_axes(dims, steps, span)
    obj = _Objective(model, loss_fn, "auto", bn_mode)
    if directions is None:
        rng = _rng(seed)
        weights = [p.detach().cpu().double().numpy() for p in obj.params]
        dirs = [
            obj.tensors(core.filter_normalize(
                core.gaussian_vector(obj.shapes, rng), weights, filter_axis=0,
                normalization=normalization, ignore_1d=ignore_1d,
            ))
            for _ in range(dims)
        ]
        how = normalization
    else:
        given = list(directions)
        if len(given) != dims:
            raise ValueError(f"directions must hold dims={dims} direction(s), got {len(given)}")
        dirs = [obj.vector(d, f"direction {i}") for i, d in enumerate(given)]
        how = "given"
    batches = _batches(data)
    with obj:
        base = obj.check(batches)
        grid = np.empty(tuple(len(c) for c in coords))
        bar = core.progress_bar(progress, grid.size, "loss landscape")
        try:
            for index in np.ndindex(grid.shape):
                delta = obj.ops.scale(dirs[0], float(coords[0][index[0]]))
                if dims == 2:
                    delta = obj.ops.add_scaled(delta, dirs[1], float(coords[1][index[1]]))
                grid[index] = obj.loss(delta, batches)
                bar.update(1)
        finally:
            bar.close()
    return Landscape(coords=coords, loss=grid, base_loss=base, normalization=how, directions=dirs)
