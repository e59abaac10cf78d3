"""sam_torch.diagnostics against exact float64 references on small networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sam_torch
from tests.diagnostics import common

D = sam_torch.diagnostics  # the lazy submodule, reached from the package


@pytest.fixture(scope="module", params=["mlp", "conv"])
def problem(request):
    model, loss_fn, batch = common.torch_problem(request.param)
    exact = np.linalg.eigvalsh(common.torch_exact_hessian(model, loss_fn, batch))
    return model, loss_fn, batch, exact


@pytest.mark.parametrize("hvp", ["func", "double_backward"])
def test_top_eigenvalues_match_the_exact_hessian(problem, hvp):
    model, loss_fn, batch, exact = problem
    got = D.hessian_eigenvalues(model, loss_fn, batch, k=3, hvp=hvp)
    assert got.shape == (3,)
    assert common.rel(got, common.top(exact, 3)) < 1e-6


def test_smallest_and_magnitude_orders():
    model, loss_fn, batch = common.torch_problem("mlp")
    exact = np.linalg.eigvalsh(common.torch_exact_hessian(model, loss_fn, batch))
    got = D.hessian_eigenvalues(model, loss_fn, batch, k=2, which="smallest")
    assert common.rel(got, np.sort(exact)[:2]) < 1e-6
    got = D.hessian_eigenvalues(model, loss_fn, batch, k=1, which="magnitude")
    assert common.rel(np.abs(got), [np.max(np.abs(exact))]) < 1e-6


def test_power_iteration_finds_the_largest_magnitude():
    model, loss_fn, batch = common.torch_problem("mlp")
    exact = np.linalg.eigvalsh(common.torch_exact_hessian(model, loss_fn, batch))
    got, vectors = D.hessian_eigenvalues(
        model, loss_fn, batch, k=1, method="power", max_iter=500, tol=1e-12, return_eigenvectors=True
    )
    assert common.rel(np.abs(got), [np.max(np.abs(exact))]) < 1e-6
    assert len(vectors) == 1 and [v.shape for v in vectors[0]] == [p.shape for p in model.parameters()]


def test_eigenvectors_are_eigenvectors():
    model, loss_fn, batch = common.torch_problem("mlp")
    hessian = common.torch_exact_hessian(model, loss_fn, batch)
    values, vectors = D.hessian_eigenvalues(model, loss_fn, batch, k=2, return_eigenvectors=True)
    for value, vector in zip(values, vectors, strict=True):
        v = torch.cat([t.reshape(-1) for t in vector]).numpy()
        assert abs(np.linalg.norm(v) - 1) < 1e-10
        assert np.linalg.norm(hessian @ v - value * v) < 1e-6 * abs(value)


def test_a_full_pass_over_batches_weights_by_batch_size():
    """Batches of 5 and 7 give the Hessian of the mean loss over all 12 examples."""
    model, loss_fn, (x, y) = common.torch_problem("mlp")
    exact = np.linalg.eigvalsh(common.torch_exact_hessian(model, loss_fn, (x, y)))
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    got = D.hessian_eigenvalues(model, loss_fn, batches, k=2)
    assert common.rel(got, common.top(exact, 2)) < 1e-6
    got_iter = D.hessian_eigenvalues(model, loss_fn, iter(batches), k=2)
    assert common.rel(got_iter, got) < 1e-9
    trace = D.hessian_trace(model, loss_fn, batches, probes=4, seed=3)
    assert abs(trace - D.hessian_trace(model, loss_fn, (x, y), probes=4, seed=3)) < 1e-10


def test_a_criterion_works_as_loss_fn():
    model, loss_fn, batch = common.torch_problem("mlp")
    a = D.hessian_eigenvalues(model, loss_fn, batch, k=2)
    assert common.rel(D.hessian_eigenvalues(model, nn.CrossEntropyLoss(), batch, k=2), a) < 1e-9
    assert common.rel(D.hessian_eigenvalues(model, F.cross_entropy, batch, k=2), a) < 1e-9


def test_hutchinson_is_within_three_standard_errors_of_the_exact_trace():
    model, loss_fn, batch = common.torch_problem("mlp")
    exact = float(np.trace(common.torch_exact_hessian(model, loss_fn, batch)))
    estimate = D.hessian_trace(model, loss_fn, batch, probes=60, seed=0)
    assert estimate.num_probes == 60 and estimate.std_error > 0
    assert abs(estimate - exact) < 3 * estimate.std_error
    # Reproducible from the seed; explicit probes give exactly z^T H z each.
    again = D.hessian_trace(model, loss_fn, batch, probes=60, seed=0)
    assert float(again) == float(estimate)
    hessian = common.torch_exact_hessian(model, loss_fn, batch)
    rng = np.random.default_rng(1)
    probes = [[rng.choice([-1.0, 1.0], size=p.shape) for p in model.parameters()] for _ in range(3)]
    given = D.hessian_trace(model, loss_fn, batch, probes=probes)
    flat = [np.concatenate([a.reshape(-1) for a in z]) for z in probes]
    assert common.rel(given.samples, [z @ hessian @ z for z in flat]) < 1e-9


def test_hvp_methods_agree_on_the_trace():
    model, loss_fn, batch = common.torch_problem("conv")
    a = D.hessian_trace(model, loss_fn, batch, probes=3, hvp="func")
    b = D.hessian_trace(model, loss_fn, batch, probes=3, hvp="double_backward")
    assert common.rel(a.samples, b.samples) < 1e-10


@pytest.mark.parametrize("hvp", ["auto", "func", "double_backward"])
def test_every_hvp_path_gives_the_exact_hessian_products(hvp):
    """Over one batch (what the products reuse built once) and over two (rebuilt per product):
    each product is H v of the full pass's exact Hessian, product after product."""
    model, loss_fn, (x, y) = common.torch_problem("conv")
    hessian = common.torch_exact_hessian(model, loss_fn, (x, y))
    obj = D._Objective(model, loss_fn, hvp, "eval")
    rng = np.random.default_rng(0)
    with obj:
        for batches in ([(x, y)], [(x[:5], y[:5]), (x[5:], y[5:])]):
            product = obj.flat_hvp(batches)
            for _ in range(3):
                v = rng.standard_normal(obj.dim)
                assert common.rel(product(v), hessian @ v) < 1e-10


