r"""Sharpness diagnostics for JAX: Hessian spectrum and trace, sharpness, loss landscapes.

Every function takes ``(loss_fn, params, data, ...)``:

* ``loss_fn(params, batch)`` returns the batch's **mean** loss (a scalar); it is traced
  under ``jax.jit``, so it must be a pure function of its arguments.
* ``params``: a pytree of any structure. Its floating-point leaves are the parameters
  measured (integer leaves are held fixed); "vectors" given by the caller (probes,
  directions) are pytrees of the same structure, or sequences with one array per
  floating-point leaf in ``jax.tree.leaves(params)`` order.
* ``data``: one batch, or an iterable of batches (a list; an iterator is read once and
  kept). A batch is an array, a dict, or a tuple/list whose items are arrays; anything
  else iterable is a sequence of batches (wrap one nested batch as ``[batch]``). Over
  several batches the loss is the example-weighted mean of the batches' mean losses,
  :math:`L = \sum_b n_b L_b / \sum_b n_b` (:math:`n_b`: the leading dimension of the batch's
  first array), so every measure is exact for the whole data set.

Hessian-vector products are forward-over-reverse. Over one batch (a batch, or a one-element
list) the gradient is linearized once per call, ``jax.linearize(jax.grad(f), w)``, and each
product applies the linear map (the forward and backward pass are not recomputed; their
residuals are held until the call returns); over several batches each product is
``jax.jvp(jax.grad(f), (w,), (v,))`` per batch. All are jitted once per batch shape; the
outer loops (Lanczos, Hutchinson, the ascent of worst-case sharpness) run on the host and
read a few scalars per iteration. ``params`` is never modified.

Models with state:

* Flax linen with BatchNorm: close over the state and evaluate with the running statistics
  (the default of the torch twin)::

      def loss_fn(params, batch):
          x, y = batch
          logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
          return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

      sam_jax.diagnostics.hessian_eigenvalues(loss_fn, variables["params"], (x, y), k=5)

  (with batch statistics instead: ``train=True, mutable=["batch_stats"]`` and return the
  loss only).
* Flax nnx: split once, ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``, and
  write ``loss_fn(params, batch)`` around ``nnx.merge(graphdef, params, rest)`` (with
  ``model.eval()`` applied first for BatchNorm's running statistics).

The math is :mod:`sam_core`'s; ``sam_torch.diagnostics`` computes the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from sam_core import _diagnostics as core
from sam_core._diagnostics import Landscape, SharpnessEstimate, TraceEstimate
from sam_core._plots import plot_landscape, plot_spectrum
from sam_core._validation import check_nonnegative, check_positive_int

from ._ops import JaxOps

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


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def _is_batch(data: Any) -> bool:
    if _is_array(data) or isinstance(data, Mapping):
        return True
    if isinstance(data, (tuple, list)):
        return len(data) > 0 and all(_is_array(x) for x in data)
    return False


def _batches(data: Any) -> Sequence[Any] | Iterable[Any]:
    if _is_batch(data):
        return (data,)
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a batch (an array, a tuple/list of arrays or a dict) or an iterable "
            f"of batches, got {type(data).__name__}"
        )
    if isinstance(data, Iterator):
        data = list(data)
    return data


def _batch_size(batch: Any) -> int:
    leaves = [x for x in jax.tree.leaves(batch) if hasattr(x, "shape")]
    if not leaves:
        raise TypeError(f"a batch must contain an array (its leading dimension is the batch size), got {type(batch).__name__}")
    shape = leaves[0].shape
    return int(shape[0]) if len(shape) else 1


def _slice(batch: Any, start: int, stop: int) -> Any:
    return jax.tree.map(lambda x: x[start:stop] if getattr(x, "ndim", 0) else x, batch)


def _chunks(data: Any, m: int | None) -> Iterator[tuple[Any, int]]:
    batches = _batches(data)
    if m is None:
        yield batches, 1
        return
    for batch in batches:
        n = _batch_size(batch)
        for start in range(0, n, m):
            stop = min(start + m, n)
            yield (_slice(batch, start, stop),), stop - start


# ---------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------
#
# Module-level jitted functions with ``loss_fn`` and the tree structure static: calls with the
# same ``loss_fn`` (several measures of one model, one after the other) reuse the compiled
# programs instead of compiling per call.


def _loss_of(point: list[Any], leaves: list[Any], batch: Any, *, loss_fn: Any, treedef: Any,
             index: tuple[int, ...]) -> Any:
    full = list(leaves)
    for i, x in zip(index, point, strict=True):
        full[i] = x
    return loss_fn(jax.tree.unflatten(treedef, full), batch)


_STATIC = ("loss_fn", "treedef", "index")
_loss_jit = jax.jit(_loss_of, static_argnames=_STATIC)
_value_and_grad_jit = jax.jit(jax.value_and_grad(_loss_of), static_argnames=_STATIC)


@partial(jax.jit, static_argnames=_STATIC)
def _hvp_jit(point: list[Any], v: list[Any], leaves: list[Any], batch: Any, **static: Any) -> Any:
    return jax.jvp(lambda p: jax.grad(_loss_of)(p, leaves, batch, **static), (point,), (v,))[1]


@partial(jax.jit, static_argnames=_STATIC)
def _linearize_jit(point: list[Any], leaves: list[Any], batch: Any, **static: Any) -> Any:
    """The gradient's linearization at ``point``: a ``Partial`` whose arrays are the residuals."""
    return jax.linearize(lambda p: jax.grad(_loss_of)(p, leaves, batch, **static), point)[1]


