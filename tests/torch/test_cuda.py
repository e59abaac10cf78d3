"""sam_torch on a CUDA device: same numbers as on CPU, no hidden host syncs, faults handled.

Skipped where torch sees no GPU (CI); run on a GPU machine with ``pytest tests/torch/test_cuda.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sam_torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 5))


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=gen), torch.randint(0, 5, (16,), generator=gen))
            for _ in range(n)]


def _train(model: nn.Module, opt: sam_torch.SAM, data, device: torch.device) -> None:
    loss_fn = nn.CrossEntropyLoss()
    for x, y in data:
        x, y = x.to(device), y.to(device)
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with sam_torch.disable_running_stats(model):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("impl", ["auto", "per_tensor"])
def test_cuda_trajectory_matches_cpu_float64(adaptive, impl):
    data = _batches(5)
    runs = {}
    for device in ("cpu", "cuda"):
        model = _model().double().to(device)
        opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                            rho=0.5 if adaptive else 0.05, adaptive=adaptive,
                            perturb_impl=impl if device == "cuda" else "auto")
        _train(model, opt, [(x.double(), y) for x, y in data], torch.device(device))
        runs[device] = [p.detach().cpu() for p in model.parameters()]
    for a, b in zip(runs["cpu"], runs["cuda"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_cuda_first_step_and_second_step_without_skip_check_never_sync():
    model = _model().cuda()
    opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
                        skip_nonfinite=False)
    x, y = (t.cuda() for t in _batches(1)[0])
    loss_fn = nn.CrossEntropyLoss()
    _train(model, opt, [(x, y)], torch.device("cuda"))  # state exists
    loss_fn(model(x), y).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.first_step(zero_grad=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    loss_fn(model(x), y).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.second_step(zero_grad=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("bad_pass", [1, 2])
def test_cuda_nonfinite_gradient_skips_and_restores(bad_pass):
    model = _model().cuda()
    opt = sam_torch.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    data = _batches(2)
    _train(model, opt, data[:1], torch.device("cuda"))
    w0 = copy.deepcopy(model.state_dict())
    x, y = (t.cuda() for t in data[1])
    loss_fn = nn.CrossEntropyLoss()
    loss = loss_fn(model(x), y)
    (loss * float("inf") if bad_pass == 1 else loss).backward()
    opt.first_step(zero_grad=True)
    loss = loss_fn(model(x), y)
    (loss * float("nan") if bad_pass == 2 else loss).backward()
    opt.second_step(zero_grad=True)
    assert opt.step_skipped
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked") or "running" in k:
            continue  # the clean forward pass updated the BN statistics, as in plain training
        assert torch.equal(v, w0[k]), k


def test_cuda_grad_scaler_recipe_matches_unscaled_steps():
    data = _batches(3)
    model_a, model_b = _model().cuda(), _model().cuda()
    opt_a = sam_torch.SAM(model_a.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    opt_b = sam_torch.SAM(model_b.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    scaled = sam_torch.ScaledSAM(opt_b, torch.amp.GradScaler("cuda", init_scale=2.0**8))
    loss_fn = nn.CrossEntropyLoss()
    _train(model_a, opt_a, data, torch.device("cuda"))
    for x, y in data:
        x, y = x.cuda(), y.cuda()

        def closure(x=x, y=y):
            opt_b.zero_grad()
            loss = loss_fn(model_b(x), y)
            scaled.scale(loss).backward()
            return loss

        scaled.step(closure)
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
