"""Caffe's `cifar10_quick` network, the source model of several adversarial-training papers.

conv5x5 32 -> maxpool 3/2 -> relu -> conv5x5 32 -> relu -> avgpool 3/2 ->
conv5x5 64 -> relu -> avgpool 3/2 -> fc 64 -> fc classes (no ReLU between the
two fully connected layers, as in the prototxt). Pools use ceil mode because
Caffe rounds pooled sizes up (32 -> 16 -> 8 -> 4).
"""

from __future__ import annotations

from torch import nn

from advpipe.models.base import StagedModel


class CaffeQuick(StagedModel):
    """Feature levels: 32 x H/2, 32 x H/4, 64 x H/8."""

    arch = "caffe_quick"

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        channels = input_shape[0]
        stages = [
            nn.Sequential(nn.Conv2d(channels, 32, 5, padding=2),
                          nn.MaxPool2d(3, 2, ceil_mode=True), nn.ReLU()),
            nn.Sequential(nn.Conv2d(32, 32, 5, padding=2), nn.ReLU(),
                          nn.AvgPool2d(3, 2, ceil_mode=True)),
            nn.Sequential(nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(),
                          nn.AvgPool2d(3, 2, ceil_mode=True)),
        ]
        # The adaptive pool is the identity at 32x32 (Caffe's 4x4) and lets other sizes work.
        head = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, 64),
                             nn.Linear(64, num_classes))
        super().__init__(num_classes, input_shape, stages, head)
