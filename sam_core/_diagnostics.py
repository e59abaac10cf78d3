r"""Sharpness diagnostics, written once for every backend.

The backends (``sam_torch.diagnostics``, ``sam_jax.diagnostics``) supply three things: a
Hessian-vector product, a loss (and gradient) at a perturbed point, and their
:class:`~sam_core.ArrayListOps` adapter; the algorithms below do the rest. The sharpness
ascent works on lists of arrays (one per trainable parameter) on the device through the
adapter; the Krylov methods (Lanczos, power iteration, Hutchinson) on flat NumPy vectors on
the host (see the note above :func:`lanczos`). Scalars that steer an algorithm (Lanczos
coefficients, losses) are read on the host as Python floats: these are measurement loops, not
a training step's hot path.

* :func:`lanczos`: the top (or bottom) :math:`k` eigenvalues of the Hessian by the Lanczos
  iteration with full reorthogonalization, restarted on breakdown so that a repeated
  eigenvalue is found as often as it occurs.
* :func:`power_iteration`: the eigenvalues of largest magnitude one at a time, each on the
  Hessian deflated of those already found, as PyHessian (Yao et al., 2020) does.
* :func:`hutchinson`: Hutchinson's (1989) estimator :math:`\operatorname{tr} H \approx
  \frac1P \sum_i z_i^\top H z_i` with Rademacher probes and its standard error.
* :func:`worst_case_sharpness` / :func:`average_sharpness`: the worst-case and average
  (adaptive) sharpness of Andriushchenko et al. (ICML 2023, "A Modern Look at the
  Relationship between Sharpness and Generalization"),

  .. math::

      S_{\max} = \max_{\lVert T_w^{-1}\delta\rVert_2 \le \rho} L(w + \delta) - L(w), \qquad
      S_{\mathrm{avg}} = \mathbb{E}_{\lVert T_w^{-1}\delta\rVert_2 = \rho} L(w + \delta) - L(w),

  with :math:`T_w = 1` (the SAM ball) or :math:`T_w = |w| + \eta` (the adaptive ball), the
  maximum found by projected gradient ascent. m-sharpness averages them over chunks of
  :math:`m` examples (the backends split the data).
* :func:`filter_normalize`: the filter normalization of Li et al. (NeurIPS 2018, "Visualizing
  the Loss Landscape of Neural Nets") that makes a random direction comparable across
  networks whose weights differ in scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np

from sam_core._ops import ArrayListOps

__all__ = [
    "Landscape",
    "SharpnessEstimate",
    "TraceEstimate",
    "average_sharpness",
    "check_choice",
    "default_tolerance",
    "filter_normalize",
    "flat",
    "gaussian_vector",
    "hutchinson",
    "lanczos",
    "landscape_axes",
    "power_iteration",
    "progress_bar",
    "rademacher_vector",
    "unit_sphere_vector",
    "worst_case_sharpness",
]

A = TypeVar("A")

#: The eigenvalue orders :func:`lanczos` can return.
Which = Literal["largest", "smallest", "magnitude"]


# ---------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------


class TraceEstimate(float):
    """Hutchinson's estimate of :math:`\\operatorname{tr} H`: a ``float`` with its spread.

    Attributes:
        std_error: the standard error of the mean, :math:`s / \\sqrt{P}` (``nan`` for one probe).
        samples: the :math:`P` values :math:`z_i^\\top H z_i`, a float64 array.
    """

    std_error: float
    samples: np.ndarray

    def __new__(cls, samples: Sequence[float]) -> TraceEstimate:
        values = np.asarray(samples, dtype=np.float64)
        self = super().__new__(cls, float(np.mean(values)))
        p = values.size
        self.std_error = float(np.std(values, ddof=1) / math.sqrt(p)) if p > 1 else math.nan
        self.samples = values
        return self

    @property
    def num_probes(self) -> int:
        return int(self.samples.size)

    def __repr__(self) -> str:
        return f"TraceEstimate({float(self)!r}, std_error={self.std_error!r}, probes={self.num_probes})"


class SharpnessEstimate(float):
    """A sharpness value :math:`L(w + \\delta) - L(w)` averaged over chunks: a ``float`` with detail.

    Attributes:
        per_chunk: the value of each chunk (one entry when ``m`` is ``None``), float64.
        weights: each chunk's number of examples (the average is weighted by it).
        loss: the (weighted) mean clean loss :math:`L(w)` over the chunks.
        kind: ``"worst"`` or ``"average"``.
    """

    per_chunk: np.ndarray
    weights: np.ndarray
    loss: float
    kind: str

    def __new__(
        cls, per_chunk: Sequence[float], weights: Sequence[float], losses: Sequence[float], kind: str
    ) -> SharpnessEstimate:
        values = np.asarray(per_chunk, dtype=np.float64)
        w = np.asarray(weights, dtype=np.float64)
        self = super().__new__(cls, float(np.sum(values * w) / np.sum(w)))
        self.per_chunk = values
        self.weights = w
        self.loss = float(np.sum(np.asarray(losses, dtype=np.float64) * w) / np.sum(w))
        self.kind = kind
        return self

    def __repr__(self) -> str:
        return (
            f"SharpnessEstimate({float(self)!r}, kind={self.kind!r}, chunks={self.per_chunk.size}, "
            f"loss={self.loss!r})"
        )


@dataclass
class Landscape:
    """Loss values on a 1-D line or a 2-D plane through the weights.

    ``loss[i]`` (1-D) or ``loss[i, j]`` (2-D) is :math:`L(w + a_i d_1 [+ b_j d_2])`.

    Attributes:
        coords: the step coefficients, one float64 array per direction.
        loss: the losses, shape ``(steps,)`` or ``(steps, steps)``, float64.
        base_loss: :math:`L(w)`.
        normalization: how the random directions were normalized (``"filter"``, ``"layer"``,
            ``"none"``) or ``"given"`` for directions passed by the caller.
        directions: the directions used, in the backend's layout (lists of arrays).
    """

    coords: tuple[np.ndarray, ...]
    loss: np.ndarray
    base_loss: float
    normalization: str = "filter"
    directions: list[Any] = field(default_factory=list, repr=False)

    @property
    def dims(self) -> int:
        return len(self.coords)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: coordinates, losses, base loss (the directions are left out)."""
        return {
            "dims": self.dims,
            "coords": [c.tolist() for c in self.coords],
            "loss": self.loss.tolist(),
            "base_loss": self.base_loss,
            "normalization": self.normalization,
        }