class Quadratic(nn.Module):
    r""":math:`L(w) = \tfrac12 (w - c)^\top H (w - c) + g^\top (w - c)` (the batch is ignored)."""

    def __init__(self, hessian, center, gradient, w):
        super().__init__()
        self.register_buffer("hessian", torch.tensor(hessian))
        self.register_buffer("center", torch.tensor(center))
        self.register_buffer("gradient", torch.tensor(gradient))
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, _):
        d = self.w - self.center
        return 0.5 * d @ self.hessian @ d + self.gradient @ d


def quadratic_loss(model, batch):
    return model(batch)


def _spd(n, seed, low=0.5, high=3.0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * rng.uniform(low, high, n)) @ q.T


@pytest.mark.parametrize("adaptive", [False, True])
def test_worst_case_at_a_stationary_point_is_the_closed_form(adaptive):
    n, rho, eta = 6, 0.1, 0.05
    hessian = _spd(n, 0)
    w = np.random.default_rng(1).uniform(0.5, 2.0, n) * np.array([1, -1, 1, -1, 1, 1])
    model = Quadratic(hessian, w, np.zeros(n), w)
    t = np.abs(w) + eta if adaptive else np.ones(n)
    expected = 0.5 * rho**2 * np.linalg.eigvalsh(t[:, None] * hessian * t[None, :])[-1]
    got = D.sharpness(model, quadratic_loss, torch.zeros(1), rho=rho, adaptive=adaptive, eta=eta)
    assert abs(got - expected) < 1e-4 * expected
    assert got <= expected * (1 + 1e-12)


def test_worst_case_bounds_on_a_convex_quadratic():
    n, rho = 6, 0.2
    hessian = _spd(n, 2)
    rng = np.random.default_rng(3)
    gradient = rng.standard_normal(n)
    model = Quadratic(hessian, np.zeros(n), gradient, np.zeros(n))
    worst = D.sharpness(model, quadratic_loss, torch.zeros(1), rho=rho)
    average = D.sharpness(model, quadratic_loss, torch.zeros(1), rho=rho, kind="average", samples=50)
    lam = np.linalg.eigvalsh(hessian)[-1]
    bound = rho * np.linalg.norm(gradient) + 0.5 * rho**2 * lam
    assert average <= worst <= bound * (1 + 1e-12)
    # The first-order value rho * |g| is beaten by the ascent (curvature helps on a convex loss).
    assert worst >= rho * np.linalg.norm(gradient)
    # Average over the sphere of a quadratic: rho^2 tr(H) / (2 n) (the linear term averages out).
    assert abs(average - rho**2 * np.trace(hessian) / (2 * n)) < 0.5 * rho * np.linalg.norm(gradient)


