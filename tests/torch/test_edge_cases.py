"""Branches of ``sam_torch.SAM`` the larger tests did not reach (found by the coverage report):
boundary errors, steps with no gradient at all, empty groups, new gradient tensors after
``model.zero_grad()``."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from sam_torch import SAM


def _params():
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(3, 2, dtype=torch.float64)), nn.Parameter(torch.randn(2, dtype=torch.float64))]


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match=re.escape("model must be a torch.nn.Module (its batch-norm layers")):
        SAM(_params(), torch.optim.SGD, lr=0.1, model=[nn.Linear(2, 2)])


def test_a_group_eps_with_a_base_optimizer_that_takes_none_is_refused():
    a, b = _params()
    opt = SAM([a], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=re.escape("param group 1 sets 'eps', which belongs to the base optimizer")):
        opt.add_param_group({"params": [b], "eps": 1e-8})
    opt.add_param_group({"params": [b], "sam_eps": 1e-8})  # SAM's own key
    assert opt.param_groups[1]["sam_eps"] == 1e-8


def test_steps_without_any_gradient_change_nothing():
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = SAM([{"params": params[:1]}, {"params": []}, {"params": params[1:]}], torch.optim.SGD, lr=0.1)
    opt.first_step()  # no parameter has a gradient
    assert opt.grad_norm is None and opt.is_perturbed
    opt.second_step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_a_group_without_gradients_beside_one_with():
    a, b = _params()
    opt = SAM([{"params": [a]}, {"params": [b]}], torch.optim.SGD, lr=0.1, rho=0.5)
    a.grad = torch.ones_like(a)
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt.first_step()
    assert float(opt.grad_norm) == pytest.approx(6**0.5, rel=1e-15)
    assert torch.equal(b, b0) and not torch.equal(a, a0)
    opt.second_step()  # restores a, then SGD with the gradient it holds (still ones)
    assert torch.equal(b, b0)  # no gradient: not perturbed, not stepped
    assert torch.equal(a.detach(), a0 - 0.1)


def test_new_gradient_tensors_after_model_zero_grad_are_the_clean_pass():
    """``model.zero_grad()`` (not SAM's) then ``backward()``: new tensors, the clean pass."""
    torch.manual_seed(1)
    model = nn.Linear(3, 2).double()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x = torch.randn(4, 3, dtype=torch.float64)
    calls = []

    def closure():
        calls.append(1)
        loss = model(x).square().mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert len(calls) == 2
    model.zero_grad()  # set_to_none: SAM's record of the gradients is now stale
    model(x).square().mean().backward()
    opt.step(closure)
    assert len(calls) == 3  # once, at w + e
