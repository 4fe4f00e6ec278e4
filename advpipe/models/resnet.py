"""CIFAR ResNet-18/34 (He et al. 2016): 3x3 stem, no max pool, four stages of basic blocks.

Written out rather than borrowed from torchvision because torchvision's blocks
use in-place ReLU and `+=`, which break the per-layer backward hooks that BANG
(METHODS.md section 4) attaches.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from advpipe.models.base import StagedModel, conv_bn, pooled_linear


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_channels, out_channels, stride=stride)
        self.conv2 = conv_bn(out_channels, out_channels, relu=False)
        self.shortcut = (
            conv_bn(in_channels, out_channels, kernel_size=1, stride=stride, relu=False)
            if stride != 1 or in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class CifarResNet(StagedModel):
    """Feature levels: stem (64 x H), then stages of 64/128/256/512 channels at H, H/2, H/4, H/8."""

    WIDTHS = (64, 128, 256, 512)

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int],
                 depths: tuple[int, int, int, int]) -> None:
        stages: list[nn.Module] = [conv_bn(input_shape[0], 64)]
        in_channels = 64
        for index, (width, depth) in enumerate(zip(self.WIDTHS, depths, strict=True)):
            blocks = []
            for block in range(depth):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(in_channels, width, stride))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        super().__init__(num_classes, input_shape, stages, pooled_linear(in_channels, num_classes))


class CifarResNet18(CifarResNet):
    arch = "cifar_resnet18"

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__(num_classes, input_shape, (2, 2, 2, 2))


class CifarResNet34(CifarResNet):
    arch = "cifar_resnet34"

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__(num_classes, input_shape, (3, 4, 6, 3))