def test_m_sharpness_averages_the_chunks():
    model, loss_fn, (x, y) = common.torch_problem("mlp")
    whole = D.sharpness(model, loss_fn, (x, y), rho=0.05, m=12, steps=10)
    assert abs(whole - D.sharpness(model, loss_fn, (x, y), rho=0.05, steps=10)) < 1e-12
    chunks = D.sharpness(model, loss_fn, (x, y), rho=0.05, m=4, steps=10, adaptive=True)
    each = [D.sharpness(model, loss_fn, (x[i:i + 4], y[i:i + 4]), rho=0.05, steps=10, adaptive=True)
            for i in (0, 4, 8)]
    assert chunks.per_chunk.size == 3
    assert abs(chunks - np.mean(each)) < 1e-12
    assert np.all(chunks.per_chunk >= 0)
    # Uneven: chunks of 5, 5, 2 weighted by their size.
    uneven = D.sharpness(model, loss_fn, (x, y), rho=0.05, m=5, steps=5)
    assert list(uneven.weights) == [5, 5, 2]
    assert abs(uneven - np.average(uneven.per_chunk, weights=[5, 5, 2])) < 1e-15


def test_landscape_values_are_the_losses_along_the_directions():
    model, loss_fn, (x, y) = common.torch_problem("conv")
    land = D.loss_landscape(model, loss_fn, (x, y), dims=2, steps=3, span=0.5)
    assert land.loss.shape == (3, 3) and land.normalization == "filter"
    with torch.no_grad():
        base = float(loss_fn(model, (x, y)))
    assert abs(land.loss[1, 1] - base) < 1e-12 and abs(land.base_loss - base) < 1e-12
    d1, d2 = land.directions
    # Filter normalization: each output filter of a weight has the norm of the weight's filter.
    for w, d in zip(model.parameters(), d1, strict=True):
        if w.ndim > 1:
            wn = w.detach().flatten(1).norm(dim=1)
            assert torch.allclose(d.flatten(1).norm(dim=1), wn, rtol=1e-12)
        else:
            assert torch.count_nonzero(d) == 0
    with torch.no_grad():
        saved = [p.clone() for p in model.parameters()]
        for p, a, b in zip(model.parameters(), d1, d2, strict=True):
            p.add_(0.5 * a - 0.5 * b)
        expected = float(loss_fn(model, (x, y)))
        for p, s in zip(model.parameters(), saved, strict=True):
            p.copy_(s)
    assert abs(land.loss[2, 0] - expected) < 1e-12
    line = D.loss_landscape(model, loss_fn, (x, y), steps=5, span=(0.0, 1.0), directions=[d1])
    assert line.normalization == "given" and np.allclose(line.coords[0], [0, 0.25, 0.5, 0.75, 1])
    assert abs(line.loss[4] - D.loss_landscape(model, loss_fn, (x, y), dims=2, steps=3, span=1.0,
                                                directions=[d1, d2]).loss[2, 1]) < 1e-12


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.drop(torch.tanh(self.bn(self.fc(x)))))


def _bn_problem():
    torch.manual_seed(0)
    model = BNNet().double()
    x = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (10,))
    model.train()
    model(x)  # running statistics that differ from the batch's
    return model, x, y


