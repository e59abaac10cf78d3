"""float16/bfloat16: ``perturb_impl="foreach"`` equals ``"per_tensor"`` bit for bit.

The perturbed point is :math:`w + s\\,d` computed in float32 and rounded once to the
parameters' dtype (the reference below), not :math:`w + \\text{round}(s\\,d)`. On CPU the
foreach path is the one ``perturb_impl="foreach"`` (or ``TorchOps(foreach=True)``) forces;
it is the default on accelerators.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sam_torch
from sam_torch import TorchOps
from sam_torch._ops import SMALL_NUMEL

LOW = [torch.bfloat16, torch.float16]
# ~100k elements: large tensors (one kernel each on CPU) and small ones (batched), a 0-d one
SHAPES = [(256, 300), (SMALL_NUMEL + 7,), (40, 30), (17,), ()]


def _tensors(dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * scale).to(dtype) for s in SHAPES]


def _rounded_once(x, y, s):
    """``x + s * y`` in float32, one rounding to x's dtype (what per-tensor ``addcmul`` does)."""
    return (x.float() + y.float() * s).to(x.dtype)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_first_step_foreach_equals_per_tensor_and_rounds_once(dtype, adaptive):
    perturbed, norms = {}, {}
    for impl in ("foreach", "per_tensor"):
        params = [nn.Parameter(w) for w in _tensors(dtype, 0)]
        for p, g in zip(params, _tensors(dtype, 1, scale=1e-2), strict=True):
            p.grad = g
        opt = sam_torch.SAM(
            params, torch.optim.SGD, lr=0.1, rho=0.05 if not adaptive else 0.5,
            adaptive=adaptive, eta=0.01, perturb_impl=impl,
        )
        w = [p.detach().clone() for p in params]
        opt.first_step()
        perturbed[impl] = [p.detach().clone() for p in params]
        norms[impl] = opt.grad_norm
        opt.restore()
        assert all(torch.equal(p, w0) for p, w0 in zip(params, w, strict=True))
    assert torch.equal(norms["foreach"], norms["per_tensor"])
    differ = sum(
        int((a != b).sum()) for a, b in zip(perturbed["foreach"], perturbed["per_tensor"], strict=True)
    )
    assert differ == 0
    # The reference: d (g, or ASAM's T_w^2 g rounded op by op as the library builds it), the
    # float32 scale rho / (norm + eps), then w + scale * d in float32, rounded once.
    rho = 0.5 if adaptive else 0.05
    scale = rho / (norms["per_tensor"] + 1e-12)
    for w, g, got in zip(_tensors(dtype, 0), _tensors(dtype, 1, scale=1e-2),
                         perturbed["foreach"], strict=True):
        if adaptive:
            t = torch.abs(w).add_(0.01)
            d = t.mul_(t).mul_(g)
        else:
            d = g
        assert torch.equal(got, _rounded_once(w, d, scale))
    assert any(not torch.equal(p, w) for p, w in zip(perturbed["foreach"], _tensors(dtype, 0), strict=True))


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("where", ["new", "out", "in_place_x", "in_place_y"])
def test_torch_ops_scalar_products_round_once_on_both_paths(dtype, where):
    """``add_scaled`` / ``scale`` (the perturbation and the variants' combinations)."""
    results = {}
    for foreach in (True, False):
        ops = TorchOps(torch.device("cpu"), dtype, foreach=foreach)
        xs, ys = _tensors(dtype, 2), _tensors(dtype, 3, scale=1e-2)
        out = {
            "new": None, "out": [torch.empty_like(x) for x in xs], "in_place_x": xs, "in_place_y": ys
        }[where]
        s = torch.tensor(0.3712, dtype=torch.float32)
        got = [t.clone() for t in ops.add_scaled(xs, ys, s, out=out)]
        xs, ys = _tensors(dtype, 2), _tensors(dtype, 3, scale=1e-2)
        out = {
            "new": None, "out": [torch.empty_like(x) for x in xs], "in_place_x": xs, "in_place_y": ys
        }[where]
        scaled = [t.clone() for t in ops.scale(ys if where != "in_place_x" else xs, 1 / 3, out=out)]
        results[foreach] = got, scaled
        for x, y, r in zip(_tensors(dtype, 2), _tensors(dtype, 3, scale=1e-2), got, strict=True):
            assert r.dtype == dtype
            assert torch.equal(r, _rounded_once(x, y, s))
        src = _tensors(dtype, 2) if where == "in_place_x" else _tensors(dtype, 3, scale=1e-2)
        third = torch.tensor(1 / 3, dtype=torch.float32)
        for x, r in zip(src, scaled, strict=True):
            assert torch.equal(r, (x.float() * third).to(dtype))
    for a, b in zip(results[True][0] + results[True][1], results[False][0] + results[False][1],
                    strict=True):
        assert torch.equal(a, b)


def _mlp(dtype):
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.Tanh(), nn.Linear(128, 8)).to(dtype)


VARIANTS = {
    "SAM": lambda ps, m, **kw: sam_torch.SAM(ps, torch.optim.SGD, rho=0.05, **kw),
    "ASAM": lambda ps, m, **kw: sam_torch.SAM(ps, torch.optim.SGD, rho=0.5, adaptive=True, **kw),
    "ASAM-eta0": lambda ps, m, **kw: sam_torch.SAM(
        ps, torch.optim.SGD, rho=0.5, adaptive=True, eta=0.0, **kw
    ),
    "GSAM": lambda ps, m, **kw: sam_torch.GSAM(ps, torch.optim.SGD, alpha=0.3, **kw),
    "WSAM": lambda ps, m, **kw: sam_torch.WSAM(ps, torch.optim.SGD, gamma=0.9, **kw),
    "WSAM-coupled": lambda ps, m, **kw: sam_torch.WSAM(
        ps, torch.optim.SGD, gamma=0.9, decouple=False, **kw
    ),
    "SAMON": lambda ps, m, **kw: sam_torch.SAMON(ps, torch.optim.SGD, norm_params=m, **kw),
    "FriendlySAM": lambda ps, m, **kw: sam_torch.FriendlySAM(ps, torch.optim.SGD, **kw),
    "VaSSO": lambda ps, m, **kw: sam_torch.VaSSO(ps, torch.optim.SGD, theta=0.8, **kw),
    "LookSAM": lambda ps, m, **kw: sam_torch.LookSAM(ps, torch.optim.SGD, k=2, **kw),
    "MomentumSAM": lambda ps, m, **kw: sam_torch.MomentumSAM(ps, torch.optim.SGD, **kw),
}


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_training_steps_foreach_equal_per_tensor_bit_for_bit(dtype, name):
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(16, 64, generator=g).to(dtype), torch.randn(16, 8, generator=g).to(dtype))
               for _ in range(4)]
    final = {}
    for impl in ("foreach", "per_tensor"):
        model = _mlp(dtype)
        opt = VARIANTS[name](model.parameters(), model, lr=0.05, momentum=0.9, perturb_impl=impl)
        for x, y in batches:
            def closure(x=x, y=y, model=model):
                loss = (model(x) - y).float().square().mean()
                loss.backward()
                return loss

            opt.step(closure)
            assert not opt.step_skipped
        final[impl] = [p.detach().clone() for p in model.parameters()]
    start = [p.detach() for p in _mlp(dtype).parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(final["foreach"], start, strict=True))
    for a, b in zip(final["foreach"], final["per_tensor"], strict=True):
        assert torch.equal(a, b), int((a != b).sum())
