"""Step hooks fire once per SAM step, in both APIs, pre and post, local and global.

Pre hooks fire on entry to ``step(closure)`` (two-step API: ``first_step()``), post hooks on
return from ``step(closure)`` (``second_step()``); the base optimizer's step inside fires no
global hook, only the hooks registered on ``sam.base_optimizer`` itself.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import sam_torch


class Recorder:
    """Every hook call as ``(kind, optimizer class, is_perturbed at the time)``."""

    def __init__(self, opt):
        self.calls = []
        self.opt = opt
        self.handles = [
            register_optimizer_step_pre_hook(self._hook("global_pre")),
            register_optimizer_step_post_hook(self._hook("global_post")),
            opt.register_step_pre_hook(self._hook("pre")),
            opt.register_step_post_hook(self._hook("post")),
            opt.base_optimizer.register_step_pre_hook(self._hook("base_pre")),
            opt.base_optimizer.register_step_post_hook(self._hook("base_post")),
        ]

    def _hook(self, kind):
        def hook(optimizer, args, kwargs):
            self.calls.append((kind, type(optimizer).__name__, self.opt.is_perturbed))

        return hook

    def kinds(self):
        out = [k for k, _, _ in self.calls]
        self.calls = []
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


ONE_STEP = ["global_pre", "pre", "base_pre", "base_post", "post", "global_post"]
SKIPPED = ["global_pre", "pre", "post", "global_post"]  # no base step: no base hooks


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2))


X, Y = torch.randn(12, 6), torch.randn(12, 2)


def _closure(model, x=X):
    def closure():
        loss = F.mse_loss(model(x), Y)
        loss.backward()
        return loss

    return closure


@pytest.fixture
def rec_for():
    recorders = []

    def make(opt):
        recorders.append(Recorder(opt))
        return recorders[-1]

    yield make
    for r in recorders:
        r.remove()


def test_step_closure_fires_each_hook_once_with_sam_as_the_optimizer(rec_for):
    model = _model()
    opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    rec = rec_for(opt)
    opt.step(_closure(model))
    calls = rec.calls
    assert [k for k, _, _ in calls] == ONE_STEP
    assert [n for _, n, _ in calls] == ["SAM", "SAM", "SGD", "SGD", "SAM", "SAM"]
    assert not any(perturbed for _, _, perturbed in calls)  # never seen at w + e
    # the popular wrapper's loop: backward, then step(closure) (one closure call)
    F.mse_loss(model(X), Y).backward()
    opt.step(_closure(model))
    assert rec.kinds()[len(ONE_STEP):] == ONE_STEP


def test_two_step_api_fires_pre_at_first_step_and_post_at_second_step(rec_for):
    model = _model()
    opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    rec = rec_for(opt)
    for _ in range(2):
        F.mse_loss(model(X), Y).backward()
        opt.first_step(zero_grad=True)
        assert rec.kinds() == ["global_pre", "pre"]
        F.mse_loss(model(X), Y).backward()
        opt.second_step(zero_grad=True)
        assert rec.kinds() == ["base_pre", "base_post", "post", "global_post"]
    # the perturbed() block is the two-step API
    F.mse_loss(model(X), Y).backward()
    with opt.perturbed():
        F.mse_loss(model(X), Y).backward()
    assert rec.kinds() == ONE_STEP


def test_cancelled_and_failed_steps_fire_no_post_hook(rec_for):
    model = _model()
    opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    rec = rec_for(opt)
    F.mse_loss(model(X), Y).backward()
    opt.first_step()
    opt.restore()  # cancels the step
    assert rec.kinds() == ["global_pre", "pre"]
    opt.zero_grad()
    F.mse_loss(model(X), Y).backward()
    opt.first_step(zero_grad=True)  # a new step: its pre hooks fire again
    with pytest.raises(RuntimeError, match="called twice"):
        opt.first_step()  # misuse inside the step: no hook
    F.mse_loss(model(X), Y).backward()
    opt.second_step()
    assert rec.kinds() == ["global_pre", "pre", "base_pre", "base_post", "post", "global_post"]

    calls = {"n": 0}

    def failing():
        calls["n"] += 1
        loss = F.mse_loss(model(X), Y)
        loss.backward()
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return loss

    opt.zero_grad()
    with pytest.raises(KeyboardInterrupt):
        opt.step(failing)
    assert rec.kinds() == ["global_pre", "pre"]
    opt.step(_closure(model))  # nothing left half done
    assert rec.kinds() == ONE_STEP


def test_skipped_step_fires_sam_hooks_but_no_base_hooks(rec_for):
    model = _model()
    opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    rec = rec_for(opt)
    opt.step(_closure(model, x=torch.full_like(X, float("nan"))))
    assert opt.step_skipped
    assert rec.kinds() == SKIPPED
    F.mse_loss(model(X), Y).backward()
    opt.first_step(zero_grad=True)
    F.mse_loss(model(torch.full_like(X, float("inf"))), Y).backward()
    opt.second_step(zero_grad=True)
    assert opt.step_skipped
    assert rec.kinds() == SKIPPED


def test_a_pre_hook_may_replace_the_closure_of_step():
    model = _model()
    opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    used = []

    def replacement():
        used.append(1)
        return _closure(model)()

    handle = opt.register_step_pre_hook(lambda o, args, kwargs: ((o, replacement), {}))
    opt.step(lambda: 1 / 0)
    handle.remove()
    assert used == [1, 1]


VARIANTS = {
    "GSAM": lambda ps, m: sam_torch.GSAM(ps, torch.optim.SGD, lr=0.1),
    "WSAM": lambda ps, m: sam_torch.WSAM(ps, torch.optim.SGD, lr=0.1),
    "SAMON": lambda ps, m: sam_torch.SAMON(ps, torch.optim.SGD, lr=0.1, norm_params=m),
    "FriendlySAM": lambda ps, m: sam_torch.FriendlySAM(ps, torch.optim.SGD, lr=0.1),
    "VaSSO": lambda ps, m: sam_torch.VaSSO(ps, torch.optim.SGD, lr=0.1),
    "LookSAM": lambda ps, m: sam_torch.LookSAM(ps, torch.optim.SGD, lr=0.1, k=2),
    "EveryKSAM": lambda ps, m: sam_torch.EveryKSAM(ps, torch.optim.SGD, lr=0.1, k=2),
    "MomentumSAM": lambda ps, m: sam_torch.MomentumSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_fire_each_hook_once_per_step_in_both_apis(rec_for, name):
    model = _model()
    opt = VARIANTS[name](model.parameters(), model)
    rec = rec_for(opt)
    for _ in range(4):  # LookSAM/EveryKSAM: full and one-pass steps alternate
        opt.step(_closure(model))
        assert rec.kinds() == ONE_STEP
    for _ in range(2):
        if name == "MomentumSAM":  # perturbs along the momentum, before its one backward
            opt.first_step()
        else:
            F.mse_loss(model(X), Y).backward()
            opt.first_step(zero_grad=True)
        assert rec.kinds() == ["global_pre", "pre"]
        F.mse_loss(model(X), Y).backward()
        opt.second_step(zero_grad=True)
        assert rec.kinds() == ["base_pre", "base_post", "post", "global_post"]


def test_m_sharpness_step_is_one_step(rec_for):
    model = _model()
    opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    rec = rec_for(opt)

    def loss_fn(model, chunk):
        x, y = chunk
        return F.mse_loss(model(x), y)

    for vectorize in (False, True):
        sam_torch.m_sharpness_step(opt, model, loss_fn, (X, Y), m=3, vectorize=vectorize)
        assert rec.kinds() == ONE_STEP  # four chunks, one step


def test_scaled_sam_fires_each_hook_once_per_step(rec_for):
    model = _model()
    opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    amp = sam_torch.ScaledSAM(opt, torch.amp.GradScaler("cpu", init_scale=2.0**8))
    rec = rec_for(opt)

    def closure():
        loss = F.mse_loss(model(X), Y)
        amp.scale(loss).backward()
        return loss

    amp.step(closure)
    assert rec.kinds() == ONE_STEP
    amp.scale(F.mse_loss(model(X), Y)).backward()
    amp.first_step(zero_grad=True)
    assert rec.kinds() == ["global_pre", "pre"]
    amp.scale(F.mse_loss(model(X), Y)).backward()
    amp.second_step(zero_grad=True)
    assert rec.kinds() == ["base_pre", "base_post", "post", "global_post"]
    # a clean-pass inf: the step is skipped, still one firing of SAM's hooks
    amp.step(lambda: amp.scale(F.mse_loss(model(X) * float("inf"), Y)).backward())
    assert opt.step_skipped
    assert rec.kinds() == SKIPPED


def test_lr_scheduler_on_the_base_optimizer_sees_its_steps():
    import warnings

    model = _model()
    opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt.base_optimizer, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()"
        opt.step(_closure(model))
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