@jax.jit
def _apply_linear(linear: Any, v: list[Any]) -> Any:
    # ``linear``'s function is static (the same object for every linearization the cached
    # ``_linearize_jit`` returns), its residuals are traced arguments: compiled once.
    return linear(v)


class _Objective:
    """The full-pass loss over the floating-point leaves of ``params``, jitted per batch shape."""

    def __init__(self, loss_fn: Callable[..., Any], params: Any) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        leaves, self.treedef = jax.tree.flatten(params)
        self.leaves = [jnp.asarray(x) for x in leaves]
        self.index = [i for i, x in enumerate(self.leaves) if jnp.issubdtype(x.dtype, jnp.inexact)]
        if not self.index:
            raise ValueError(
                "params has no floating-point leaves: there is no Hessian or sharpness to measure"
            )
        self.params = [self.leaves[i] for i in self.index]
        dtypes = {x.dtype for x in self.params}
        if len(dtypes) > 1:
            raise ValueError(
                f"the floating-point leaves of params must share one dtype, got {sorted(map(str, dtypes))}; "
                "cast them (e.g. jax.tree.map(lambda x: x.astype(jnp.float32), params))"
            )
        self.dtype = next(iter(dtypes))
        self.shapes = [tuple(x.shape) for x in self.params]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.dim = sum(self.sizes)
        self.ops = JaxOps()
        self.loss_fn = loss_fn

        self._static = {"loss_fn": loss_fn, "treedef": self.treedef, "index": tuple(self.index)}
        self._checked = False

    def _loss(self, point: list[Any], batch: Any) -> Any:
        return _loss_jit(point, self.leaves, batch, **self._static)

    def _value_and_grad(self, point: list[Any], batch: Any) -> Any:
        return _value_and_grad_jit(point, self.leaves, batch, **self._static)

    def _hvp(self, point: list[Any], v: list[Any], batch: Any) -> Any:
        return _hvp_jit(point, v, self.leaves, batch, **self._static)

    def _linearize(self, point: list[Any], batch: Any) -> Any:
        return _linearize_jit(point, self.leaves, batch, **self._static)

    # -- conversions ------------------------------------------------------------------
    def arrays(self, xs: Sequence[Any]) -> list[Any]:
        return [jnp.asarray(np.asarray(x), dtype=self.dtype) for x in xs]

    def vector(self, given: Any, what: str) -> list[Any]:
        if jax.tree.structure(given) == self.treedef:
            leaves = jax.tree.leaves(given)
            given = [leaves[i] for i in self.index]
        given = list(given)
        if len(given) != len(self.params):
            raise ValueError(
                f"{what} must be a pytree like params or hold one array per floating-point leaf "
                f"({len(self.params)}), got {len(given)} entries"
            )
        out = []
        for i, (g, p) in enumerate(zip(given, self.params, strict=True)):
            g = jnp.asarray(g, dtype=self.dtype)
            if g.shape != p.shape:
                raise ValueError(f"{what}: leaf {i} has shape {g.shape}, expected {p.shape}")
            out.append(g)
        return out

    # Lanczos, power iteration and Hutchinson run on flat NumPy vectors (see sam_core).
    def host_dtype(self) -> np.dtype:
        return np.dtype(np.float64) if self.dtype == jnp.float64 else np.dtype(np.float32)

    def split(self, v: np.ndarray) -> list[Any]:
        parts = np.split(np.asarray(v), np.cumsum(self.sizes)[:-1])
        return [jnp.asarray(x.reshape(s), dtype=self.dtype) for x, s in zip(parts, self.shapes, strict=True)]

    def to_host(self, xs: Sequence[Any]) -> np.ndarray:
        return np.concatenate([np.asarray(x).reshape(-1) for x in xs]).astype(self.host_dtype(), copy=False)

    def flat_hvp(self, batches: Iterable[Any]) -> Callable[[np.ndarray], np.ndarray]:
        product = self.hvp_operator(batches)
        return lambda v: self.to_host(product(self.split(v)))

    def hvp_operator(self, batches: Iterable[Any]) -> Callable[[list[Any]], Any]:
        """``v -> H v`` at ``params`` over ``batches``, for many products in a row.

        Over one batch (a batch, or a one-element tuple/list) the gradient is linearized once
        (``jax.linearize``: the forward and backward pass and their residuals) and each product
        applies the linear map (about two gradients instead of three), holding the residuals
        until the operator is dropped. Over several batches each product is a fresh
        ``jvp(grad)`` per batch (:meth:`hvp`).
        """
        if not (isinstance(batches, (tuple, list)) and len(batches) == 1):
            return lambda v: self.hvp(v, batches)
        (batch,) = batches
        self._check(batch)
        linear = self._linearize(self.params, batch)
        return lambda v: _apply_linear(linear, list(v))

    # -- evaluations ------------------------------------------------------------------
    def _check(self, batch: Any) -> None:
        """Validate ``loss_fn``'s output on the first batch (abstractly: nothing is computed)."""
        if self._checked:
            return
        loss = jax.eval_shape(self.loss_fn, jax.tree.unflatten(self.treedef, self.leaves), batch)
        shape = getattr(loss, "shape", None)
        if shape is None:
            raise TypeError(f"loss_fn must return a scalar array, got {type(loss).__name__}")
        if tuple(shape) != ():
            raise ValueError(
                f"loss_fn must return a scalar loss, the batch's mean; got shape {tuple(shape)} "
                "(reduce it, e.g. with .mean())"
            )
        self._checked = True

    def validate(self, batches: Iterable[Any]) -> None:
        """Check ``loss_fn`` on the first batch, abstractly (nothing is compiled or computed)."""
        for batch in batches:
            _batch_size(batch)
            self._check(batch)
            return
        raise ValueError("data holds no batches")

    def point(self, delta: Sequence[Any] | None) -> list[Any]:
        if delta is None:
            return list(self.params)
        return [p + d for p, d in zip(self.params, delta, strict=True)]

    def loss(self, delta: Sequence[Any] | None, batches: Iterable[Any]) -> float:
        point = self.point(delta)
        total, count = 0.0, 0
        for batch in batches:
            n = _batch_size(batch)
            self._check(batch)
            total += n * float(self._loss(point, batch))
            count += n
        if count == 0:
            raise ValueError("data holds no batches")
        return total / count

    def value_and_grad(self, delta: Sequence[Any] | None, batches: Iterable[Any]) -> tuple[float, list[Any]]:
        point = self.point(delta)
        total, count = 0.0, 0
        grad: list[Any] | None = None
        for batch in batches:
            n = _batch_size(batch)
            self._check(batch)
            value, g = self._value_and_grad(point, batch)
            total += n * float(value)
            grad = [x * n for x in g] if grad is None else self.ops.add_scaled(grad, g, float(n))
            count += n
        if count == 0 or grad is None:
            raise ValueError("data holds no batches")
        return total / count, self.ops.scale(grad, 1.0 / count)

    def hvp(self, v: list[Any], batches: Iterable[Any]) -> list[Any]:
        total: list[Any] | None = None
        count = 0
        for batch in batches:
            n = _batch_size(batch)
            self._check(batch)
            hv = self._hvp(self.params, v, batch)
            total = [x * n for x in hv] if total is None else self.ops.add_scaled(total, hv, float(n))
            count += n
        if count == 0 or total is None:
            raise ValueError("data holds no batches")
        return self.ops.scale(total, 1.0 / count)


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------


