"""The small digits CNN's initial weights, drawn in NumPy so both backends start equal.

:class:`examples.cnn_torch.SmallCNN` and :class:`examples.cnn_flax.SmallCNN` load the same
arrays for a seed. The scheme is PyTorch's default for ``Conv2d``/``Linear`` (weights
``kaiming_uniform_(a=sqrt(5))`` and biases, both :math:`U(-1/\\sqrt{\\mathrm{fan\\_in}},
1/\\sqrt{\\mathrm{fan\\_in}})`), BatchNorm scale 1 and bias 0. Flax's own defaults (LeCun
normal kernels, zero biases) give a differently scaled network, on which SAM with the same
rho behaves differently; sharing the draws removes that difference from any comparison of
the backends.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["CNN_CHANNELS", "CNN_HIDDEN", "init_small_cnn", "small_cnn_shapes"]

CNN_CHANNELS = (32, 64)
CNN_HIDDEN = 128


def small_cnn_shapes(
    in_channels: int, num_classes: int, image_size: int
) -> dict[str, tuple[int, ...]]:
    """Parameter names (PyTorch ``state_dict`` keys) and shapes (PyTorch layouts)."""
    c1, c2 = CNN_CHANNELS
    if image_size % 2:
        raise ValueError(f"image_size must be even (one 2x2 max-pool), got {image_size}")
    flat = c2 * (image_size // 2) ** 2
    return {
        "conv1.weight": (c1, in_channels, 3, 3),
        "bn1.weight": (c1,),
        "bn1.bias": (c1,),
        "conv2.weight": (c2, c1, 3, 3),
        "bn2.weight": (c2,),
        "bn2.bias": (c2,),
        "fc1.weight": (CNN_HIDDEN, flat),
        "fc1.bias": (CNN_HIDDEN,),
        "fc2.weight": (num_classes, CNN_HIDDEN),
        "fc2.bias": (num_classes,),
    }


def init_small_cnn(
    seed: int, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 8
) -> dict[str, np.ndarray]:
    """``float32`` initial parameters in PyTorch layout, a pure function of ``seed``.

    Draws in the order of :func:`small_cnn_shapes` from ``numpy.random.default_rng(seed)``.
    """
    rng = np.random.default_rng(seed)
    shapes = small_cnn_shapes(in_channels, num_classes, image_size)
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if name.startswith("bn"):
            value = np.ones(shape) if name.endswith("weight") else np.zeros(shape)
        else:
            layer = name.split(".")[0]
            fan_in = math.prod(shapes[f"{layer}.weight"][1:])
            bound = 1.0 / math.sqrt(fan_in)
            value = rng.uniform(-bound, bound, size=shape)
        out[name] = value.astype(np.float32)
    return out
