"""sam_torch.SAM: trajectories against the float64 reference, both APIs, paths, state, helpers."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import sam_torch
from tests import reference as ref

torch.use_deterministic_algorithms(True)


def make_mlp(params_np, dtype=torch.float64) -> nn.Module:
    w1, _, w2, _ = params_np
    model = nn.Sequential(nn.Linear(w1.shape[1], w1.shape[0]), nn.Tanh(), nn.Linear(w2.shape[1], w2.shape[0]))
    model = model.to(dtype)
    with torch.no_grad():
        for p, v in zip(model.parameters(), params_np, strict=True):
            p.copy_(torch.from_numpy(v))
    return model


def run_torch(model, opt, batches, api: str):
    for x_np, t_np in batches:
        x, t = torch.from_numpy(x_np), torch.from_numpy(t_np)

        def closure(x=x, t=t):
            opt.zero_grad()
            loss = ((model(x) - t) ** 2).mean()
            loss.backward()
            return loss

        if api == "closure":
            opt.step(closure)
        else:
            closure()
            opt.first_step(zero_grad=True)
            ((model(x) - t) ** 2).mean().backward()
            opt.second_step(zero_grad=True)
    return [p.detach().numpy().copy() for p in model.parameters()]


def assert_close_rel(actual, expected, rel):
    for a, e in zip(actual, expected, strict=True):
        scale = max(np.abs(e).max(), 1e-300)
        assert np.abs(a - e).max() / scale <= rel, (np.abs(a - e).max(), scale)


SAM_CONFIGS = [
    dict(rho=0.05, adaptive=False),
    dict(rho=0.5, adaptive=True, eta=0.01),
    dict(rho=2.0, adaptive=True, eta=0.0),
]


@pytest.mark.parametrize("api", ["closure", "two_step"])
@pytest.mark.parametrize("cfg", SAM_CONFIGS, ids=["sam", "asam_eta0.01", "asam_eta0"])
@pytest.mark.parametrize("impl", ["auto", "foreach", "per_tensor"])
def test_sgd_trajectory_matches_float64_reference(api, cfg, impl):
    p0, batches = ref.init_mlp(), ref.make_batches(6)
    expected = ref.sam_trajectory(p0, batches, ref.SGDRef(lr=0.1, momentum=0.9, weight_decay=5e-4), **cfg)
    model = make_mlp(p0)
    opt = sam_torch.SAM(
        model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4,
        perturb_impl=impl, **cfg,
    )
    assert_close_rel(run_torch(model, opt, batches, api), expected, 1e-12)


@pytest.mark.parametrize("api", ["closure", "two_step"])
@pytest.mark.parametrize("cfg", SAM_CONFIGS[:2], ids=["sam", "asam"])
def test_adamw_trajectory_matches_float64_reference(api, cfg):
    p0, batches = ref.init_mlp(seed=3), ref.make_batches(6, seed=4)
    expected = ref.sam_trajectory(p0, batches, ref.AdamWRef(lr=1e-2, weight_decay=0.05), **cfg)
    model = make_mlp(p0)
    opt = sam_torch.SAM(model.parameters(), torch.optim.AdamW, lr=1e-2, weight_decay=0.05, **cfg)
    assert_close_rel(run_torch(model, opt, batches, api), expected, 1e-10)


def test_per_group_rho_adaptive_eta_with_global_norm():
    p0, batches = ref.init_mlp(seed=5), ref.make_batches(4, seed=6)
    # weights: ASAM rho 0.5 eta 0.02; biases: plain SAM rho 0.1 (excluded from adaptive scaling)
    per_param = [(0.5, True, 0.02), (0.1, False, 0.0), (0.5, True, 0.02), (0.1, False, 0.0)]
    expected = ref.sam_trajectory(p0, batches, ref.SGDRef(lr=0.05, momentum=0.9), rho=None, groups=per_param)
    model = make_mlp(p0)
    weights = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    opt = sam_torch.SAM(
        [{"params": weights, "rho": 0.5, "adaptive": True, "eta": 0.02}, {"params": biases, "rho": 0.1}],
        torch.optim.SGD, lr=0.05, momentum=0.9,
    )
    assert_close_rel(run_torch(model, opt, batches, "closure"), expected, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("adaptive", [False, True])
def test_foreach_path_equals_per_tensor_path_and_copy_equals_swap(dtype, adaptive):
    p0, batches = ref.init_mlp(seed=7), ref.make_batches(5, seed=8)
    batches = [(x.astype(np.float64), t) for x, t in batches]
    results = []
    for impl, storage in [("per_tensor", "swap"), ("foreach", "swap"), ("per_tensor", "copy"), ("foreach", "copy")]:
        model = make_mlp(p0, dtype)
        opt = sam_torch.SAM(
            model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.3,
            adaptive=adaptive, perturb_impl=impl, storage=storage,
        )
        for x_np, t_np in batches:
            x, t = torch.from_numpy(x_np).to(dtype), torch.from_numpy(t_np).to(dtype)
            opt.zero_grad()
            ((model(x) - t) ** 2).mean().backward()
            opt.first_step(zero_grad=True)
            ((model(x) - t) ** 2).mean().backward()
            opt.second_step()
        results.append([p.detach().clone() for p in model.parameters()])
    # storage never changes the numbers: swap and copy agree bit for bit on each path
    for a, b in zip(results[0], results[2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(results[1], results[3], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The per-tensor path computes w + s*d with one fused multiply-add (torch.addcmul), the
    # foreach path as a rounded product then a sum: they may differ in the last bit only.
    ulp = torch.finfo(dtype).eps
    for a, b in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(a, b, rtol=8 * ulp, atol=8 * ulp)


def _grads_filled(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


@pytest.mark.parametrize("storage", ["swap", "copy"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_restore_is_bit_exact_and_keeps_parameter_identity(storage, adaptive):
    model = make_mlp(ref.init_mlp(seed=9), torch.float32)
    _grads_filled(model)
    before = [p.detach().clone() for p in model.parameters()]
    ptrs = [p.data_ptr() for p in model.parameters()]
    ids = [id(p) for p in model.parameters()]
    opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=0.0, rho=0.7, adaptive=adaptive, storage=storage)
    opt.first_step()
    assert opt.is_perturbed
    moved = [not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)]
    assert all(moved)
    opt.restore()
    assert not opt.is_perturbed
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert [id(p) for p in model.parameters()] == ids
    # second_step restores before the base step: with lr=0 the weights come back bit for bit
    opt.first_step()
    opt.second_step()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_perturbed_point_is_w_plus_e():
    p0 = ref.init_mlp(seed=10)
    model = make_mlp(p0)
    _grads_filled(model, seed=1)
    grads = [p.grad.numpy().copy() for p in model.parameters()]
    opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=0.2, adaptive=True, eta=0.01)
    opt.first_step()
    e = ref.sam_perturbation(p0, grads, rho=0.2, adaptive=True, eta=0.01)
    for p, w, ei in zip(model.parameters(), p0, e, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), w + ei, rtol=1e-14, atol=1e-16)
    norm = np.sqrt(sum(np.sum(((np.abs(w) + 0.01) * g) ** 2) for w, g in zip(p0, grads, strict=True)))
    assert opt.grad_norm.item() == pytest.approx(norm, rel=1e-13)
    opt.restore()


@pytest.mark.parametrize("block", [1, 3, 8, 40, 1 << 18])
@pytest.mark.parametrize("transposed", [False, True])
def test_cpu_asam_cache_blocks_give_the_formula(monkeypatch, block, transposed):
    """The CPU ASAM direction is built a cache block at a time (tensors cut into views and
    grouped); any block size, and a non-contiguous parameter (per-tensor fallback), give
    w + rho T^2 g / ||T g|| in float64."""
    import sam_torch._sam as sam_impl

    monkeypatch.setattr(sam_impl, "_CPU_BLOCK", block)
    p0 = ref.init_mlp(seed=11)
    params = [torch.tensor(w) for w in p0]
    if transposed:
        params[0] = torch.tensor(p0[0].T.copy()).t()  # same values, column-major
        assert not params[0].is_contiguous()
    params = [nn.Parameter(w) for w in params]
    g = np.random.default_rng(2)
    grads = [g.standard_normal(w.shape) for w in p0]
    for p, gr in zip(params, grads, strict=True):
        p.grad = torch.tensor(gr)
    opt = sam_torch.SAM(params, torch.optim.SGD, lr=0.1, rho=0.2, adaptive=True, eta=0.05)
    opt.first_step()
    e = ref.sam_perturbation(p0, grads, rho=0.2, adaptive=True, eta=0.05)
    for p, w, ei in zip(params, p0, e, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), w + ei, rtol=1e-14, atol=1e-16)
    norm = np.sqrt(sum(np.sum(((np.abs(w) + 0.05) * gr) ** 2) for w, gr in zip(p0, grads, strict=True)))
    assert opt.grad_norm.item() == pytest.approx(norm, rel=1e-13)
    opt.restore()
    for p, w in zip(params, p0, strict=True):
        np.testing.assert_array_equal(p.detach().numpy(), w)


def test_params_without_grad_are_skipped_and_never_perturbed():
    model = make_mlp(ref.init_mlp(seed=11))
    frozen = model[0].weight
    frozen.requires_grad_(False)
    frozen_before = frozen.detach().clone()
    opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.5)
    x, t = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    seen = []

    def closure():
        opt.zero_grad()
        seen.append(torch.equal(frozen, frozen_before))
        loss = ((model(x) - t) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    assert all(seen) and len(seen) == 6
    assert torch.equal(frozen, frozen_before)


@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradients_give_zero_perturbation(adaptive):
    model = make_mlp(ref.init_mlp(seed=12))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=0.1, adaptive=adaptive)
    opt.first_step()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    assert opt.grad_norm.item() == 0.0
    opt.second_step()


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_state_dict_round_trip_mid_training_continues_exactly(base):
    p0, batches = ref.init_mlp(seed=13), ref.make_batches(8, seed=14)

    def make(model):
        if base == "sgd":
            return sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4, rho=0.1)
        return sam_torch.SAM(model.parameters(), torch.optim.AdamW, lr=1e-2, rho=0.3, adaptive=True)

    full_model = make_mlp(p0)
    full = run_torch(full_model, make(full_model), batches, "closure")

    model = make_mlp(p0)
    opt = make(model)
    run_torch(model, opt, batches[:3], "closure")
    sd_model = {k: v.clone() for k, v in model.state_dict().items()}
    sd_opt = opt.state_dict()
    assert len(sd_opt["state"]) == 4  # the base optimizer's momentum / moments travel with SAM
    assert sd_opt["param_groups"][0]["rho"] == (0.1 if base == "sgd" else 0.3)

    model2 = make_mlp(ref.init_mlp(seed=99))
    opt2 = make(model2)
    model2.load_state_dict(sd_model)
    opt2.load_state_dict(sd_opt)
    assert opt2.base_optimizer.state is opt2.state
    assert opt2.base_optimizer.param_groups is opt2.param_groups
    resumed = run_torch(model2, opt2, batches[3:], "closure")
    for a, b in zip(resumed, full, strict=True):
        np.testing.assert_array_equal(a, b)


def test_two_step_and_closure_apis_agree_bitwise():
    p0, batches = ref.init_mlp(seed=15), ref.make_batches(5, seed=16)
    out = []
    for api in ("closure", "two_step"):
        model = make_mlp(p0)
        opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.2, adaptive=True)
        out.append(run_torch(model, opt, batches, api))
    for a, b in zip(*out, strict=True):
        np.testing.assert_array_equal(a, b)


def test_step_returns_clean_loss_and_records_sharpness():
    model = make_mlp(ref.init_mlp(seed=17))
    x, t = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=0.0, rho=0.3)
    calls = []

    def closure():
        opt.zero_grad()
        loss = ((model(x) - t) ** 2).mean()
        loss.backward()
        calls.append(loss.item())
        return loss

    loss = opt.step(closure)
    assert len(calls) == 2
    assert loss.item() == calls[0]
    assert opt.perturbed_loss.item() == calls[1]
    assert opt.sharpness.item() == pytest.approx(calls[1] - calls[0])
    assert calls[1] > calls[0]  # moving along the gradient increases the loss


def test_half_precision_norm_accumulates_in_float32():
    p = nn.Parameter(torch.zeros(4096, dtype=torch.float16))
    p.grad = torch.full((4096,), 300.0, dtype=torch.float16)  # sum of squares 3.7e8 >> fp16 max
    opt = sam_torch.SAM([p], torch.optim.SGD, lr=0.0, rho=0.05)
    opt.first_step()
    assert opt.grad_norm.dtype == torch.float32
    assert opt.grad_norm.item() == pytest.approx(300.0 * 64.0, rel=1e-6)
    expected = 0.05 / 64.0
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.float(), torch.full((4096,), expected), rtol=1e-3, atol=0)
    opt.second_step()
    assert torch.equal(p, torch.zeros_like(p))


def test_bfloat16_small_gradient_does_not_overflow_the_scale():
    p = nn.Parameter(torch.ones(10, dtype=torch.bfloat16))
    p.grad = torch.full((10,), 1e-30, dtype=torch.bfloat16)
    opt = sam_torch.SAM([p], torch.optim.SGD, lr=0.0, rho=0.05)
    opt.first_step()
    assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
    opt.restore()


def test_lr_scheduler_attached_to_sam_drives_base_optimizer_without_warning():
    model = make_mlp(ref.init_mlp(seed=18))
    opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, t = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            ((model(x) - t) ** 2).mean().backward()
            opt.first_step(zero_grad=True)
            ((model(x) - t) ** 2).mean().backward()
            opt.second_step(zero_grad=True)
            sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


def test_add_param_group_after_construction_reaches_base_optimizer():
    a = nn.Parameter(torch.randn(3))
    b = nn.Parameter(torch.randn(2))
    opt = sam_torch.SAM([a], torch.optim.SGD, lr=0.1, rho=0.2)
    opt.add_param_group({"params": [b], "lr": 0.01})
    assert len(opt.base_optimizer.param_groups) == 2
    assert opt.param_groups[1]["rho"] == 0.2 and opt.param_groups[1]["lr"] == 0.01
    with pytest.raises(ValueError, match=re.escape("rho must be a finite number >= 0, got -1")):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2))], "rho": -1})


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.lin(x)).sum()


def test_disable_running_stats_keeps_running_statistics_from_clean_pass_only():
    torch.manual_seed(0)
    net = _BNNet()
    x = torch.randn(16, 4)
    net(x).backward()
    mean, var, n = net.bn.running_mean.clone(), net.bn.running_var.clone(), net.bn.num_batches_tracked.clone()
    out_plain = net(x)  # updates stats again (a reference for the normalized output)
    net.bn.running_mean.copy_(mean)
    net.bn.running_var.copy_(var)
    net.bn.num_batches_tracked.copy_(n)
    with sam_torch.disable_running_stats(net):
        out = net(x)
        out.backward()
    assert torch.equal(net.bn.running_mean, mean)
    assert torch.equal(net.bn.running_var, var)
    assert torch.equal(net.bn.num_batches_tracked, n)
    assert torch.equal(out, out_plain)  # normalization still uses the batch statistics
    assert net.bn.track_running_stats
    with pytest.raises(KeyError), sam_torch.disable_running_stats(net):
        raise KeyError("boom")
    assert net.bn.track_running_stats


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        (dict(rho=-0.1), ValueError, "rho must be a finite number >= 0, got -0.1"),
        (dict(rho=float("nan")), ValueError, "rho must be a finite number >= 0, got nan"),
        (dict(sam_eps=0.0), ValueError, "sam_eps must be a finite number > 0, got 0.0"),
        (dict(eta=-0.01), ValueError, "eta must be a finite number >= 0, got -0.01"),
        (dict(adaptive="yes"), TypeError, "adaptive must be True or False, got str 'yes'"),
        (dict(perturb_impl="cuda"), ValueError, "perturb_impl must be 'auto', 'foreach', 'per_tensor' or 'compiled'"),
        (dict(storage="disk"), ValueError, "storage must be 'auto', 'swap' or 'copy'"),
    ],
)
def test_constructor_validation(kwargs, exc, message):
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(exc, match=re.escape(message)):
        sam_torch.SAM([p], torch.optim.SGD, lr=0.1, **kwargs)


def test_base_optimizer_instance_is_rejected_with_the_fix():
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError, match=r"base_optimizer must be an optimizer class.*SAM\(params, torch.optim.SGD"):
        sam_torch.SAM([p], torch.optim.SGD([p], lr=0.1), lr=0.1)


def test_step_order_misuse_raises():
    p = nn.Parameter(torch.randn(3))
    opt = sam_torch.SAM([p], torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match=r"second_step\(\) was called without first_step\(\)"):
        opt.second_step()
    p.grad = torch.ones(3)
    opt.first_step()
    with pytest.raises(RuntimeError, match=r"first_step\(\) was called twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match=r"state_dict\(\) called between first_step\(\) and second_step\(\)"):
        opt.state_dict()
    opt.second_step()
    opt.state_dict()
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()


def test_eps_goes_to_the_base_optimizer_and_sam_eps_to_sam():
    p = nn.Parameter(torch.randn(3))
    opt = sam_torch.SAM([p], torch.optim.Adam, lr=1e-3, eps=1e-6, sam_eps=1e-9)
    group = opt.param_groups[0]
    assert group["sam_eps"] == 1e-9  # SAM's epsilon ...
    assert group["eps"] == 1e-6  # ... and Adam's, as the popular wrapper passes it
    assert opt.base_optimizer.defaults["eps"] == 1e-6
    assert sam_torch.SAM([p], torch.optim.Adam, lr=1e-3).param_groups[0]["eps"] == 1e-8


def test_eps_for_a_base_optimizer_without_one_names_sam_eps():
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError, match=r"SAM's own epsilon .* is sam_eps="):
        sam_torch.SAM([p], torch.optim.SGD, lr=0.1, eps=1e-6)


def test_group_sam_eps_errors_name_sam_eps():
    p, q = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="sam_eps must be a finite number > 0, got 0"):
        sam_torch.SAM([{"params": [p], "sam_eps": 0}], torch.optim.SGD, lr=0.1)
    opt = sam_torch.SAM([p], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"sam_eps must be a finite number > 0, got -1.0"):
        opt.add_param_group({"params": [q], "sam_eps": -1.0})


def test_base_optimizer_sharing_a_sam_key_is_rejected():
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="base_optimizer Adadelta takes 'rho'"):
        sam_torch.SAM([p], torch.optim.Adadelta, lr=1.0)
