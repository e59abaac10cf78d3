"""sam_torch's SAM family against the float64 NumPy reference, closure call counts, errors,
checkpoint resume and the SAM-ON / rho-schedule helpers."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import sam_torch  # noqa: E402
from tests.helpers import max_rel_diff  # noqa: E402
from tests.reference import AdamWRef, SGDRef, init_mlp, make_batches  # noqa: E402
from tests.variants.reference import trajectory  # noqa: E402

LR, MOM, WD = 0.1, 0.9, 5e-4
STEPS = 8


def _model(params):
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    with torch.no_grad():
        for p, w in zip(model.parameters(), params, strict=True):
            p.copy_(torch.from_numpy(w))
    return model


def _closure(model, opt, batch, counter):
    x, t = (torch.from_numpy(a) for a in batch)

    def closure():
        counter.append(1)
        opt.zero_grad()
        loss = ((model(x) - t) ** 2).mean()
        loss.backward()
        return loss

    return closure


def _run(opt, model, batches):
    per_step = []
    for batch in batches:
        counter: list[int] = []
        opt.step(_closure(model, opt, batch, counter))
        per_step.append(len(counter))
    return [p.detach().numpy() for p in model.parameters()], per_step


VARIANTS = {
    "gsam": (sam_torch.GSAM, dict(rho=0.05, alpha=0.2), dict(alpha=0.2)),
    "friendly": (
        sam_torch.FriendlySAM,
        dict(rho=0.1, sigma=1.0, lmbda=0.9),
        dict(sigma=1.0, lmbda=0.9, rho=0.1),
    ),
    "looksam": (sam_torch.LookSAM, dict(rho=0.05, k=3, alpha=0.7), dict(k=3, alpha=0.7)),
    "everyk": (sam_torch.EveryKSAM, dict(rho=0.05, k=3), dict(k=3)),
    "msam": (sam_torch.MomentumSAM, dict(rho=0.3), dict(rho=0.3)),
    "vasso": (sam_torch.VaSSO, dict(rho=0.1, theta=0.4), dict(rho=0.1, theta=0.4)),
    "wsam": (sam_torch.WSAM, dict(gamma=0.88), dict(gamma=0.88, decouple=True, lr=LR)),
    "wsam-coupled": (
        sam_torch.WSAM,
        dict(gamma=0.6, decouple=False),
        dict(gamma=0.6, decouple=False),
    ),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize(
    ("perturb_impl", "storage"), [("foreach", "swap"), ("per_tensor", "swap"), ("foreach", "copy")]
)
def test_trajectory_matches_numpy_reference(name, perturb_impl, storage):
    cls, kwargs, ref_hp = VARIANTS[name]
    params0 = init_mlp()
    batches = make_batches(STEPS)
    expected, ref_calls = trajectory(
        name.split("-")[0], params0, batches, SGDRef(LR, MOM, WD), **ref_hp
    )
    model = _model(params0)
    opt = cls(
        model.parameters(),
        torch.optim.SGD,
        perturb_impl=perturb_impl,
        storage=storage,
        lr=LR,
        momentum=MOM,
        weight_decay=WD,
        **kwargs,
    )
    got, calls = _run(opt, model, batches)
    assert max_rel_diff(got, expected) < 1e-10
    assert calls == ref_calls  # forward-backward passes per step, through the closure


def test_pass_counts_per_step():
    model = _model(init_mlp())
    batches = make_batches(10)
    look = sam_torch.LookSAM(model.parameters(), torch.optim.SGD, k=5, lr=LR)
    assert _run(look, model, batches)[1] == [2, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    every = sam_torch.EveryKSAM(model.parameters(), torch.optim.SGD, k=5, lr=LR)
    assert _run(every, model, batches)[1] == [1, 1, 1, 1, 2, 1, 1, 1, 1, 2]
    msam = sam_torch.MomentumSAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOM)
    assert _run(msam, model, batches)[1] == [1] * 10
    gsam = sam_torch.GSAM(model.parameters(), torch.optim.SGD, lr=LR)
    assert _run(gsam, model, batches[:3])[1] == [2, 2, 2]


def test_samon_perturbs_only_the_masked_parameters():
    params0 = init_mlp()
    batches = make_batches(STEPS)
    mask = [False, True, False, True]  # the biases stand in for normalization parameters
    expected, _ = trajectory("samon", params0, batches, SGDRef(LR, MOM, WD), rho=0.2, mask=mask)
    model = _model(params0)
    chosen = [p for p, f in zip(model.parameters(), mask, strict=True) if f]
    opt = sam_torch.SAMON(
        model.parameters(),
        torch.optim.SGD,
        rho=0.2,
        norm_params=chosen,
        lr=LR,
        momentum=MOM,
        weight_decay=WD,
    )
    got, calls = _run(opt, model, batches)
    assert max_rel_diff(got, expected) < 1e-10
    assert calls == [2] * STEPS


def test_gsam_with_alpha_zero_is_sam_bit_for_bit():
    params0 = init_mlp()
    batches = make_batches(4)
    m1, m2 = _model(params0), _model(params0)
    a = sam_torch.GSAM(m1.parameters(), torch.optim.SGD, alpha=0.0, lr=LR, momentum=MOM)
    b = sam_torch.SAM(m2.parameters(), torch.optim.SGD, lr=LR, momentum=MOM)
    ga, _ = _run(a, m1, batches)
    gb, _ = _run(b, m2, batches)
    for x, y in zip(ga, gb, strict=True):
        np.testing.assert_array_equal(x, y)


def test_gsam_several_groups_uses_global_norms_and_dot():
    params0 = init_mlp()
    batches = make_batches(5)
    model = _model(params0)
    ps = list(model.parameters())
    groups = [{"params": ps[:2], "lr": 0.1}, {"params": ps[2:], "lr": 0.05}]
    opt = sam_torch.GSAM(groups, torch.optim.SGD, alpha=0.3, rho=0.05)
    got, _ = _run(opt, model, batches)

    class TwoLR:
        def __init__(self):
            self.bufs = []

        def step(self, params, grads):
            return [
                w - (0.1 if i < 2 else 0.05) * g
                for i, (w, g) in enumerate(zip(params, grads, strict=True))
            ]

    expected, _ = trajectory("gsam", params0, batches, TwoLR(), alpha=0.3)
    assert max_rel_diff(got, expected) < 1e-10


def test_friendly_sam_with_adam_keeps_the_base_state_intact():
    # Adam initializes its state only when it is empty: the variant's buffers live apart.
    params0 = init_mlp()
    batches = make_batches(5)
    expected, _ = trajectory(
        "friendly", params0, batches, AdamWRef(1e-2, weight_decay=1e-2), sigma=1.0, lmbda=0.9
    )
    model = _model(params0)
    opt = sam_torch.FriendlySAM(model.parameters(), torch.optim.AdamW, lr=1e-2, weight_decay=1e-2)
    got, _ = _run(opt, model, batches)
    assert max_rel_diff(got, expected) < 1e-10
    assert set(opt.state[next(model.parameters())]) == {"step", "exp_avg", "exp_avg_sq"}


def test_momentum_sam_with_adam_uses_exp_avg_and_restores_exactly():
    model = _model(init_mlp())
    opt = sam_torch.MomentumSAM(model.parameters(), torch.optim.Adam, rho=0.1, lr=1e-3)
    batches = make_batches(3)
    _run(opt, model, batches[:1])
    before = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    v = [opt.state[p]["exp_avg"] for p in model.parameters()]
    norm = torch.sqrt(sum((x**2).sum() for x in v))
    for p, w, m in zip(model.parameters(), before, v, strict=True):
        torch.testing.assert_close(p.detach(), w - 0.1 * m / (norm + 1e-12), rtol=1e-14, atol=1e-15)
    opt.restore()
    for p, w in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), w)


def test_momentum_sam_without_momentum_is_rejected_at_construction():
    model = _model(init_mlp())
    with pytest.raises(ValueError, match=r"param group 0 has momentum=0 \(SGD then keeps no momentum buffer\)"):
        sam_torch.MomentumSAM(model.parameters(), torch.optim.SGD, lr=LR)  # momentum=0
    with pytest.raises(ValueError, match="Adagrad keeps none"):
        sam_torch.MomentumSAM(model.parameters(), torch.optim.Adagrad, lr=LR)
    groups = [{"params": [model[0].weight], "momentum": 0.0}, {"params": [model[0].bias]}]
    with pytest.raises(ValueError, match=r"param group 0 has momentum=0.0"):
        sam_torch.MomentumSAM(groups, torch.optim.SGD, lr=LR, momentum=MOM)
    # the momentum of SGD(momentum>0) and Adam's exp_avg are fine
    sam_torch.MomentumSAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOM)
    sam_torch.MomentumSAM(model.parameters(), torch.optim.Adam, lr=LR)


@pytest.mark.parametrize("key", ["adaptive", "eta"])
def test_momentum_sam_has_no_adaptive_mode(key):
    model = _model(init_mlp())
    with pytest.raises(TypeError, match=f"MomentumSAM takes no {key}=: .* no adaptive"):
        sam_torch.MomentumSAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOM, **{key: True})


@pytest.mark.parametrize("name", ["looksam", "friendly", "everyk", "vasso"])
def test_state_dict_resume_is_bit_exact(name):
    cls, kwargs, _ = VARIANTS[name]
    params0 = init_mlp()
    batches = make_batches(7)
    model = _model(params0)
    opt = cls(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOM, **kwargs)
    _run(opt, model, batches[:4])
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_w = [p.detach().clone() for p in model.parameters()]
    straight, _ = _run(opt, model, batches[4:])

    model2 = _model([w.numpy() for w in saved_w])
    opt2 = cls(model2.parameters(), torch.optim.SGD, lr=LR, momentum=MOM, **kwargs)
    opt2.load_state_dict(saved_opt)
    resumed, _ = _run(opt2, model2, batches[4:])
    for a, b in zip(resumed, straight, strict=True):
        np.testing.assert_array_equal(a, b)


def test_manual_first_and_second_step_make_a_full_looksam_step():
    params0 = init_mlp()
    batches = make_batches(4)
    m1, m2 = _model(params0), _model(params0)
    a = sam_torch.LookSAM(m1.parameters(), torch.optim.SGD, k=2, lr=LR)
    b = sam_torch.LookSAM(m2.parameters(), torch.optim.SGD, k=2, lr=LR)
    _run(a, m1, batches)
    for batch in batches:
        closure = _closure(m2, b, batch, [])
        if b.is_full_step:
            closure()
            b.first_step()
            closure()
            b.second_step()
        else:
            b.step(closure)
    for x, y in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(x, y)


def test_normalization_parameters_finds_norm_layers_only():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.GroupNorm(2, 4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
        nn.LayerNorm(5),
        nn.InstanceNorm1d(5, affine=True),
    )
    found = {id(p) for p in sam_torch.normalization_parameters(model)}
    expected = {id(p) for i in (1, 2, 6, 7) for p in model[i].parameters()}
    assert found == expected and len(expected) == 8


def test_samon_from_a_module_and_its_errors():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = sam_torch.SAMON(model.parameters(), torch.optim.SGD, norm_params=model, lr=0.1)
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    model(x).square().mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    moved = [
        not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before, strict=True)
    ]
    assert moved == [False, False, True, True, False, False]  # BatchNorm weight and bias only
    norm_grads = [p.grad for p in model[1].parameters()]
    e = torch.cat(
        [(p.detach() - b).ravel() for p, b in zip(model.parameters(), before, strict=True)]
    )
    g = torch.cat([gr.ravel() for gr in norm_grads])
    torch.testing.assert_close(e.norm(), torch.tensor(0.05), rtol=1e-5, atol=0)  # rho, norm of g_N
    torch.testing.assert_close(e[e != 0], 0.05 * g / g.norm(), rtol=1e-5, atol=1e-7)
    opt.restore()
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before, strict=True))
    with pytest.raises(ValueError, match="norm_params is empty"):
        sam_torch.SAMON(
            nn.Linear(2, 2).parameters(), torch.optim.SGD, norm_params=nn.Linear(2, 2), lr=0.1
        )
    with pytest.raises(ValueError, match="not in params"):
        sam_torch.SAMON(model[0].parameters(), torch.optim.SGD, norm_params=model, lr=0.1)


def test_constructor_validation_messages():
    ps = list(nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        sam_torch.GSAM(ps, torch.optim.SGD, alpha=1.5, lr=0.1)
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        sam_torch.LookSAM(ps, torch.optim.SGD, k=0, lr=0.1)
    with pytest.raises(TypeError, match=r"k must be an int >= 1, got float 2\.5"):
        sam_torch.EveryKSAM(ps, torch.optim.SGD, k=2.5, lr=0.1)
    with pytest.raises(ValueError, match=r"lmbda must be in \[0, 1\), got 1.0"):
        sam_torch.FriendlySAM(ps, torch.optim.SGD, lmbda=1.0, lr=0.1)
    with pytest.raises(ValueError, match=r"rho must be a finite number >= 0, got -0\.1"):
        sam_torch.MomentumSAM(ps, torch.optim.SGD, rho=-0.1, lr=0.1)


def test_proportional_rho_scheduler_follows_a_cosine_lr():
    model = _model(init_mlp())
    opt = sam_torch.GSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=MOM)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.0)
    rho_sched = sam_torch.ProportionalRhoScheduler(opt, rho_max=0.08, rho_min=0.02)
    assert opt.param_groups[0]["rho"] == pytest.approx(0.08, rel=1e-14)
    batches = make_batches(10)
    for t, batch in enumerate(batches):
        opt.step(_closure(model, opt, batch, []))
        sched.step()
        rho_sched.step()
        lr = 0.1 * (1 + np.cos(np.pi * (t + 1) / 10)) / 2
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12, abs=1e-15)
        assert opt.param_groups[0]["rho"] == pytest.approx(0.02 + 0.06 * lr / 0.1, rel=1e-12)
    assert opt.param_groups[0]["rho"] == pytest.approx(0.02, rel=1e-12)


@pytest.mark.parametrize("name", ["looksam", "friendly", "everyk", "gsam", "msam", "wsam", "vasso"])
@pytest.mark.parametrize("bad_at", [1, 2])
def test_a_nonfinite_batch_is_skipped_as_if_it_never_came(name, bad_at):
    # LookSAM's g_v, FriendlySAM's average and the step counters must not absorb it
    cls, kwargs, _ = VARIANTS[name]
    kwargs = {**kwargs, "k": 2} if "k" in kwargs else kwargs
    params0 = init_mlp()
    good = make_batches(5)
    x_bad = good[0][0].copy()
    x_bad[0, 0] = np.nan
    with_bad = [*good[:bad_at], (x_bad, good[0][1]), *good[bad_at:]]
    m1, m2 = _model(params0), _model(params0)
    o1 = cls(m1.parameters(), torch.optim.SGD, lr=LR, momentum=MOM, **kwargs)
    o2 = cls(m2.parameters(), torch.optim.SGD, lr=LR, momentum=MOM, **kwargs)
    clean_run, _ = _run(o1, m1, good)
    skipped = []
    for batch in with_bad:
        o2.step(_closure(m2, o2, batch, []))
        skipped.append(o2.step_skipped)
    assert skipped == [i == bad_at for i in range(len(with_bad))]
    for a, b in zip([p.detach().numpy() for p in m2.parameters()], clean_run, strict=True):
        np.testing.assert_array_equal(a, b)


def test_gsam_checkpoint_holds_no_transient_buffer_and_resumes():
    params0 = init_mlp()
    batches = make_batches(4)
    model = _model(params0)
    opt = sam_torch.GSAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOM)
    _run(opt, model, batches[:2])
    state = opt.state_dict()
    assert state["sam_variant"]["buffers"] == {}
    model2 = _model([p.detach().numpy().copy() for p in model.parameters()])
    opt2 = sam_torch.GSAM(model2.parameters(), torch.optim.SGD, lr=LR, momentum=MOM)
    opt2.load_state_dict(copy.deepcopy(state))
    a, _ = _run(opt, model, batches[2:])
    b, _ = _run(opt2, model2, batches[2:])
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_wsam_with_gamma_one_half_coupled_is_sam():
    params0 = init_mlp()
    batches = make_batches(4)
    m1, m2 = _model(params0), _model(params0)
    a = sam_torch.WSAM(
        m1.parameters(), torch.optim.SGD, gamma=0.5, decouple=False, lr=LR, momentum=MOM
    )
    b = sam_torch.SAM(m2.parameters(), torch.optim.SGD, lr=LR, momentum=MOM)
    assert max_rel_diff(_run(a, m1, batches)[0], _run(b, m2, batches)[0]) < 1e-14
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\), got 1.0"):
        sam_torch.WSAM(m1.parameters(), torch.optim.SGD, gamma=1.0, lr=LR)


@pytest.mark.parametrize("name", ["looksam", "everyk"])
def test_hand_driven_loop_with_is_full_step_matches_step_closure(name):
    cls, kwargs, _ = VARIANTS[name]
    params0 = init_mlp()
    batches = make_batches(7)
    m1, m2 = _model(params0), _model(params0)
    a = cls(m1.parameters(), torch.optim.SGD, lr=LR, momentum=MOM, **kwargs)
    b = cls(m2.parameters(), torch.optim.SGD, lr=LR, momentum=MOM, **kwargs)
    _run(a, m1, batches)
    passes = []
    for batch in batches:
        counter: list[int] = []
        closure = _closure(m2, b, batch, counter)
        closure()
        if b.is_full_step:
            b.first_step(zero_grad=True)
            closure()
            b.second_step(zero_grad=True)
        else:
            b.step()
            b.zero_grad()
        passes.append(len(counter))
    assert passes == [
        2 if (i % 3 == 0 if name == "looksam" else (i + 1) % 3 == 0) else 1 for i in range(7)
    ]
    for x, y in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(x, y)
