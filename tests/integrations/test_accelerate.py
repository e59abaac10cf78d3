"""SAM with Hugging Face Accelerate, without the Trainer (CPU, float64, a few steps)."""

from __future__ import annotations

import copy
import functools

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import sam_torch  # noqa: E402

STEPS, LR, RHO, CLIP = 4, 0.05, 0.1, 0.3


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    # Accelerate keeps one process-wide state; each test builds its own Accelerator.
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def net(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def batches(dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, 8, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (STEPS, 8), generator=g)
    return list(zip(x, y, strict=True))


def make_sam(model: nn.Module) -> sam_torch.SAM:
    base = functools.partial(torch.optim.AdamW, weight_decay=0.01)
    return sam_torch.SAM(model.parameters(), base, lr=LR, rho=RHO)


def manual_reference(model: nn.Module) -> list[float]:
    """The SAM recipe without Accelerate: clean pass, perturb, perturbed pass (BatchNorm
    statistics frozen), clip the perturbed-point gradient, restore and step."""
    sam = make_sam(model)
    schedule = torch.optim.lr_scheduler.StepLR(sam, step_size=1, gamma=0.5)
    norms = []
    for x, y in batches():
        F.cross_entropy(model(x), y).backward()
        sam.first_step(zero_grad=True)
        with sam_torch.disable_running_stats(model):
            F.cross_entropy(model(x), y).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        sam.second_step(zero_grad=True)
        schedule.step()
    return norms


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    # Same process, same kernels, same operations in the same order: bit for bit.
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_documented_loop_equals_the_manual_sam_recipe():
    model = net()
    reference = copy.deepcopy(model)
    expected_norms = manual_reference(reference)

    accelerator = Accelerator(cpu=True)
    sam = make_sam(model)
    schedule = torch.optim.lr_scheduler.StepLR(sam, step_size=1, gamma=0.5)
    model, optimizer, schedule = accelerator.prepare(model, sam, schedule)
    assert isinstance(optimizer, AcceleratedOptimizer) and optimizer.optimizer is sam
    norms = []
    for x, y in batches():
        accelerator.backward(F.cross_entropy(model(x), y))
        sam.first_step(zero_grad=True)
        with sam_torch.disable_running_stats(model):
            accelerator.backward(F.cross_entropy(model(x), y))
        norms.append(accelerator.clip_grad_norm_(model.parameters(), CLIP).item())
        sam.second_step(zero_grad=True)
        schedule.step()
    assert norms == expected_norms and min(norms) > CLIP  # clipping was active
    assert_same_model(model, reference)
    assert sam.param_groups[0]["lr"] == LR * 0.5**STEPS  # the prepared scheduler drove SAM


def test_accelerated_optimizer_step_with_a_closure():
    """``AcceleratedOptimizer.step(closure)`` passes the closure to SAM, which calls it at w
    and at w + e (BatchNorm: its statistics then come from both passes, as in any
    ``step(closure)`` loop; the reference does the same)."""
    model = net()
    reference = copy.deepcopy(model)
    ref_sam = make_sam(reference)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, make_sam(model))
    calls = []
    for x, y in batches():

        def closure(x=x, y=y):
            calls.append(optimizer.optimizer.is_perturbed)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            return loss

        def ref_closure(x=x, y=y):
            ref_sam.zero_grad()
            loss = F.cross_entropy(reference(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)  # returns None: AcceleratedOptimizer drops the return value
        ref_sam.step(ref_closure)
        assert optimizer.optimizer.loss == ref_sam.loss  # ... SAM keeps it
    assert calls == [False, True] * STEPS
    assert_same_model(model, reference)


def test_bf16_autocast_through_accelerate_on_cpu():
    model = net(torch.float32)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    sam = make_sam(model)
    model, _ = accelerator.prepare(model, sam)
    dtypes = []
    model[3].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    start = [p.detach().clone() for p in model.parameters()]
    for x, y in batches(torch.float32):
        accelerator.backward(F.cross_entropy(model(x), y))
        sam.first_step(zero_grad=True)
        accelerator.backward(F.cross_entropy(model(x), y))
        sam.second_step(zero_grad=True)
    assert dtypes == [torch.bfloat16] * (2 * STEPS)
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(start, model.parameters(), strict=True))
