"""MobileNetV2 for CIFAR-size inputs (Sandler et al. 2018) with a stride-1 stem.

ImageNet's MobileNetV2 downsamples 32x; at 32x32 that leaves a 1x1 map, so, as
in the common CIFAR variant, the stem and the first 24-channel stage keep
stride 1 and the network downsamples 8x in total.
"""

from __future__ import annotations

from torch import Tensor, nn

from advpipe.models.base import StagedModel, conv_bn, pooled_linear

#: (expansion, out channels, blocks, first stride), grouped into feature levels
LEVELS: tuple[tuple[tuple[int, int, int, int], ...], ...] = (
    ((1, 16, 1, 1),),
    ((6, 24, 2, 1),),
    ((6, 32, 3, 2),),
    ((6, 64, 4, 2), (6, 96, 3, 1)),
    ((6, 160, 3, 2), (6, 320, 1, 1)),
)
STEM = 32
LAST = 1280


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection, residual when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = [] if expansion == 1 else [conv_bn(in_channels, hidden, 1)]
        layers += [conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
                   conv_bn(hidden, out_channels, 1, relu=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return out + x if self.residual else out


class MobileNetV2Cifar(StagedModel):
    """Feature levels at 32x32: 16x32, 24x32, 32x16, 96x8, 1280x4."""

    arch = "mobilenet_v2_cifar"

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        in_channels = STEM
        stages: list[nn.Module] = []
        for index, level in enumerate(LEVELS):
            blocks: list[nn.Module] = [conv_bn(input_shape[0], STEM)] if index == 0 else []
            for expansion, out_channels, count, first_stride in level:
                for block in range(count):
                    stride = first_stride if block == 0 else 1
                    blocks.append(InvertedResidual(in_channels, out_channels, stride, expansion))
                    in_channels = out_channels
            if index == len(LEVELS) - 1:
                blocks.append(conv_bn(in_channels, LAST, 1))
            stages.append(nn.Sequential(*blocks))
        super().__init__(num_classes, input_shape, stages, pooled_linear(LAST, num_classes))
