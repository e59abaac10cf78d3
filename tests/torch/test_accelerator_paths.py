"""The code SAM runs off the CPU, run on the CPU: same numbers as the CPU path.

On an accelerator ``SAM`` takes the multi-tensor ``torch._foreach_*`` kernels
(``perturb_impl="auto"``), records the clean gradient's finite flag on the device and reads
every flag of the step once, in ``second_step()`` (``_sync_is_cheap`` is False there), and
splits a group by device and dtype. Here ``_sync_is_cheap`` is forced to False and the
model mixes float64 and float32 parameters (one split group) and a channels_last
convolution (non-contiguous gradients, the fast finite check's general branch), so each of
those branches runs in CI; each run is compared with the CPU path and the host reads are
counted. ``TorchOps``' kernels are checked one by one against float64 NumPy, foreach or
not, with and without host reads, for every aliasing of ``out``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sam_torch
import sam_torch._sam
from sam_torch import TorchOps
from tests.torch.test_reliability import _HostReads

STEPS = 4


class MixedNet(nn.Module):
    """A float64 channels_last convolution and linear layer, then a float32 head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(2, 3, 3).double().to(memory_format=torch.channels_last)
        self.body = nn.Linear(3, 4).double()
        self.head = nn.Linear(4, 2)  # float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).mean((2, 3))
        return self.head(torch.tanh(self.body(h)).float()).double()


def _data(poison_step: int | None):
    g = torch.Generator().manual_seed(4)
    data = []
    for k in range(STEPS):
        x = torch.randn(6, 2, 5, 5, generator=g, dtype=torch.float64)
        data.append((x.contiguous(memory_format=torch.channels_last), torch.randn(6, 2, generator=g, dtype=torch.float64),
                     k == poison_step))
    return data


def _loss(model, x, t, poison: bool):
    loss = ((model(x) - t) ** 2).mean()
    return loss * float("inf") if poison else loss


def _run(monkeypatch, *, accelerator: bool, impl: str, api: str, policy: str, poison_step: int | None):
    model = MixedNet()
    assert not model.conv.weight.is_contiguous()  # channels_last
    sam = sam_torch.SAM(
        model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, rho=0.2,
        adaptive=True, perturb_impl=impl, skip_nonfinite=policy,
    )
    reads, skipped = [], []
    for x, t, poison in _data(poison_step):
        with monkeypatch.context() as m:
            if accelerator:
                m.setattr(sam_torch._sam, "_sync_is_cheap", lambda device: False)
            counter = _HostReads(m, forbid=False)
            if api == "closure":

                calls: list[int] = []

                def closure(x=x, t=t, poison=poison, calls=calls):
                    loss = _loss(model, x, t, poison and not calls)  # inf in the clean pass
                    calls.append(1)
                    loss.backward()
                    return loss

                sam.step(closure)
            else:
                loss = _loss(model, x, t, poison)
                loss.backward()
                before = counter.count
                sam.first_step(zero_grad=True, loss=loss if api == "two_step_loss" else None)
                if accelerator:
                    assert counter.count == before  # first_step() does not sync there
                perturbed = _loss(model, x, t, False)
                perturbed.backward()
                sam.second_step(zero_grad=True, loss=perturbed if api == "two_step_loss" else None)
        reads.append(counter.count)
        skipped.append(sam.step_skipped)
    return model, sam, reads, skipped


def _snapshot(model, sam):
    weights = [p.detach().clone() for p in model.parameters()]
    state = [sam.state[p]["momentum_buffer"].clone() for p in model.parameters() if p in sam.state]
    return weights + state


@pytest.mark.parametrize("poison_step", [None, 1], ids=["finite", "inf-clean-pass"])
@pytest.mark.parametrize("policy", ["clean", "both"])
@pytest.mark.parametrize("api", ["closure", "two_step_loss", "two_step"])
@pytest.mark.parametrize("impl", ["foreach", "per_tensor"])
def test_accelerator_path_on_cpu_gives_the_cpu_numbers_with_one_host_read(monkeypatch, impl, api, policy, poison_step):
    acc_model, acc_sam, acc_reads, acc_skipped = _run(
        monkeypatch, accelerator=True, impl=impl, api=api, policy=policy, poison_step=poison_step
    )
    cpu_model, cpu_sam, _, cpu_skipped = _run(
        monkeypatch, accelerator=False, impl=impl, api=api, policy=policy, poison_step=poison_step
    )
    assert acc_skipped == cpu_skipped == [k == poison_step for k in range(STEPS)]
    for a, c in zip(_snapshot(acc_model, acc_sam), _snapshot(cpu_model, cpu_sam), strict=True):
        # Only where the flags are read differs, and the per-tensor kernels off the host
        # (addcmul by a 0-d scale instead of add with alpha): last-bit differences at most.
        rtol = 1e-6 if a.dtype == torch.float32 else 1e-14
        torch.testing.assert_close(a, c, rtol=rtol, atol=0)
        if impl == "foreach":
            assert torch.equal(a, c)
    # One host read per step, in second_step(); a step found non-finite by the read-only
    # check confirms it with the exact one (a second read, on that step only).
    for k, n in enumerate(acc_reads):
        assert n == 1 or (k == poison_step and n == 2), acc_reads


def test_foreach_and_per_tensor_agree_on_the_accelerator_path(monkeypatch):
    runs = [
        _run(monkeypatch, accelerator=True, impl=impl, api="closure", policy="clean", poison_step=None)
        for impl in ("foreach", "per_tensor")
    ]
    (fm, fs, _, _), (pm, ps, _, _) = runs
    for a, b in zip(_snapshot(fm, fs), _snapshot(pm, ps), strict=True):
        rtol = 1e-5 if a.dtype == torch.float32 else 1e-12
        torch.testing.assert_close(a, b, rtol=rtol, atol=0)