CALLS = {
    "eigenvalues": lambda m, f, d: D.hessian_eigenvalues(m, f, d, k=2, max_iter=10),
    "power": lambda m, f, d: D.hessian_eigenvalues(m, f, d, k=1, method="power", max_iter=5),
    "trace": lambda m, f, d: D.hessian_trace(m, f, d, probes=2),
    "worst": lambda m, f, d: D.sharpness(m, f, d, rho=0.1, steps=3, adaptive=True),
    "average": lambda m, f, d: D.sharpness(m, f, d, rho=0.1, kind="average", samples=2, m=5),
    "landscape": lambda m, f, d: D.loss_landscape(m, f, d, dims=2, steps=3),
}


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_parameters_buffers_modes_and_grads_are_left_as_they_were(name, bn_mode):
    model, x, y = _bn_problem()
    model.head.weight.grad = torch.full_like(model.head.weight, 7.0)
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    model.train()
    model.drop.eval()
    modes = [m.training for m in model.modules()]
    CALLS[name](model, F.cross_entropy, (x, y))
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert [m.training for m in model.modules()] == modes
    assert model.bn.track_running_stats
    assert torch.equal(model.head.weight.grad, torch.full_like(model.head.weight, 7.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.weight")


def test_bn_mode_selects_the_statistics():
    model, x, y = _bn_problem()
    land_eval = D.loss_landscape(model, F.cross_entropy, (x, y), steps=3)
    land_train = D.loss_landscape(model, F.cross_entropy, (x, y), steps=3, bn_mode="train")
    with torch.no_grad():
        model.eval()
        eval_loss = float(F.cross_entropy(model(x), y))
        model.bn.train()  # batch statistics, dropout off
        before = model.bn.running_mean.clone()
        train_loss = float(F.cross_entropy(model(x), y))
        model.bn.running_mean.copy_(before)
    assert abs(land_eval.base_loss - eval_loss) < 1e-12
    assert abs(land_train.base_loss - train_loss) < 1e-12
    assert abs(eval_loss - train_loss) > 1e-3


def test_errors_name_the_problem():
    model, loss_fn, batch = common.torch_problem("mlp")
    frozen = common.torch_problem("mlp")[0].requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        D.hessian_eigenvalues(frozen, loss_fn, batch)
    with pytest.raises(ValueError, match="scalar"):
        D.hessian_trace(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), batch)
    with pytest.raises(ValueError, match="kind"):
        D.sharpness(model, loss_fn, batch, rho=0.1, kind="max")
    with pytest.raises(ValueError, match="rho"):
        D.sharpness(model, loss_fn, batch, rho=-1.0)
    with pytest.raises(ValueError, match="dims"):
        D.loss_landscape(model, loss_fn, batch, dims=3)
    with pytest.raises(ValueError, match="k must be"):
        D.hessian_eigenvalues(model, loss_fn, batch, k=10_000)
    with pytest.raises(ValueError, match="hvp"):
        D.hessian_eigenvalues(model, loss_fn, batch, hvp="fast")
    with pytest.raises(ValueError, match="one array per trainable parameter"):
        D.hessian_trace(model, loss_fn, batch, probes=[[np.ones(3)]])
    with pytest.raises(ValueError, match="directions must hold"):
        D.loss_landscape(model, loss_fn, batch, dims=2, directions=[list(model.parameters())])
    with pytest.raises(TypeError, match="data must be"):
        D.hessian_trace(model, loss_fn, 3.0)
    with pytest.raises(ValueError, match="m must be"):
        D.sharpness(model, loss_fn, batch, rho=0.1, m=0)


def test_progress_bar_and_plots(tmp_path):
    pytest.importorskip("tqdm")
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, loss_fn, batch = common.torch_problem("mlp")
    values = D.hessian_eigenvalues(model, loss_fn, batch, k=3, progress=True)
    line = D.loss_landscape(model, loss_fn, batch, steps=5, progress=True)
    plane = D.loss_landscape(model, loss_fn, batch, dims=2, steps=4)
    fig, axes = plt.subplots(1, 3)
    D.plot_landscape({"a": line, "b": line}, axes[0], relative=True)
    D.plot_landscape(plane, axes[1])
    D.plot_spectrum({"model": values}, axes[2])
    fig.savefig(tmp_path / "diagnostics.png")
    plt.close(fig)
    assert (tmp_path / "diagnostics.png").stat().st_size > 0
    with pytest.raises(ValueError, match="2-D"):
        D.plot_landscape({"a": plane, "b": plane})


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_hvp_methods_agree_with_batch_norm(bn_mode):
    model, x, y = _bn_problem()
    a = D.hessian_trace(model, F.cross_entropy, (x, y), probes=3, hvp="func", bn_mode=bn_mode)
    b = D.hessian_trace(model, F.cross_entropy, (x, y), probes=3, hvp="double_backward", bn_mode=bn_mode)
    assert np.max(np.abs(a.samples - b.samples)) < 1e-10 * max(1.0, np.max(np.abs(b.samples)))
