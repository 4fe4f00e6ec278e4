"""Architecture names -> constructors, and the one function that builds a model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from advpipe.errors import ModelError
from advpipe.models.base import SourceModel
from advpipe.models.caffe_lenet import CaffeLeNet
from advpipe.models.caffe_quick import CaffeQuick
from advpipe.models.lenet import LeNet
from advpipe.models.mobilenet import MobileNetV2Cifar
from advpipe.models.resnet import CifarResNet18, CifarResNet34
from advpipe.models.torchvision_adapter import PREFIX, TorchvisionModel
from advpipe.models.vgg import VGG16Cifar
from advpipe.models.weight_map import WEIGHT_MAP_MODELS

Builder = Callable[[int, tuple[int, int, int]], SourceModel]

BUILDERS: dict[str, Builder] = {
    cls.arch: cls
    for cls in (LeNet, CifarResNet18, CifarResNet34, MobileNetV2Cifar, VGG16Cifar, CaffeQuick, CaffeLeNet,
                *WEIGHT_MAP_MODELS)
}
#: the built-in architectures; any `torchvision:<name>` classifier is accepted too
ARCHITECTURES: tuple[str, ...] = tuple(BUILDERS)


def build_model(arch: str, num_classes: int, input_shape: tuple[int, int, int],
                weights: Path | None = None) -> SourceModel:
    """A freshly initialised model (train mode) for inputs of `input_shape` = (C, H, W) in [0, 1].

    `weights` (a local file) is only meaningful for `torchvision:<name>`; the
    built-in architectures are trained here and restored with load_checkpoint.
    """
    if int(num_classes) < 1:
        raise ModelError(f"model '{arch}' needs at least one class, got num_classes={num_classes}")
    if len(input_shape) != 3 or any(int(v) < 1 for v in input_shape):
        raise ModelError(f"model input shape must be (channels, height, width), got {input_shape}")
    shape = (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
    if arch.startswith(PREFIX):
        return TorchvisionModel(arch.removeprefix(PREFIX), int(num_classes), shape, weights)
    if arch not in BUILDERS:
        raise ModelError(
            f"unknown model architecture '{arch}' (known: {', '.join(ARCHITECTURES)}, "
            f"or {PREFIX}<name> for any torchvision classifier)"
        )
    if weights is not None:
        raise ModelError(
            f"model.weights is only for {PREFIX}<name> models; '{arch}' starts from random weights "
            "(train it with the train-source step)"
        )
    return BUILDERS[arch](int(num_classes), shape)
