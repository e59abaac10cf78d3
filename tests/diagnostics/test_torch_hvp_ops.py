"""The convolutions and eval-mode BatchNorm that sam_torch.diagnostics' HVPs record
(sam_torch._hvp_ops): the same values, gradients and Hessian-vector products as torch's own
operations, in float64, wherever a model may put them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sam_torch._hvp_ops import HVPFriendly


class Mixed(nn.Module):
    """conv1d, conv2d (strided, grouped, dilated, without bias) and conv3d, eval BatchNorm with
    and without affine parameters, and a functional conv2d with string padding."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding=1)
        self.b1 = nn.BatchNorm1d(4)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.b2 = nn.BatchNorm2d(6)
        self.c3 = nn.Conv2d(6, 6, 3, padding=2, dilation=2, bias=False)
        self.b3 = nn.BatchNorm2d(6, affine=False)
        self.same = nn.Parameter(torch.randn(3, 6, 3, 3) / 6)
        self.c4 = nn.Conv3d(1, 2, (1, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1))
        self.head = nn.Linear(2 * 3 * 3 * 5 + 4 * 7, 3)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        seq, img = batch
        a = torch.tanh(self.b1(self.c1(seq)))  # (N, 4, 7)
        b = torch.tanh(self.b2(self.c2(img)))  # (N, 6, 5, 5)
        b = torch.tanh(self.b3(self.c3(b)))
        b = torch.tanh(F.conv2d(b, self.same, padding="same"))  # (N, 3, 5, 5): built-in fallback
        c = torch.tanh(self.c4(b.unsqueeze(1)))  # (N, 2, 3, 3, 5)
        return self.head(torch.cat([a.flatten(1), c.flatten(1)], dim=1))


def _problem():
    torch.manual_seed(0)
    model = Mixed().double()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(5, 2, 7, generator=gen, dtype=torch.float64),
             torch.randn(5, 4, 9, 9, generator=gen, dtype=torch.float64))
    y = torch.randint(0, 3, (5,), generator=gen)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    return model, batch, y, names, params, v


def _loss(model, names, params, batch, y):
    out = torch.func.functional_call(model, dict(zip(names, params, strict=True)), (batch,))
    return F.cross_entropy(out, y)


def _double_backward(friendly: bool):
    model, batch, y, names, params, v = _problem()
    ps = [p.clone().requires_grad_(True) for p in params]
    if friendly:
        with HVPFriendly():
            loss = _loss(model, names, ps, batch, y)
    else:
        loss = _loss(model, names, ps, batch, y)
    grads = torch.autograd.grad(loss, ps, create_graph=True)
    hv = torch.autograd.grad(grads, ps, grad_outputs=v)
    return loss.detach(), [g.detach() for g in grads], list(hv)


def _close(a, b, tol=1e-12):
    for x, z in zip(a, b, strict=True):
        assert float((x - z).abs().max()) <= tol * max(1.0, float(z.abs().max()))


def test_loss_gradient_and_hvp_equal_torchs_own_operations():
    loss0, g0, h0 = _double_backward(False)
    loss1, g1, h1 = _double_backward(True)
    assert abs(float(loss1 - loss0)) < 1e-13
    _close(g1, g0)
    _close(h1, h0)
    assert max(float(h.abs().max()) for h in h0) > 1e-3  # a real product, not zeros


def test_the_reverse_over_reverse_of_torch_func_equals_the_double_backward():
    model, batch, y, names, params, v = _problem()
    _, _, reference = _double_backward(False)

    def loss_of(p):
        return F.cross_entropy(torch.func.functional_call(model, p, (batch,)), y)

    with HVPFriendly():
        _, vjp_fn = torch.func.vjp(torch.func.grad(loss_of), dict(zip(names, params, strict=True)))
    (hv,) = vjp_fn(dict(zip(names, v, strict=True)))
    _close([hv[n] for n in names], reference)


def test_the_mode_records_its_own_operations_and_falls_back_where_it_must():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    with HVPFriendly():
        conv = F.conv2d(x, w, padding=1)
        same = F.conv2d(x, w, padding="same")
        bn_eval = F.batch_norm(x, mean, var, training=False)
        bn_train = F.batch_norm(x, None, None, training=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = F.conv2d(x.float(), w.float(), padding=1)
    assert "_Conv" in type(conv.grad_fn).__name__
    assert "_Conv" not in type(same.grad_fn).__name__  # string padding: torch's convolution
    assert "BatchNorm" not in type(bn_eval.grad_fn).__name__  # the affine map
    assert "BatchNorm" in type(bn_train.grad_fn).__name__  # batch statistics: torch's own
    assert "_Conv" not in type(autocast.grad_fn).__name__  # autocast: torch's convolution
    assert autocast.dtype == torch.bfloat16
    torch.testing.assert_close(conv, F.conv2d(x, w, padding=1), rtol=0, atol=1e-12)
    torch.testing.assert_close(bn_eval, F.batch_norm(x, mean, var, training=False), rtol=0, atol=1e-12)


@pytest.mark.parametrize("needs", ["input", "weight"])
def test_a_convolution_computes_only_the_gradients_asked_for(needs):
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=needs == "input")
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=needs == "weight")
    with HVPFriendly():
        y = F.conv2d(x, w, stride=2, padding=1)
    (g,) = torch.autograd.grad((y * y).sum(), [x if needs == "input" else w], create_graph=True)
    ref_y = F.conv2d(x, w, stride=2, padding=1)
    (ref,) = torch.autograd.grad((ref_y * ref_y).sum(), [x if needs == "input" else w], create_graph=True)
    torch.testing.assert_close(g, ref, rtol=0, atol=1e-10)
    u = torch.randn_like(g)
    (h,) = torch.autograd.grad(g, [x if needs == "input" else w], grad_outputs=u)
    (ref_h,) = torch.autograd.grad(ref, [x if needs == "input" else w], grad_outputs=u)
    torch.testing.assert_close(h, ref_h, rtol=0, atol=1e-10)