# ---------------------------------------------------------------------------------------
# Random vectors (NumPy, float64, so that both backends draw the same numbers from a seed)
# ---------------------------------------------------------------------------------------


def rademacher_vector(shapes: Sequence[tuple[int, ...]], rng: np.random.Generator) -> list[np.ndarray]:
    """One Rademacher probe: independent :math:`\\pm 1` entries, one array per shape."""
    return [rng.integers(0, 2, size=s).astype(np.float64) * 2.0 - 1.0 for s in shapes]


def gaussian_vector(shapes: Sequence[tuple[int, ...]], rng: np.random.Generator) -> list[np.ndarray]:
    """Standard normal entries, one array per shape."""
    return [rng.standard_normal(size=s) for s in shapes]


def unit_sphere_vector(shapes: Sequence[tuple[int, ...]], rng: np.random.Generator) -> list[np.ndarray]:
    """A direction drawn uniformly on the unit sphere of the concatenated shapes."""
    g = gaussian_vector(shapes, rng)
    norm = math.sqrt(sum(float(np.sum(x * x)) for x in g))
    return [x / norm for x in g]


def default_tolerance(dtype_name: str) -> float:
    """Relative residual at which :func:`lanczos` stops: near the dtype's rounding floor."""
    if "float64" in dtype_name or "double" in dtype_name:
        return 1e-10
    if "float32" in dtype_name or "float" == dtype_name:
        return 1e-5
    return 1e-2


# ---------------------------------------------------------------------------------------
# Eigenvalues (Krylov methods on flat host vectors)
# ---------------------------------------------------------------------------------------
#
# Lanczos keeps a basis of up to ``max_iter`` vectors and reorthogonalizes against all of
# them each iteration. Written against the list-of-arrays protocol that is one kernel launch
# per basis vector and parameter tensor (seconds per iteration in eager JAX); on one flat
# host array per vector it is two matrix-vector products against the basis matrix. The
# backends flatten each Hessian-vector product to a NumPy vector (one device-to-host copy,
# small beside the product itself), so both backends run the same host arithmetic.

