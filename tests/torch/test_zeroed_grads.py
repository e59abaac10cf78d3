"""``step(closure)`` after gradients were zeroed in place is a full SAM step, not an SGD step.

``model.zero_grad(set_to_none=False)`` leaves all-zero gradient tensors that SAM saw at the
end of the last step, written in place: the same signature as a backward pass accumulating
into them (the popular wrapper's loop with in-place zeroing). SAM tells the two apart by the
values: all exactly zero means no backward ran, and the closure is called at ``w`` too.
Checked against the float64 NumPy SAM reference, for SAM and for a variant whose first step
updates its own state (it must see the real clean gradient only, once).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sam_torch
import sam_torch._sam
from tests import reference as ref
from tests.torch.test_sam import assert_close_rel, make_mlp

STEPS = 4


def _closure(model, x, t, calls):
    def closure():
        calls.append(1)
        loss = ((model(x) - t) ** 2).mean()
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("zero_grad", ["model", "optimizer"])
@pytest.mark.parametrize("accelerator_policy", [False, True], ids=["cpu", "deferred-sync"])
def test_grads_zeroed_in_place_before_step_closure_give_sam(adaptive, zero_grad, accelerator_policy, monkeypatch):
    if accelerator_policy:  # the device-side flags and foreach kernels used off the CPU
        monkeypatch.setattr(sam_torch._sam, "_sync_is_cheap", lambda device: False)
    p0, batches = ref.init_mlp(seed=11), ref.make_batches(STEPS, seed=12)
    expected = ref.sam_trajectory(
        p0, batches, ref.SGDRef(lr=0.1, momentum=0.9), rho=0.3, adaptive=adaptive, eta=0.01
    )
    model = make_mlp(p0)
    sam = sam_torch.SAM(
        model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.3, adaptive=adaptive,
        perturb_impl="foreach" if accelerator_policy else "auto",
    )
    norms, calls = [], []
    for x_np, t_np in batches:
        x, t = torch.from_numpy(x_np), torch.from_numpy(t_np)
        if zero_grad == "model":
            model.zero_grad(set_to_none=False)
        else:
            sam.zero_grad(set_to_none=False)
        before = len(calls)
        loss = sam.step(_closure(model, x, t, calls))
        assert len(calls) - before == 2  # at w and at w + e
        assert loss is not None and sam.loss is not None
        norms.append(float(sam.grad_norm))
    assert all(n > 0 for n in norms), norms
    params = [p.detach().numpy() for p in model.parameters()]
    assert_close_rel(params, expected, 1e-12)
    # the reference's norms, step by step, are the ones SAM scaled by
    ws = [w.copy() for w in p0]
    base = ref.SGDRef(lr=0.1, momentum=0.9)
    for (x_np, t_np), norm in zip(batches, norms, strict=True):
        _, g = ref.mlp_loss_and_grad(ws, x_np, t_np)
        ts = [np.abs(w) + 0.01 if adaptive else np.ones_like(w) for w in ws]
        assert norm == pytest.approx(np.sqrt(sum(np.sum((a * b) ** 2) for a, b in zip(ts, g, strict=True))), rel=1e-12)
        e = ref.sam_perturbation(ws, g, 0.3, adaptive=adaptive, eta=0.01)
        _, g_adv = ref.mlp_loss_and_grad([w + d for w, d in zip(ws, e, strict=True)], x_np, t_np)
        ws = base.step(ws, g_adv)


def test_backward_into_gradients_kept_across_steps_is_still_the_clean_pass():
    """The wrapper's loop with in-place zeroing: the caller's backward is the clean pass
    (closure called once), exactly as with ``set_to_none=True``."""
    p0, batches = ref.init_mlp(seed=13), ref.make_batches(STEPS, seed=14)
    expected = ref.sam_trajectory(p0, batches, ref.SGDRef(lr=0.05), rho=0.2)
    model = make_mlp(p0)
    sam = sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=0.05, rho=0.2)
    calls = []
    for x_np, t_np in batches:
        x, t = torch.from_numpy(x_np), torch.from_numpy(t_np)
        ((model(x) - t) ** 2).mean().backward()
        before = len(calls)
        assert sam.step(_closure(model, x, t, calls)) is None  # the caller's pass was the clean one
        assert len(calls) - before == 1
        sam.zero_grad(set_to_none=False)
    assert_close_rel([p.detach().numpy() for p in model.parameters()], expected, 1e-12)



def test_a_variant_with_state_sees_the_clean_gradient_once():
    """FriendlySAM's first step updates its gradient EMA: zeros must never reach it."""
    p0, batches = ref.init_mlp(seed=17), ref.make_batches(STEPS, seed=18)

    def run(zero_in_place: bool):
        model = make_mlp(p0)
        opt = sam_torch.FriendlySAM(model.parameters(), torch.optim.SGD, lr=0.05, rho=0.2)
        for x_np, t_np in batches:
            x, t = torch.from_numpy(x_np), torch.from_numpy(t_np)
            if zero_in_place:
                model.zero_grad(set_to_none=False)
            opt.step(_closure(model, x, t, []))
        return [p.detach().numpy() for p in model.parameters()]

    for a, b in zip(run(True), run(False), strict=True):
        np.testing.assert_array_equal(a, b)  # the same computation, bit for bit