def hessian_eigenvalues(
    loss_fn: Callable[..., Any],
    params: Any,
    data: Any,
    k: int = 1,
    *,
    method: Literal["lanczos", "power"] = "lanczos",
    which: core.Which = "largest",
    max_iter: int = 100,
    tol: float | None = None,
    seed: int | np.random.Generator = 0,
    return_eigenvectors: bool = False,
    progress: bool = False,
) -> np.ndarray | tuple[np.ndarray, list[Any]]:
    r"""The top ``k`` eigenvalues of the Hessian :math:`\nabla^2 L(w)` of the loss over ``data``.

    The same algorithm and options as :func:`sam_torch.diagnostics.hessian_eigenvalues`:
    Lanczos with full reorthogonalization (default; ``which`` ``"largest"``, ``"smallest"``
    or ``"magnitude"``) or power iteration with deflation (``method="power"``), from a
    Gaussian start drawn with NumPy from ``seed``, to relative residual ``tol`` (1e-10 in
    float64, 1e-5 in float32) or ``max_iter`` Hessian-vector products.

    Returns:
        A float64 NumPy array of shape ``(k,)``; with ``return_eigenvectors``,
        ``(eigenvalues, vectors)`` with each eigenvector a pytree like ``params`` (zero on
        integer leaves).
    """
    check_positive_int("k", k)
    check_positive_int("max_iter", max_iter)
    core.check_choice("method", method, ("lanczos", "power"))
    obj = _Objective(loss_fn, params)
    if k > obj.dim:
        raise ValueError(f"k must be at most the number of parameters ({obj.dim}), got {k}")
    tol = core.default_tolerance(str(obj.dtype)) if tol is None else tol
    check_nonnegative("tol", tol)
    rng = _rng(seed)
    batches = _batches(data)
    obj.validate(batches)
    matvec = obj.flat_hvp(batches)

    def random_start() -> np.ndarray:
        return core.flat(core.gaussian_vector(obj.shapes, rng)).astype(obj.host_dtype())

    bar = core.progress_bar(progress, max_iter if method == "lanczos" else k * max_iter, "Hessian eigenvalues")
    try:
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
        return values, [_as_tree(obj, obj.split(v)) for v in vectors]
    return values


