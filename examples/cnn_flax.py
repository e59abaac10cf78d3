"""The small digits CNN of :mod:`examples.cnn_torch` in Flax linen (NHWC inputs).

Same layers, parameter names (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``fc1``, ``fc2``;
:func:`examples.convert.torch_to_flax` maps the PyTorch model's weights onto it) and initial
weights for a seed (:func:`init_variables`). The pooled feature map is flattened in
channel-major order, as PyTorch flattens NCHW, so the dense layer's weights are the same
matrix in both backends. BatchNorm as in :mod:`examples.wrn_flax` (momentum 0.9, epsilon
1e-5, exact variance).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from examples.cnn_init import CNN_CHANNELS, CNN_HIDDEN, init_small_cnn
from examples.wrn_flax import _bn  # the same BatchNorm convention as the WideResNet

__all__ = ["SmallCNN", "init_variables"]


class SmallCNN(nn.Module):
    """Two conv + BatchNorm layers, one hidden dense layer.

    Attributes:
        num_classes: 10 for the digits.
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c1, c2 = CNN_CHANNELS
        pad = ((1, 1), (1, 1))
        y = nn.Conv(c1, (3, 3), padding=pad, use_bias=False, name="conv1")(x)
        y = nn.relu(_bn(train, "bn1")(y))
        y = nn.Conv(c2, (3, 3), padding=pad, use_bias=False, name="conv2")(y)
        y = nn.relu(_bn(train, "bn2")(y))
        y = nn.max_pool(y, (2, 2), strides=(2, 2))
        y = jnp.transpose(y, (0, 3, 1, 2)).reshape(y.shape[0], -1)  # PyTorch's order
        y = nn.relu(nn.Dense(CNN_HIDDEN, name="fc1")(y))
        return nn.Dense(self.num_classes, name="fc2")(y)


def init_variables(
    seed: int, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 8
) -> dict[str, Any]:
    """``{"params", "batch_stats"}`` equal to ``cnn_torch.SmallCNN(seed, ...)``'s initial
    state (:func:`examples.cnn_init.init_small_cnn`, converted to Flax layouts)."""
    w = init_small_cnn(seed, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    params = {
        "conv1": {"kernel": w["conv1.weight"].transpose(2, 3, 1, 0)},
        "bn1": {"scale": w["bn1.weight"], "bias": w["bn1.bias"]},
        "conv2": {"kernel": w["conv2.weight"].transpose(2, 3, 1, 0)},
        "bn2": {"scale": w["bn2.weight"], "bias": w["bn2.bias"]},
        "fc1": {"kernel": w["fc1.weight"].T.copy(), "bias": w["fc1.bias"]},
        "fc2": {"kernel": w["fc2.weight"].T.copy(), "bias": w["fc2.bias"]},
    }
    stats = {
        name: {"mean": np.zeros(c, np.float32), "var": np.ones(c, np.float32)}
        for name, c in (("bn1", CNN_CHANNELS[0]), ("bn2", CNN_CHANNELS[1]))
    }
    return jax.tree.map(jnp.asarray, {"params": params, "batch_stats": stats})