MatVec = Callable[[np.ndarray], np.ndarray]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _project_out(w: np.ndarray, basis: np.ndarray) -> np.ndarray:
    # Classical Gram-Schmidt, twice ("twice is enough", Giraud et al., 2005): orthogonal to
    # working precision, so no spurious copies of converged eigenvalues appear.
    if basis.shape[0] == 0:
        return w
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def _select(theta: np.ndarray, k: int, which: Which) -> np.ndarray:
    if which == "largest":
        order = np.argsort(-theta, kind="stable")
    elif which == "smallest":
        order = np.argsort(theta, kind="stable")
    elif which == "magnitude":
        order = np.argsort(-np.abs(theta), kind="stable")
    else:
        raise ValueError(f"which must be 'largest', 'smallest' or 'magnitude', got {which!r}")
    return order[:k]


def lanczos(
    hvp: MatVec,
    start: np.ndarray,
    *,
    k: int = 1,
    max_iter: int = 100,
    tol: float = 1e-10,
    which: Which = "largest",
    restart: Callable[[], np.ndarray] | None = None,
    return_vectors: bool = False,
    progress: Any = None,
) -> tuple[np.ndarray, np.ndarray | None, int]:
    r"""``k`` extreme eigenvalues of a symmetric operator by Lanczos with full reorthogonalization.

    From :math:`q_1 = v / \lVert v \rVert`, each iteration computes :math:`H q_j`, removes its
    components along the whole basis :math:`q_1..q_j` (twice) and appends the normalized
    remainder, building the tridiagonal :math:`T_j = Q_j^\top H Q_j`. Its eigenvalues (the
    Ritz values, from ``numpy.linalg.eigh``) converge to the extreme eigenvalues of :math:`H`;
    the iteration stops when the ``k`` wanted ones have residuals
    :math:`\lVert H y_i - \theta_i y_i\rVert = \beta_j |s_{j,i}| \le \text{tol}\cdot\max|\theta|`
    (a bound on their error), after ``max_iter`` products, or when the basis spans the space
    (the values are then exact up to rounding). On breakdown (:math:`\beta_j \approx 0`, an
    invariant subspace) the iteration continues from ``restart()`` projected off the basis:
    that is how an eigenvalue repeated outside the first Krylov space is found again.

    Args:
        hvp: ``v -> H v`` on flat vectors (1-D NumPy arrays of the parameters' length).
        start: the start vector (any nonzero vector; normalized here).

    Memory: the basis, ``max_iter`` vectors of the start's dtype.

    Returns:
        ``(eigenvalues, ritz_vectors, products)``: the ``k`` values ordered by ``which``
        (float64), their unit Ritz vectors as the rows of an array when ``return_vectors``
        (else ``None``), and the number of Hessian-vector products made.
    """
    _select(np.zeros(1), 1, which)  # validates ``which``
    start = np.asarray(start).reshape(-1)
    dim = start.size
    max_iter = min(max_iter, dim)
    basis = np.empty((max_iter, dim), dtype=np.result_type(start.dtype, np.float32))
    basis[0] = _unit(start)
    size = 1
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples basis[j] and basis[j + 1]
    scale = 0.0
    while True:
        q = basis[size - 1]
        w = np.asarray(hvp(q), dtype=basis.dtype).reshape(-1)
        if progress is not None:
            progress.update(1)
        alpha = float(q @ w)
        alphas.append(alpha)
        w = _project_out(w, basis[:size])
        beta = float(np.linalg.norm(w))
        t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        theta, s = np.linalg.eigh(t)
        scale = max(scale, float(np.max(np.abs(theta))))
        wanted = _select(theta, min(k, theta.size), which)
        if size >= max_iter or not math.isfinite(beta):
            break
        if beta <= 1e-12 * max(scale, 1e-300):
            if restart is None:
                break
            fresh = np.asarray(restart(), dtype=basis.dtype).reshape(-1)
            w = _project_out(fresh, basis[:size])
            if np.linalg.norm(w) <= 1e-8 * np.linalg.norm(fresh):
                break
            betas.append(0.0)
        else:
            residuals = np.abs(beta * s[-1, wanted])
            if theta.size >= k and bool(np.all(residuals <= tol * max(scale, 1e-300))):
                break
            betas.append(beta)
        basis[size] = _unit(w)
        size += 1
    values = theta[wanted].astype(np.float64)
    vectors = (s[:, wanted].T @ basis[:size]) if return_vectors else None
    return values, vectors, len(alphas)


