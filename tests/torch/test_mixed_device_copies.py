"""Copies between devices block whenever the host reads the result (a CPU target).

``TorchOps._scalar`` moves a group's perturbation scale to the group's device, and
``_finite_flag`` gathers the flags of a mixed-device gradient list on the first one's device;
on a CUDA + CPU group the CPU side reads them at once (``float(scale)``, ``bool(flag)``), so
an asynchronous device-to-host copy could be read before it lands. Without an accelerator
here, the rule is pinned by the arguments of the copies: the meta device stands in for the
accelerator and a spy on ``Tensor.to`` records each copy.
"""

from __future__ import annotations

import pytest
import torch

from sam_torch import TorchOps
from sam_torch._ops import copy_is_non_blocking
from sam_torch._sam import _finite_flag

D = torch.device


@pytest.mark.parametrize(
    ("source", "target", "non_blocking"),
    [
        (D("cpu"), D("cuda", 0), True),  # host -> device: ordered on the device's stream
        (D("cpu"), D("xpu"), True),
        (D("cuda", 0), D("cpu"), False),  # the host reads it next
        (D("mps"), D("cpu"), False),
        (D("cuda", 0), D("cuda", 1), False),
        (D("cpu"), D("cpu"), False),
    ],
)
def test_non_blocking_only_from_host_to_an_accelerator(source, target, non_blocking):
    assert copy_is_non_blocking(source, target) is non_blocking


@pytest.fixture
def copies(monkeypatch):
    """Record ``(source, target, non_blocking)`` of every ``Tensor.to(device, ...)``.

    A copy from the meta device (the stand-in accelerator) returns zeros on the target, so
    the CPU side can go on reading it.
    """
    seen = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, (str, torch.device)):
            target = torch.device(target)
            seen.append((self.device, target, kwargs.get("non_blocking", False)))
            if self.device.type == "meta" and target.type == "cpu":
                return torch.zeros(self.shape, dtype=self.dtype)
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    return seen


def test_scale_copied_to_a_cpu_group_blocks(copies):
    ops = TorchOps(D("cpu"), torch.float32, foreach=False)
    scale = torch.tensor(0.5, device="meta")  # the scale of an accelerator group's norm
    xs = [torch.ones(3)]
    ops.add_scaled(xs, xs, scale, out=[torch.empty(3)])
    assert copies == [(D("meta"), D("cpu"), False)]


def test_scale_copied_to_an_accelerator_group_may_be_asynchronous(copies):
    ops = TorchOps(D("meta"), torch.float32, foreach=True)
    ops._scalar(torch.tensor(0.5))
    assert copies == [(D("cpu"), D("meta"), True)]


def test_finite_flags_gathered_on_the_cpu_block(copies):
    # a CPU gradient first: the flags are gathered on the CPU, which then reads them
    flag = _finite_flag([torch.ones(4), torch.ones(4, device="meta")])
    assert copies[-1] == (D("meta"), D("cpu"), False)
    assert all(nb is False for src, dst, nb in copies if dst.type == "cpu")
    assert flag.device.type == "cpu"


def test_finite_flags_gathered_on_an_accelerator_may_be_asynchronous(copies):
    _finite_flag([torch.ones(4, device="meta"), torch.ones(4)])
    assert (D("cpu"), D("meta"), True) in copies
    assert all(nb is False for src, dst, nb in copies if dst.type == "cpu")
