"""VGG-16 with batch norm for CIFAR-size inputs (Simonyan & Zisserman 2015).

Each feature level is one block of 3x3 convolutions; its max pool is placed at
the start of the next level (and in the head), so level 1 is the full-resolution
map that style losses want. The classifier is one linear layer on the pooled
512 features, as is usual for CIFAR.
"""

from __future__ import annotations

from torch import nn

from advpipe.models.base import StagedModel, conv_bn

BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG16Cifar(StagedModel):
    """Feature levels at 32x32: 64x32, 128x16, 256x8, 512x4, 512x2."""

    arch = "vgg16_cifar"

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        in_channels = input_shape[0]
        stages: list[nn.Module] = []
        for index, widths in enumerate(BLOCKS):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if index > 0 else []
            for width in widths:
                layers.append(conv_bn(in_channels, width))
                in_channels = width
            stages.append(nn.Sequential(*layers))
        # Adaptive max pool = VGG's last 2x2 max pool at 32x32, and any size still works.
        head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                             nn.Linear(in_channels, num_classes))
        super().__init__(num_classes, input_shape, stages, head)
