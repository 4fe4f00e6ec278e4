"""LeNet-5 for small images (MNIST-size, digits), with ReLU and max pooling.

Convolutions use same-padding and an adaptive pool feeds C5, so any input of
8x8 or more works: 16x16 digits, 28x28 MNIST and 32x32 CIFAR alike.
"""

from __future__ import annotations

from torch import nn

from advpipe.models.base import StagedModel


class LeNet(StagedModel):
    """Feature levels: C1 (6 x H x W), C3 (16 x H/2 x W/2), C5 (120 x 1 x 1)."""

    arch = "lenet"

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        channels = input_shape[0]
        stages = [
            nn.Sequential(nn.Conv2d(channels, 6, 5, padding=2), nn.ReLU()),
            nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(6, 16, 5, padding=2), nn.ReLU()),
            # C5 is a 5x5 convolution over a 5x5 map, as in LeCun et al. 1998.
            nn.Sequential(nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(5), nn.Conv2d(16, 120, 5), nn.ReLU()),
        ]
        head = nn.Sequential(nn.Flatten(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))
        super().__init__(num_classes, input_shape, stages, head)
