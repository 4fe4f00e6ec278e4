"""The common base of every source classifier.

Attacks, stores and samplers all work in [0, 1] pixel space, so a model takes
raw [0, 1] inputs and normalises them itself (per-channel mean/std buffers).
That way an eps of 0.03 means the same thing for every model, and nothing
outside the model needs to know its normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

#: default per-channel mean/std: maps [0, 1] to [-1, 1] whatever the dataset
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.5


class SourceModel(nn.Module):
    """A classifier on [0, 1] inputs of shape (N, C, H, W) returning logits.

    `features(x)` returns intermediate feature maps, shallow to deep, as 4D
    tensors: the detector head (METHODS.md section 3) and the style generator
    read them. Subclasses implement `forward_with_features`; `StagedModel`
    covers models that are a chain of stages plus a head.
    """

    arch: str = ""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int],
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        channels = input_shape[0]
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(v) for v in input_shape)
        mean = [DEFAULT_MEAN] * channels if mean is None else list(mean)
        std = [DEFAULT_STD] * channels if std is None else list(std)
        # Buffers, so they follow .to(device) and are saved (and fingerprinted) with the weights.
        self.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("input_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.input_mean) / self.input_std

    def forward_with_features(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """(feature maps shallow -> deep, logits) from one pass, for methods that need both."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_features(x)[1]

    def features(self, x: Tensor) -> list[Tensor]:
        return self.forward_with_features(x)[0]

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_classes={self.num_classes}, input_shape={self.input_shape}"


class StagedModel(SourceModel):
    """A model written as `stages` (each output is one feature level) followed by a `head`.

    The head takes the deepest map to logits; `features` skips it, so reading
    feature maps costs no more than the convolutions.
    """

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int],
                 stages: Sequence[nn.Module], head: nn.Module, **norm: Sequence[float] | None) -> None:
        super().__init__(num_classes, input_shape, **norm)
        self.stages = nn.ModuleList(stages)
        self.head = head

    def features(self, x: Tensor) -> list[Tensor]:
        maps = []
        h = self.normalize(x)
        for stage in self.stages:
            h = stage(h)
            maps.append(h)
        return maps

    def forward_with_features(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        maps = self.features(x)
        return maps, self.head(maps[-1])

    def forward(self, x: Tensor) -> Tensor:
        h = self.normalize(x)
        for stage in self.stages:
            h = stage(h)
        return self.head(h)


def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
            groups: int = 1, relu: bool = True) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ ReLU). ReLUs are never in-place so per-layer hooks stay valid."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                  groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def pooled_linear(in_features: int, num_classes: int) -> nn.Sequential:
    """Global average pooling + linear classifier, the head of the ResNet/MobileNet/VGG models."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_features, num_classes))