def power_iteration(
    hvp: MatVec,
    start: Callable[[], np.ndarray],
    *,
    k: int = 1,
    max_iter: int = 100,
    tol: float = 1e-10,
    return_vectors: bool = False,
    progress: Any = None,
) -> tuple[np.ndarray, np.ndarray | None, int]:
    r"""The ``k`` eigenvalues of largest magnitude by power iteration with deflation.

    Eigenvalue :math:`i` is the power iteration :math:`v \leftarrow P H v / \lVert\cdot\rVert`
    with :math:`P = I - \sum_{j<i} u_j u_j^\top` the projection off the eigenvectors already
    found, stopped when the Rayleigh quotient :math:`\lambda = v^\top H v` changes by less than
    ``tol`` relative or after ``max_iter`` products: PyHessian's algorithm. It converges at the
    rate :math:`|\lambda_{i+1} / \lambda_i|` per product, slower than :func:`lanczos`.

    Returns ``(eigenvalues, vectors as rows or None, products)``, in the order found.
    """
    values: list[float] = []
    found: list[np.ndarray] = []
    products = 0
    for _ in range(k):
        u = np.asarray(found) if found else np.zeros((0, 0))
        v = _unit(_project_out(np.asarray(start()).reshape(-1), u))
        eigenvalue = math.nan
        for _ in range(max_iter):
            w = _project_out(np.asarray(hvp(v)).reshape(-1), u)
            products += 1
            if progress is not None:
                progress.update(1)
            new = float(v @ w)
            norm = float(np.linalg.norm(w))
            done = not math.isnan(eigenvalue) and abs(new - eigenvalue) <= tol * max(abs(new), 1e-300)
            eigenvalue = new
            if norm == 0.0 or done:
                break
            v = w / norm
        values.append(eigenvalue)
        found.append(v)
    vectors = np.asarray(found) if return_vectors else None
    return np.asarray(values, dtype=np.float64), vectors, products


# ---------------------------------------------------------------------------------------
# Trace
# ---------------------------------------------------------------------------------------


def hutchinson(hvp: MatVec, probes: Iterable[np.ndarray], *, progress: Any = None) -> TraceEstimate:
    r"""Hutchinson's trace estimator over the given probes (flat vectors).

    .. math::

        \operatorname{tr} H \approx \frac1P \sum_{i=1}^{P} z_i^\top H z_i,
        \qquad \mathrm{SE} = \frac{s}{\sqrt P},

    unbiased for probes with :math:`\mathbb{E}[z z^\top] = I`; Rademacher probes
    (:func:`rademacher_vector`) have the smallest variance among them,
    :math:`2 \sum_{i \ne j} H_{ij}^2` per probe (Hutchinson, 1989). ``s`` is the sample
    standard deviation of the :math:`P` values. One Hessian-vector product per probe.
    """
    samples = []
    for z in probes:
        z = np.asarray(z).reshape(-1)
        samples.append(float(np.dot(z.astype(np.float64), np.asarray(hvp(z), dtype=np.float64).reshape(-1))))
        if progress is not None:
            progress.update(1)
    if not samples:
        raise ValueError("hutchinson needs at least one probe, got none")
    return TraceEstimate(samples)


