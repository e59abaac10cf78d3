"""A small CNN for scikit-learn's 8x8 digits in PyTorch, equal to :mod:`examples.cnn_flax`.

``conv3x3(32) - BN - ReLU - conv3x3(64) - BN - ReLU - maxpool 2x2 - dense(128) - ReLU -
dense(classes)``: two convolutions with BatchNorm and one hidden dense layer, about 140k
parameters, enough to memorize noisy labels within a few dozen epochs. Initial weights come
from :func:`examples.cnn_init.init_small_cnn` (PyTorch's default scheme drawn in NumPy), so
both backends start from the same point for a seed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from examples.cnn_init import CNN_CHANNELS, CNN_HIDDEN, init_small_cnn
from examples.wrn_torch import BN_EPS, BN_MOMENTUM

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """Two conv + BatchNorm layers, one hidden dense layer (NCHW inputs).

    Args:
        seed: seed of :func:`examples.cnn_init.init_small_cnn`.
        in_channels: 1 for the digits.
        num_classes: 10 for the digits.
        image_size: input height = width (8 for the digits).
    """

    def __init__(
        self, seed: int = 0, in_channels: int = 1, num_classes: int = 10, image_size: int = 8
    ) -> None:
        super().__init__()
        c1, c2 = CNN_CHANNELS
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.fc1 = nn.Linear(c2 * (image_size // 2) ** 2, CNN_HIDDEN)
        self.fc2 = nn.Linear(CNN_HIDDEN, num_classes)
        init = init_small_cnn(
            seed, in_channels=in_channels, num_classes=num_classes, image_size=image_size
        )
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in init.items():
                params[name].copy_(torch.from_numpy(value))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = torch.flatten(torch.max_pool2d(y, 2), 1)  # channel-major, as NCHW flattens
        return self.fc2(torch.relu(self.fc1(y)))
