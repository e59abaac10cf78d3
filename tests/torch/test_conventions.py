"""torch.optim conventions: named parameters, mixed dtypes in a group, maximize,
add_param_group, two-step logging, stalls of skipped steps, construction errors."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import sam_torch
from sam_torch import SAM

VARIANTS = {
    "SAM": (SAM, {}),
    "GSAM": (sam_torch.GSAM, {}),
    "WSAM": (sam_torch.WSAM, {}),
    "FriendlySAM": (sam_torch.FriendlySAM, {}),
    "VaSSO": (sam_torch.VaSSO, {}),
    "LookSAM": (sam_torch.LookSAM, {"k": 2}),
    "EveryKSAM": (sam_torch.EveryKSAM, {"k": 2}),
    "MomentumSAM": (sam_torch.MomentumSAM, {}),
}


def make_model(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)


def make_data(n: int, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g, dtype=dtype), torch.randn(8, 2, generator=g, dtype=dtype)) for _ in range(n)]


def mse(model, x, y):
    return ((model(x) - y) ** 2).mean()


def run(model, opt, data, sign: float = 1.0):
    for x, y in data:

        def closure(x=x, y=y):
            loss = sign * mse(model, x, y)
            loss.backward()
            return loss

        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def assert_close64(a, b):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-15)


# -- named parameters ----------------------------------------------------------------------
def test_named_parameters_and_named_groups_are_accepted():
    data = make_data(3)
    a, b = make_model(), make_model()
    plain = run(a, SAM(a.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9), data)
    opt = SAM(b.named_parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    assert opt.param_groups[0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert_close64(run(b, opt, data), plain)
    assert opt.state_dict()["param_groups"][0]["param_names"][0] == "0.weight"
    # named param groups, one with its own rho; add_param_group with names
    c = make_model()
    named = list(c.named_parameters())
    opt = SAM([{"params": named[:2], "rho": 0.1}], torch.optim.SGD, lr=0.1)
    opt.add_param_group({"params": named[2:]})
    assert opt.param_groups[1]["param_names"] == ["2.weight", "2.bias"]
    assert opt.param_groups[0]["rho"] == 0.1 and opt.param_groups[1]["rho"] == 0.05
    run(c, opt, data)
    with pytest.raises(ValueError, match=r"mixes \(name, parameter\) pairs with plain parameters"):
        SAM([named[0], named[1][1]], torch.optim.SGD, lr=0.1)


# -- mixed dtypes and devices in a group -----------------------------------------------------
@pytest.mark.parametrize("impl", ["foreach", "per_tensor"])
def test_mixed_dtypes_in_one_group_equal_one_group_per_dtype(impl):
    torch.manual_seed(3)
    values = [torch.randn(5, 3), torch.randn(3, dtype=torch.float64), torch.randn(4), torch.randn(2, dtype=torch.float64)]
    grads = [torch.randn_like(v) for v in values]

    def perturbed(groups_of):
        ps = [nn.Parameter(v.clone()) for v in values]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        opt = SAM(groups_of(ps), torch.optim.SGD, lr=0.1, rho=0.3, adaptive=True, perturb_impl=impl)
        opt.first_step()
        return [p.detach().clone() for p in ps], opt.grad_norm

    mixed, n1 = perturbed(lambda ps: ps)
    split, n2 = perturbed(lambda ps: [{"params": [ps[0], ps[2]]}, {"params": [ps[1], ps[3]]}])
    for x, y in zip(mixed, split, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=0)
    torch.testing.assert_close(n1.double(), n2.double(), rtol=1e-6, atol=0)


def test_bfloat16_linear_beside_float32_layernorm():
    # The common mixed group: a global norm accumulated in float32, each tensor stepped in
    # its own dtype; checked against float64 NumPy from the same (rounded) values.
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 5).to(torch.bfloat16), nn.LayerNorm(5))
    x = torch.randn(7, 6, dtype=torch.bfloat16)
    model(x).float().square().mean().backward()
    params = list(model.parameters())
    w = [p.detach().double().numpy() for p in params]
    g = [p.grad.double().numpy() for p in params]
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.2)
    opt.first_step()
    norm = np.sqrt(sum(float((gi**2).sum()) for gi in g))
    for p, wi, gi in zip(params, w, g, strict=True):
        expected = wi + 0.2 * gi / (norm + 1e-12)
        tol = 1e-2 if p.dtype == torch.bfloat16 else 1e-6
        np.testing.assert_allclose(p.detach().double().numpy(), expected, rtol=tol, atol=tol * 1e-2)
    assert opt.grad_norm.dtype == torch.float32
    np.testing.assert_allclose(float(opt.grad_norm), norm, rtol=1e-6)
    model(x).float().square().mean().backward()
    opt.second_step()
    assert params[0].dtype == torch.bfloat16 and params[2].dtype == torch.float32


# -- maximize ---------------------------------------------------------------------------------
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.Adam])
def test_maximize_ascends_on_minus_the_loss(base, adaptive):
    # maximize=True on L is SAM minimizing -L: the perturbation is along -g.
    data = make_data(3)
    a, b = make_model(), make_model()
    kw = dict(lr=0.05, rho=0.1, adaptive=adaptive)
    maximized = run(a, SAM(a.parameters(), base, maximize=True, **kw), data, sign=1.0)
    minimized = run(b, SAM(b.parameters(), base, **kw), data, sign=-1.0)
    assert_close64(maximized, minimized)


# -- add_param_group after construction -------------------------------------------------------
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_add_param_group_after_construction_with_rho_scheduler(name):
    cls, kw = VARIANTS[name]
    model = make_model()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    if name == "MomentumSAM":
        kw = dict(kw, momentum=0.9)
    opt = cls(first, torch.optim.SGD, lr=0.1, **kw)
    rho_sched = sam_torch.ProportionalRhoScheduler(opt, rho_max=0.1, rho_min=0.01)
    run(model, opt, make_data(2))
    opt.add_param_group({"params": second, "lr": 0.05})
    w_before = [p.detach().clone() for p in second]
    # the new group's lr_max is its lr (or "initial_lr") when the scheduler first sees it
    assert rho_sched.step() == [0.1, 0.1]
    for g in opt.param_groups:
        g["lr"] *= 0.5
    assert rho_sched.step() == [pytest.approx(0.055), pytest.approx(0.055)]
    run(model, opt, make_data(3, seed=2))
    assert all(not torch.equal(p, q) for p, q in zip(second, w_before, strict=True))


# -- two-step API logging ----------------------------------------------------------------------
def test_two_step_api_takes_the_losses_for_logging():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = make_data(1)[0]
    loss = mse(model, x, y)
    loss.backward()
    opt.first_step(zero_grad=True, loss=loss)
    perturbed = mse(model, x, y)
    perturbed.backward()
    opt.second_step(True, loss=perturbed)  # zero_grad stays positional
    assert opt.loss == loss.detach() and not opt.loss.requires_grad
    assert opt.perturbed_loss == perturbed.detach()
    torch.testing.assert_close(opt.sharpness, perturbed.detach() - loss.detach())
    assert opt.sharpness > 0
    # without losses they are None, as before
    mse(model, x, y).backward()
    opt.first_step(zero_grad=True)
    mse(model, x, y).backward()
    opt.second_step(zero_grad=True)
    assert opt.loss is None and opt.sharpness is None


# -- no silent stall ---------------------------------------------------------------------------
def _nan_closure(model, x, y):
    def closure():
        loss = mse(model, x, y) * float("nan")
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("name", ["SAM", "LookSAM", "MomentumSAM"])
def test_hundred_consecutive_nonfinite_steps_warn_once(name):
    cls, kw = VARIANTS[name]
    model = make_model()
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **kw)
    x, y = make_data(1)[0]
    run(model, opt, [(x, y)])  # one good step (momentum exists, LookSAM has its g_v)
    w0 = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(100):
            opt.step(_nan_closure(model, x, y))
    stalls = [w for w in caught if "consecutive steps" in str(w.message)]
    assert len(stalls) == 1
    assert issubclass(stalls[0].category, RuntimeWarning)
    assert "skip_nonfinite='clean'" in str(stalls[0].message)
    assert "max_consecutive_skips" in str(stalls[0].message)
    assert opt.consecutive_skips == 100 and opt.step_skipped
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w0, strict=True))
    run(model, opt, [(x, y)])
    assert opt.consecutive_skips == 0


def test_max_consecutive_skips_raises_with_the_weights_kept():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, max_consecutive_skips=5)
    x, y = make_data(1)[0]
    w0 = [p.detach().clone() for p in model.parameters()]
    for _ in range(5):
        opt.step(_nan_closure(model, x, y))
    with pytest.raises(RuntimeError, match=r"6 consecutive SAM steps were skipped .* max_consecutive_skips=5"):
        opt.step(_nan_closure(model, x, y))
    assert not opt.is_perturbed
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w0, strict=True))
    # the two-step API counts too (a NaN only at w + e)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, max_consecutive_skips=1)
    for i in range(2):
        mse(model, x, y).backward()
        opt.first_step(zero_grad=True)
        (mse(model, x, y) * float("nan")).backward()
        if i == 0:
            opt.second_step(zero_grad=True)
        else:
            with pytest.raises(RuntimeError, match="2 consecutive SAM steps"):
                opt.second_step(zero_grad=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w0, strict=True))
    with pytest.raises(ValueError, match="max_consecutive_skips must be an int >= 1, got 0"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, max_consecutive_skips=0)


# -- construction errors -----------------------------------------------------------------------
def test_base_optimizer_sharing_a_group_key_says_there_is_no_workaround():
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="base_optimizer Adadelta takes 'rho'") as info:
        SAM([p], torch.optim.Adadelta, lr=1.0)
    message = str(info.value)
    assert "functools.partial" not in message and "wrap it" not in message
    assert "Use another base optimizer" in message


@pytest.mark.parametrize("name", ["MomentumSAM", "GSAM", "LookSAM"])
def test_variants_accept_a_mixed_dtype_group(name):
    cls, kw = VARIANTS[name]
    torch.manual_seed(5)
    net32 = nn.Linear(4, 3)
    net64 = nn.Linear(3, 2).double()

    def build(groups_of):
        a, b = copy.deepcopy(net32), copy.deepcopy(net64)
        ps = list(a.parameters()) + list(b.parameters())
        opt = cls(groups_of(ps), torch.optim.SGD, lr=0.1, momentum=0.9, **kw)
        for x, y in make_data(4, seed=6):
            def closure(x=x, y=y):
                loss = ((b(a(x.float()).double()) - y) ** 2).mean()
                loss.backward()
                return loss

            opt.step(closure)
        return [p.detach().double() for p in ps]

    mixed = build(lambda ps: ps)
    split = build(lambda ps: [{"params": ps[:2]}, {"params": ps[2:]}])
    for x, y in zip(mixed, split, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