def flat(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate arrays into one float64 vector (C order), the layout of the Krylov methods."""
    return np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays])

# ---------------------------------------------------------------------------------------
# Sharpness
# ---------------------------------------------------------------------------------------


def _norm(ops: ArrayListOps[A, Any], xs: Sequence[A]) -> float:
    return math.sqrt(max(float(ops.sum_of_squares(xs)), 0.0))


def _to_delta(ops: ArrayListOps[A, Any], u: list[A], transform: list[A] | None) -> list[A]:
    return list(u) if transform is None else ops.mul(transform, u)


def worst_case_sharpness(
    ops: ArrayListOps[A, Any],
    value_and_grad: Callable[[list[A]], tuple[float, list[A]]],
    start: list[A],
    *,
    rho: float,
    transform: list[A] | None = None,
    base: tuple[float, list[A]] | None = None,
    steps: int = 100,
    tol: float = 1e-10,
    progress: Any = None,
) -> tuple[float, float, list[A]]:
    r"""The worst case of :math:`L(w + \delta) - L(w)` over the ball :math:`\lVert T^{-1}\delta\rVert \le \rho`.

    Works in the ball's own coordinates :math:`u = T^{-1}\delta` (:math:`\lVert u \rVert \le
    \rho`, :math:`\nabla_u L = T \nabla L(w + T u)`) by projected, normalized gradient ascent:

    .. math::

        u \leftarrow \Pi_\rho\Big(u + \eta\,\frac{T g}{\lVert T g\rVert}\Big),
        \qquad \Pi_\rho(x) = x \min\Big(1, \frac{\rho}{\lVert x \rVert}\Big),

    starting from the SAM/ASAM perturbation :math:`u_0 = \rho\, T g_0 / \lVert T g_0\rVert`
    (the first-order maximizer), or from ``start`` (a random point of the sphere) where the
    gradient at :math:`w` is zero. The step :math:`\eta` starts at :math:`\rho` and adapts:
    a step that raises the loss is kept and the next one is twice as long (up to
    :math:`10^4 \rho`, where the update is the power iteration
    :math:`u \leftarrow \rho\, T g / \lVert T g \rVert` that converges to the top
    eigenvector on a quadratic), one that does not is undone and halved. The ascent is
    monotone, stops after ``steps`` accepted or rejected steps or when a step gains less
    than ``tol`` relative, and returns the best value found.

    Args:
        value_and_grad: ``delta -> (L(w + delta), grad L(w + delta))``, the loss a float.
        start: a point of norm :math:`\rho` in ``u`` coordinates used when :math:`g_0 = 0`.
        transform: :math:`T` (``None``: the SAM ball, :math:`T = 1`).
        base: ``(L(w), grad L(w))`` when already known.

    Returns:
        ``(sharpness, clean_loss, delta)``.

    Cost: one gradient per step (plus one at :math:`w`).
    """
    if base is None:
        zero = ops.scale(start, 0.0)
        base = value_and_grad(zero)
    base_loss, g0 = base
    tg = _to_delta(ops, g0, transform)
    tg_norm = _norm(ops, tg)
    if tg_norm > 0.0 and math.isfinite(tg_norm):
        u = ops.scale(tg, rho / tg_norm)
    else:
        u = list(start)
    loss, grad = value_and_grad(_to_delta(ops, u, transform))
    if progress is not None:
        progress.update(1)
    best = loss
    eta = rho
    for _ in range(steps):
        direction = _to_delta(ops, grad, transform)
        d_norm = _norm(ops, direction)
        if d_norm == 0.0 or not math.isfinite(d_norm):
            break
        candidate = ops.add_scaled(u, direction, eta / d_norm)
        c_norm = _norm(ops, candidate)
        if c_norm > rho:
            candidate = ops.scale(candidate, rho / c_norm)
        new_loss, new_grad = value_and_grad(_to_delta(ops, candidate, transform))
        if progress is not None:
            progress.update(1)
        if new_loss > best:
            gain = new_loss - best
            u, grad, best = candidate, new_grad, new_loss
            eta = min(2.0 * eta, 1e4 * rho)
            if gain <= tol * max(abs(best - base_loss), 1e-300):
                break
        else:
            eta *= 0.5
            if eta < 1e-8 * rho:
                break
    return best - base_loss, base_loss, _to_delta(ops, u, transform)


def average_sharpness(
    ops: ArrayListOps[A, Any],
    loss: Callable[[list[A]], float],
    directions: Iterable[list[A]],
    *,
    rho: float,
    transform: list[A] | None = None,
    base_loss: float | None = None,
    zero: list[A] | None = None,
    progress: Any = None,
) -> tuple[float, float]:
    r"""Average sharpness :math:`\frac1N\sum_i L(w + \rho\,T u_i) - L(w)` over unit directions.

    ``directions`` are unit vectors :math:`u_i` (:func:`unit_sphere_vector`, uniform on the
    sphere), so every perturbation lies on the ball's boundary; the expectation over the
    sphere is the average sharpness of Andriushchenko et al. up to the Monte-Carlo error.

    Returns ``(sharpness, clean_loss)``. Cost: one loss evaluation per direction.
    """
    if base_loss is None:
        if zero is None:
            raise ValueError("average_sharpness needs base_loss or a zero vector")
        base_loss = loss(zero)
    values = []
    for u in directions:
        values.append(loss(_to_delta(ops, ops.scale(u, rho), transform)) - base_loss)
        if progress is not None:
            progress.update(1)
    if not values:
        raise ValueError("average_sharpness needs at least one direction (samples >= 1)")
    return float(np.mean(values)), base_loss


# ---------------------------------------------------------------------------------------
# Landscapes
# ---------------------------------------------------------------------------------------


def filter_normalize(
    direction: Sequence[np.ndarray],
    weights: Sequence[np.ndarray],
    *,
    filter_axis: int = 0,
    normalization: Literal["filter", "layer", "none"] = "filter",
    ignore_1d: bool = True,
) -> list[np.ndarray]:
    r"""Li et al.'s normalization of a direction :math:`d` against the weights :math:`w`.

    ``"filter"``: each filter :math:`d_{i}` (a slice along ``filter_axis``: the output channel,
    axis 0 in torch's layouts, the last axis in Flax's) is rescaled to the norm of the same
    filter of the weights, :math:`d_i \leftarrow d_i \lVert w_i \rVert / \lVert d_i \rVert`.
    ``"layer"``: the same per array. ``"none"``: unchanged. With ``ignore_1d`` the 1-D
    arrays (biases, normalization scales) get a zero direction, as in Li et al.'s plots.
    Float64 NumPy in and out.
    """
    out = []
    for d, w in zip(direction, weights, strict=True):
        d = np.asarray(d, dtype=np.float64)
        w = np.asarray(w, dtype=np.float64)
        if d.shape != w.shape:
            raise ValueError(f"direction of shape {d.shape} does not match the weight of shape {w.shape}")
        if d.ndim <= 1 and ignore_1d:
            out.append(np.zeros_like(d))
        elif normalization == "none":
            out.append(d.copy())
        elif normalization == "layer" or d.ndim <= 1:
            out.append(d * (np.linalg.norm(w) / max(np.linalg.norm(d), 1e-300)))
        elif normalization == "filter":
            axes = tuple(a for a in range(d.ndim) if a != filter_axis % d.ndim)
            wn = np.sqrt(np.sum(w * w, axis=axes, keepdims=True))
            dn = np.sqrt(np.sum(d * d, axis=axes, keepdims=True))
            out.append(d * (wn / np.maximum(dn, 1e-300)))
        else:
            raise ValueError(f"normalization must be 'filter', 'layer' or 'none', got {normalization!r}")
    return out


def landscape_axes(dims: int, steps: int, span: float | tuple[float, float]) -> tuple[np.ndarray, ...]:
    """The coefficient grid of a landscape: ``steps`` points over ``span`` per direction.

    ``span`` a number :math:`s` means :math:`[-s, s]`; a pair ``(lo, hi)`` is used as given.
    """
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
        raise ValueError(f"steps must be an int >= 2, got {steps!r}")
    if isinstance(span, (tuple, list)):
        if len(span) != 2:
            raise ValueError(f"span must be a number or a (lo, hi) pair, got {span!r}")
        lo, hi = (float(x) for x in span)
    else:
        hi = float(span)
        lo = -hi
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"span must give a finite interval lo < hi, got {span!r}")
    axis = np.linspace(lo, hi, int(steps))
    return tuple(axis.copy() for _ in range(dims))


# ---------------------------------------------------------------------------------------
# Progress bars
# ---------------------------------------------------------------------------------------


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int | None, desc: str) -> Any:
    """A ``tqdm`` bar when ``enabled`` and tqdm is installed, else an object that does nothing."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the [examples]/[dev] extras
        import warnings

        warnings.warn("progress=True needs tqdm (pip install tqdm); running without a bar", stacklevel=3)
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=False)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