# -- TorchOps kernels, one by one ----------------------------------------------------------
SHAPES = [(5, 4), (3,), (), (2, 3, 3, 2), (20000,)]  # (20000,): above SMALL_NUMEL


def _tensors(seed: int, dtype: torch.dtype, channels_last: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]
    if channels_last:
        ts[3] = ts[3].contiguous(memory_format=torch.channels_last)
    return ts


def _np(ts):
    return [t.double().numpy().copy() for t in ts]


def _close(actual, expected, dtype):
    rtol = 1e-6 if dtype == torch.float32 else 1e-14
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a.double().numpy(), e, rtol=rtol, atol=rtol * max(1.0, np.abs(e).max(initial=0)))


OPS = [
    pytest.param(dict(foreach=True, host_reads=False), id="foreach"),
    pytest.param(dict(foreach=False, host_reads=False), id="per_tensor-device-scalar"),
    pytest.param(dict(foreach=False, host_reads=True), id="per_tensor-host-scalar"),
]
LAYOUTS = [
    pytest.param(torch.float64, False, id="float64"),
    pytest.param(torch.float32, False, id="float32"),
    pytest.param(torch.float64, True, id="float64-channels_last"),
]


@pytest.mark.parametrize(("dtype", "channels_last"), LAYOUTS)
@pytest.mark.parametrize("kind", OPS)
def test_reductions(kind, dtype, channels_last):
    ops = TorchOps(torch.device("cpu"), dtype, **kind)
    xs, ys = _tensors(0, dtype, channels_last), _tensors(1, dtype, channels_last)
    xn, yn = _np(xs), _np(ys)
    rtol = 1e-5 if dtype == torch.float32 else 1e-13
    assert float(ops.sum_of_squares(xs)) == pytest.approx(sum(float(np.sum(a * a)) for a in xn), rel=rtol)
    assert float(ops.dot(xs, ys)) == pytest.approx(sum(float(np.sum(a * b)) for a, b in zip(xn, yn, strict=True)), rel=rtol)
    assert float(ops.sum_of_squares([])) == 0.0 and float(ops.dot([], [])) == 0.0
    assert float(ops.sqrt(torch.tensor(2.25, dtype=dtype))) == 1.5


@pytest.mark.parametrize("out", ["none", "fresh", "x"])
@pytest.mark.parametrize(("dtype", "channels_last"), LAYOUTS)
@pytest.mark.parametrize("kind", OPS)
def test_elementwise(kind, dtype, channels_last, out):
    ops = TorchOps(torch.device("cpu"), dtype, **kind)

    def run(op, *, ys=True, extra=()):
        xs, y = _tensors(2, dtype, channels_last), _tensors(3, dtype, channels_last)
        xn, yn = _np(xs), _np(y)
        dest = {"none": None, "fresh": [torch.empty_like(x) for x in xs], "x": xs}[out]
        args = (xs, y, *extra) if ys else (xs, *extra)
        res = getattr(ops, op)(*args, out=dest)
        if dest is not None:
            assert all(r is d for r, d in zip(res, dest, strict=True))
        if out != "x":
            _close(xs, xn, dtype)  # the inputs are left alone
        _close(y, yn, dtype)
        return res, xn, yn

    scale = torch.tensor(-0.37, dtype=ops.acc_dtype)
    res, xn, yn = run("add_scaled", extra=(scale,))
    _close(res, [a - 0.37 * b for a, b in zip(xn, yn, strict=True)], dtype)
    res, xn, _ = run("scale", ys=False, extra=(scale,))
    _close(res, [-0.37 * a for a in xn], dtype)
    res, xn, yn = run("mul")
    _close(res, [a * b for a, b in zip(xn, yn, strict=True)], dtype)
    res, xn, _ = run("abs_add_square", ys=False, extra=(0.25,))
    _close(res, [(np.abs(a) + 0.25) ** 2 for a in xn], dtype)


@pytest.mark.parametrize(("dtype", "channels_last"), LAYOUTS)
@pytest.mark.parametrize("kind", OPS)
def test_add_scaled_into_y(kind, dtype, channels_last):
    """``out`` aliasing ``y``, as SAM's restore-free update of a buffer does."""
    ops = TorchOps(torch.device("cpu"), dtype, **kind)
    xs, ys = _tensors(4, dtype, channels_last), _tensors(5, dtype, channels_last)
    xn, yn = _np(xs), _np(ys)
    res = ops.add_scaled(xs, ys, torch.tensor(0.5, dtype=ops.acc_dtype), out=ys)
    _close(res, [a + 0.5 * b for a, b in zip(xn, yn, strict=True)], dtype)
    _close(xs, xn, dtype)


def test_fused_square_and_two_passes_agree():
    """Off the CPU ``(|x| + c)^2`` is two passes (``add_``, ``mul_``); on the CPU one fused
    kernel: forced here to the two passes, bit for bit the same."""
    xs = _tensors(6, torch.float32, False)
    fused = TorchOps(torch.device("cpu"), torch.float32, foreach=False)
    assert fused._fused_square
    plain = TorchOps(torch.device("cpu"), torch.float32, foreach=False)
    plain._fused_square = False
    a = fused.abs_add_square(xs, 0.01, out=[torch.empty_like(x) for x in xs])
    b = plain.abs_add_square(xs, 0.01, out=[torch.empty_like(x) for x in xs])
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
