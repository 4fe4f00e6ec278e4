"""Caffe's MNIST LeNet (`examples/mnist/lenet_train_test.prototxt`) with the BANG paper's dropout.

conv5x5 20 -> maxpool 2/2 -> conv5x5 50 -> maxpool 2/2 -> fc 500 -> relu -> dropout 0.5 -> fc classes.
No ReLU after the convolutions and no padding, as in the prototxt; weights start from Caffe's
"xavier" filler (uniform in +-sqrt(3 / fan_in)) and biases from 0. Caffe feeds it pixels scaled by
1/256 without a mean, so the model normalises nothing (mean 0, std 1 on [0, 1] inputs).

The BANG paper (seed 002, section 4) added one dropout layer "because BANG tends to cause overfitting
on the trained LeNet networks" and made over-confident models; it does not say where, so it sits
where Caffe's own models put it, after the ReLU of the 500-unit layer (rate 0.5, as in Caffe's
examples). At 28x28 the second pool gives 50 x 4 x 4 = 800 inputs to fc1: 431,080 parameters for
10 classes. Other sizes from 16x16 up work too: an adaptive average pool brings the second pool's
map to 4x4 (the identity at 28x28), so fc1 always has 800 inputs.
"""

from __future__ import annotations

import math

from torch import nn

from advpipe.errors import ModelError
from advpipe.models.base import StagedModel

#: the smallest input side: 16 -> conv 12 -> pool 6 -> conv 2 -> pool 1
MIN_SIZE = 16
DROPOUT = 0.5


class CaffeLeNet(StagedModel):
    """Feature levels: conv1 (20 x 24 x 24 at 28x28), conv2 (50 x 8 x 8), fc1 after its ReLU (500 x 1 x 1)."""

    arch = "caffe_lenet"

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        channels, height, width = input_shape
        if min(height, width) < MIN_SIZE:
            raise ModelError(f"model 'caffe_lenet' needs images of at least {MIN_SIZE}x{MIN_SIZE} (its two 5x5 "
                             f"convolutions have no padding), got {height}x{width}; use 'lenet' for smaller ones")
        stages = [
            nn.Sequential(nn.Conv2d(channels, 20, 5)),
            nn.Sequential(nn.MaxPool2d(2, 2, ceil_mode=True), nn.Conv2d(20, 50, 5)),
            # fc1 ("ip1") as a stage, so that its 500 units are a feature level (a 500 x 1 x 1 map)
            nn.Sequential(nn.MaxPool2d(2, 2, ceil_mode=True), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                          nn.Linear(50 * 4 * 4, 500), nn.ReLU(), nn.Unflatten(1, (500, 1, 1))),
        ]
        head = nn.Sequential(nn.Flatten(), nn.Dropout(DROPOUT), nn.Linear(500, num_classes))
        super().__init__(num_classes, input_shape, stages, head, mean=[0.0] * channels, std=[1.0] * channels)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                fan_in = module.weight[0].numel()
                bound = math.sqrt(3.0 / fan_in)  # Caffe's xavier filler (variance_norm FAN_IN)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)