def _as_tree(obj: _Objective, xs: Sequence[Any]) -> Any:
    full = [jnp.zeros_like(x) for x in obj.leaves]
    for i, x in zip(obj.index, xs, strict=True):
        full[i] = x
    return jax.tree.unflatten(obj.treedef, full)


def hessian_trace(
    loss_fn: Callable[..., Any],
    params: Any,
    data: Any,
    probes: int | Sequence[Any] = 100,
    *,
    seed: int | np.random.Generator = 0,
    progress: bool = False,
) -> TraceEstimate:
    r"""Hutchinson's estimate of :math:`\operatorname{tr}\nabla^2 L(w)` with Rademacher probes.

    ``probes``: a number of probes drawn with NumPy from ``seed`` (leaf by leaf in
    ``jax.tree.leaves(params)`` order: the same numbers as the torch twin for parameters of
    the same shapes in the same order), or the probes themselves, each a pytree like
    ``params`` or a sequence with one array per floating-point leaf.

    Returns:
        A :class:`TraceEstimate` (a ``float`` with ``.std_error`` and ``.samples``). Cost: one
        Hessian-vector product over ``data`` per probe.
    """
    obj = _Objective(loss_fn, params)
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
    obj.validate(batches)
    bar = core.progress_bar(progress, count, "Hessian trace")
    try:
        return core.hutchinson(obj.flat_hvp(batches), vectors, progress=bar)
    finally:
        bar.close()


