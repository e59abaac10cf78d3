"""``SAM(perturb_impl="compiled")``: sam_core's formulas fused by torch.compile.

Each test compiles once for its parameter set (a few seconds on CPU), so the set is kept small.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sam_torch
from sam_torch import _compiled
from tests import reference as ref
from tests.torch.test_sam import assert_close_rel, make_mlp, run_torch


@pytest.mark.parametrize("api", ["closure", "two_step"])
def test_compiled_asam_with_a_plain_group_matches_float64_reference(api):
    # weights: ASAM (compiled kernels); biases: plain SAM (eager), one global norm
    p0, batches = ref.init_mlp(seed=21), ref.make_batches(5, seed=22)
    per_param = [(0.5, True, 0.02), (0.1, False, 0.0), (0.5, True, 0.02), (0.1, False, 0.0)]
    expected = ref.sam_trajectory(
        p0, batches, ref.SGDRef(lr=0.05, momentum=0.9), rho=None, groups=per_param
    )
    model = make_mlp(p0)
    opt = sam_torch.SAM(
        [
            {
                "params": [model[0].weight, model[2].weight],
                "rho": 0.5,
                "adaptive": True,
                "eta": 0.02,
            },
            {"params": [model[0].bias, model[2].bias], "rho": 0.1},
        ],
        torch.optim.SGD,
        lr=0.05,
        momentum=0.9,
        perturb_impl="compiled",
    )
    assert_close_rel(run_torch(model, opt, batches, api), expected, 1e-12)
    assert opt._compiled not in (None, False)  # the compiled kernels ran, no fallback


def test_compiled_float32_perturbation_equals_eager_to_rounding_and_restores_exactly():
    torch.manual_seed(23)
    shapes = [(64, 32), (32,), (16, 8, 3, 3)]
    params = {
        impl: [torch.nn.Parameter(torch.randn(s)) for s in shapes] for impl in ("auto", "compiled")
    }
    for p_a, p_c in zip(params["auto"], params["compiled"], strict=True):
        p_c.data.copy_(p_a.data)
        g = torch.randn_like(p_a) * 1e-2
        p_a.grad, p_c.grad = g.clone(), g.clone()
    opts = {
        impl: sam_torch.SAM(ps, torch.optim.SGD, lr=0.1, rho=0.5, adaptive=True, perturb_impl=impl)
        for impl, ps in params.items()
    }
    w0 = [p.detach().clone() for p in params["compiled"]]
    for opt in opts.values():
        opt.first_step()
    for a, c in zip(params["auto"], params["compiled"], strict=True):
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(c, w) for c, w in zip(params["compiled"], w0, strict=True))
    torch.testing.assert_close(
        opts["compiled"].grad_norm, opts["auto"].grad_norm, rtol=1e-6, atol=0
    )
    opts["compiled"].restore()
    for c, w in zip(params["compiled"], w0, strict=True):
        assert torch.equal(c, w)


def test_compiled_nonfinite_gradient_skips_the_step():
    p0, batches = ref.init_mlp(seed=24), ref.make_batches(1, seed=25)
    model = make_mlp(p0)
    opt = sam_torch.SAM(
        model.parameters(),
        torch.optim.SGD,
        lr=0.1,
        momentum=0.9,
        adaptive=True,
        perturb_impl="compiled",
    )
    x, t = (torch.from_numpy(a) for a in batches[0])
    w0 = [p.detach().clone() for p in model.parameters()]
    (((model(x) - t) ** 2).mean() * float("nan")).backward()
    opt.first_step(zero_grad=True)
    ((model(x) - t) ** 2).mean().backward()
    opt.second_step(zero_grad=True)
    assert opt.step_skipped
    for p, w in zip(model.parameters(), w0, strict=True):
        assert torch.equal(p.detach(), w)


class _FakeCompileError(Exception):
    pass


_FakeCompileError.__module__ = "torch._inductor.exc"  # how SAM recognizes a compiler failure


def test_compile_failure_warns_once_and_falls_back_to_the_eager_kernels(monkeypatch):
    def broken(self, *args, **kwargs):
        raise _FakeCompileError("C++ compiler not found")

    monkeypatch.setattr(_compiled.CompiledPerturbation, "sq_norm", broken)
    p0, batches = ref.init_mlp(seed=26), ref.make_batches(3, seed=27)
    expected = ref.sam_trajectory(
        p0, batches, ref.SGDRef(lr=0.1, momentum=0.9), rho=0.5, adaptive=True, eta=0.01
    )
    model = make_mlp(p0)
    opt = sam_torch.SAM(
        model.parameters(),
        torch.optim.SGD,
        lr=0.1,
        momentum=0.9,
        rho=0.5,
        adaptive=True,
        perturb_impl="compiled",
    )
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*C\\+\\+ compiler not found"):
        got = run_torch(model, opt, batches, "two_step")
    assert_close_rel(got, expected, 1e-12)
    assert opt._compiled is False


def test_errors_that_are_not_compiler_failures_propagate_and_restore(monkeypatch):
    def oom(self, *args, **kwargs):
        raise RuntimeError("out of memory")

    model = make_mlp(ref.init_mlp(seed=28))
    opt = sam_torch.SAM(
        model.parameters(), torch.optim.SGD, lr=0.1, adaptive=True, perturb_impl="compiled"
    )
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    w0 = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setattr(_compiled.CompiledPerturbation, "perturb_into", oom)
    with pytest.raises(RuntimeError, match="out of memory"):
        opt.first_step()
    for p, w in zip(model.parameters(), w0, strict=True):
        assert torch.equal(p.detach(), w)
    assert not opt.is_perturbed
    assert np.isfinite(float(opt.grad_norm))
