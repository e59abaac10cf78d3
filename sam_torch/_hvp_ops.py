r"""Convolutions and eval-mode BatchNorm with a cheaper second derivative, for Hessian-vector products.

A Hessian-vector product by reverse over reverse (the double backward, or ``torch.func.vjp``
of the gradient) differentiates each layer's backward pass. For a convolution
:math:`y = x \star w` the backward gives :math:`g_x = J_x(w)^\top g_y` and
:math:`g_w = J_w(x)^\top g_y`, both bilinear, so with incoming cotangents
:math:`\bar g_x, \bar g_w` their derivatives are

.. math::

    \bar g_y = \bar g_x \star w + x \star \bar g_w, \qquad
    \bar w = J_w(\bar g_x)^\top g_y, \qquad
    \bar x = J_x(\bar g_w)^\top g_y:

two forward convolutions, one weight gradient and one input gradient. PyTorch's built-in
double backward computes the weight-gradient term as a convolution with batch and channels
swapped (the output gradient as a kernel the size of the image), which on CPU costs about
twice the native weight-gradient kernel. :class:`HVPFriendly` routes ``conv1d/2d/3d`` to a
convolution whose backward is itself an ``autograd.Function`` with the derivatives above,
every term one ``aten.convolution`` or ``aten.convolution_backward`` call.

BatchNorm in eval mode is an affine map per channel, :math:`y = x \cdot s + t` with
:math:`s = \gamma / \sqrt{\sigma^2 + \epsilon}` and :math:`t = \beta - \mu s`; the generic
BatchNorm double backward (written for batch statistics) does several full-size passes more.
Under :class:`HVPFriendly` an eval-mode ``batch_norm`` is computed as that affine map.

Both give the same numbers as the built-in operations up to rounding (the tests compare them
in float64); anything else (string padding, autocast, batch statistics) falls back to the
built-in operation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

_aten = torch.ops.aten


def _tuple(value: Any, dims: int) -> list[int]:
    if isinstance(value, int):
        return [value] * dims
    out = [int(v) for v in value]
    return out * dims if len(out) == 1 else out


class _Config:
    """A convolution's static arguments, in the form ``aten.convolution(_backward)`` takes."""

    __slots__ = ("dilation", "groups", "output_padding", "padding", "stride")

    def __init__(self, dims: int, stride: Any, padding: Any, dilation: Any, groups: int) -> None:
        self.stride = _tuple(stride, dims)
        self.padding = _tuple(padding, dims)
        self.dilation = _tuple(dilation, dims)
        self.groups = int(groups)
        self.output_padding = [0] * dims

    def conv(self, x: Tensor, w: Tensor) -> Tensor:
        return _aten.convolution(x, w, None, self.stride, self.padding, self.dilation, False,
                                 self.output_padding, self.groups)

    def backward(self, gy: Tensor, x: Tensor, w: Tensor, input_grad: bool, weight_grad: bool
                 ) -> tuple[Tensor | None, Tensor | None]:
        gx, gw, _ = _aten.convolution_backward(gy, x, w, None, self.stride, self.padding, self.dilation,
                                               False, self.output_padding, self.groups,
                                               [input_grad, weight_grad, False])
        return gx, gw


class _ConvGrads(torch.autograd.Function):
    """``(g_y, x, w) -> (g_x, g_w)`` of a convolution, with the bilinear derivatives above
    (each of the two only where asked: ``None`` otherwise)."""

    @staticmethod
    def forward(gy: Tensor, x: Tensor, w: Tensor, cfg: _Config, input_grad: bool, weight_grad: bool
                ) -> tuple[Tensor | None, Tensor | None]:
        return cfg.backward(gy, x, w, input_grad, weight_grad)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        gy, x, w, cfg, _, _ = inputs
        ctx.save_for_backward(gy, x, w)
        ctx.cfg = cfg

    @staticmethod
    def backward(ctx: Any, ggx: Tensor | None, ggw: Tensor | None) -> tuple[Any, ...]:
        gy, x, w = ctx.saved_tensors
        cfg: _Config = ctx.cfg
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        bar_gy = bar_x = bar_w = None
        if need_gy:
            if ggx is not None:
                bar_gy = cfg.conv(ggx, w)
            if ggw is not None:
                term = cfg.conv(x, ggw)
                bar_gy = term if bar_gy is None else bar_gy + term
        if need_w and ggx is not None:
            _, bar_w = cfg.backward(gy, ggx, w, False, True)
        if need_x and ggw is not None:
            bar_x, _ = cfg.backward(gy, x, ggw, True, False)
        return bar_gy, bar_x, bar_w, None, None, None


class _Conv(torch.autograd.Function):
    """``aten.convolution`` without bias whose backward is :class:`_ConvGrads` (differentiable)."""

    @staticmethod
    def forward(x: Tensor, w: Tensor, cfg: _Config) -> Tensor:
        return cfg.conv(x, w)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, w, cfg = inputs
        ctx.save_for_backward(x, w)
        ctx.cfg = cfg

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Any, ...]:
        x, w = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        gx, gw = _ConvGrads.apply(gy, x, w, ctx.cfg, need_x, need_w)
        return gx, gw, None


def _conv(dims: int, x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1,
          padding: Any = 0, dilation: Any = 1, groups: int = 1) -> Tensor | None:
    """The convolution through :class:`_Conv`, or ``None`` where the built-in one must run."""
    if isinstance(padding, str) or x.dim() != dims + 2 or torch.is_autocast_enabled(x.device.type):
        return None
    y = _Conv.apply(x, weight, _Config(dims, stride, padding, dilation, groups))
    if bias is not None:
        y = y + bias.view((1, -1) + (1,) * dims)
    return y


def _eval_batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                     weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                     momentum: float | None = 0.1, eps: float = 1e-5) -> Tensor | None:
    """Eval-mode batch norm as its per-channel affine map, or ``None`` for the built-in one."""
    if training or running_mean is None or running_var is None or x.dim() < 2:
        return None
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * scale.view(shape) + shift.view(shape)


_CONVS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3,
          F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


class HVPFriendly(TorchFunctionMode):
    """Within it, convolutions and eval-mode ``batch_norm`` record the cheaper double backward.

    Used around the forward passes whose graph Hessian-vector products differentiate twice;
    first-order evaluations do not need it.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = None
        dims = _CONVS.get(func)
        if dims is not None:
            out = _conv(dims, *args, **kwargs)
        elif func is F.batch_norm:
            out = _eval_batch_norm(*args, **kwargs)
        return func(*args, **kwargs) if out is None else out