def sharpness(
    loss_fn: Callable[..., Any],
    params: Any,
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
    progress: bool = False,
) -> SharpnessEstimate:
    r"""Worst-case or average (adaptive) m-sharpness (Andriushchenko et al., ICML 2023).

    The definition, options and algorithm of :func:`sam_torch.diagnostics.sharpness`:
    :math:`\max` (``kind="worst"``, projected gradient ascent, at most ``steps`` gradients per
    chunk) or mean over the sphere (``kind="average"``, ``samples`` losses per chunk) of
    :math:`L_c(w + \delta) - L_c(w)` with :math:`\lVert T_w^{-1}\delta\rVert_2 \le \rho`,
    :math:`T_w = 1` or (``adaptive``) :math:`|w| + \eta`, averaged over chunks of ``m``
    examples weighted by their size (the whole data as one chunk when ``m`` is ``None``).

    Returns:
        A :class:`SharpnessEstimate` (a ``float`` with ``.per_chunk``, ``.weights``, ``.loss``).
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
    obj = _Objective(loss_fn, params)
    rng = _rng(seed)
    transform = [jnp.abs(p) + jnp.asarray(eta, p.dtype) for p in obj.params] if adaptive else None
    values, weights, losses = [], [], []
    bar = core.progress_bar(progress, None, f"{kind}-case sharpness" if kind == "worst" else "average sharpness")
    try:
        for batches, n in _chunks(data, m):
            if kind == "worst":
                start = obj.arrays([rho * x for x in core.unit_sphere_vector(obj.shapes, rng)])
                value, loss, _ = core.worst_case_sharpness(
                    obj.ops, lambda d, b=batches: obj.value_and_grad(d, b), start, rho=float(rho),
                    transform=transform, base=obj.value_and_grad(None, batches), steps=steps,
                    progress=bar,
                )
            else:
                directions = (obj.arrays(core.unit_sphere_vector(obj.shapes, rng)) for _ in range(samples))
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
    loss_fn: Callable[..., Any],
    params: Any,
    data: Any,
    *,
    dims: Literal[1, 2] = 1,
    steps: int = 21,
    span: float | tuple[float, float] = 1.0,
    directions: Sequence[Any] | None = None,
    normalization: Literal["filter", "layer", "none"] = "filter",
    ignore_1d: bool = True,
    filter_axis: int = -1,
    seed: int | np.random.Generator = 0,
    progress: bool = False,
) -> Landscape:
    r"""The loss on a line or plane through ``params`` (Li et al., NeurIPS 2018).

    The definition and options of :func:`sam_torch.diagnostics.loss_landscape`. Filter
    normalization slices each random direction along ``filter_axis``: the output features,
    the **last** axis of Flax's ``Dense`` (in, out) and ``Conv`` (H, W, in, out) kernels
    (torch's layouts have them first). ``directions``: ``dims`` pytrees like ``params`` (or
    sequences of arrays per floating-point leaf), used as given.

    Returns:
        A :class:`Landscape` (``coords``, ``loss``, ``base_loss``); cost ``steps ** dims``
        loss evaluations over ``data``.
    """
    if dims not in (1, 2) or isinstance(dims, bool):
        raise ValueError(f"dims must be 1 or 2, got {dims!r}")
    coords = core.landscape_axes(dims, steps, span)
    obj = _Objective(loss_fn, params)
    if directions is None:
        rng = _rng(seed)
        weights = [np.asarray(p, dtype=np.float64) for p in obj.params]
        dirs = [
            obj.arrays(core.filter_normalize(
                core.gaussian_vector(obj.shapes, rng), weights, filter_axis=filter_axis,
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
    base = obj.loss(None, batches)
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
