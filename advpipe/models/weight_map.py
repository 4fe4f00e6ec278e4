"""Weight-map layers and the paper's skeletons built from them (METHODS.md section 6, seed 004).

A weight-map layer holds a full `D x D` weight map per (output, input) channel
pair (no weight sharing) and a per-pixel bias, multiplies each input channel
elementwise by its maps and reduces with a box filter of ones:

    z[co] = sum_ci W[co, ci] * x[ci]               (one contraction over ci, per pixel)
    smoothing: o = box(z) + b                      unsharp: o = 2 z - box(z) + b

The box filter is linear, so reducing after the channel sum equals the paper's
per-map formulation while never holding the N x C_o x C_i x D x D tensor of
maps. The skeletons of the paper's Tables 1-3 are registry architectures: the
3-layer CNN (weight-map and its 33-channel plain-CNN twin of about equal
FLOPs), and ResNet / DenseNet with all layers or every second one
("alternating") replaced.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advpipe.errors import ModelError
from advpipe.models.base import StagedModel

Reduction = Literal["smoothing", "unsharp"]
Padding = Literal["same", "valid"]
Downsample = Literal["stride", "maxpool", "avgpool"]
#: what a skeleton layer is: a plain convolution or a weight-map layer with one of the two reductions
LayerKind = Literal["conv", "smoothing", "unsharp"]
Layout = Literal["all", "alternate"]

REDUCTIONS: tuple[str, ...] = ("smoothing", "unsharp")
PADDINGS: tuple[str, ...] = ("same", "valid")
DOWNSAMPLES: tuple[str, ...] = ("stride", "maxpool", "avgpool")


class WeightMap2d(nn.Module):
    """Elementwise weight maps + box-filter reduction, for inputs of a fixed spatial size.

    `padding` "same" keeps the size (zero padding k // 2), "valid" shrinks it by k - 1.
    Downsampling by `stride` > 1 either strides the box filter ("stride") or pools
    the full-resolution output with a stride x stride window ("maxpool"/"avgpool");
    the per-pixel bias lives at the resolution it is added at (before pooling).
    """

    def __init__(self, in_channels: int, out_channels: int, input_size: int | Sequence[int],
                 kernel_size: int = 3, *, reduction: Reduction = "smoothing", padding: Padding = "same",
                 stride: int = 1, downsample: Downsample = "stride", name: str = "") -> None:
        super().__init__()
        size = (int(input_size), int(input_size)) if isinstance(input_size, int) else tuple(input_size)
        self.name = name or f"WeightMap2d({in_channels}->{out_channels}, {size[0]}x{size[-1]})"
        self._validate(in_channels, out_channels, size, kernel_size, reduction, padding, stride, downsample)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.input_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.kernel_size, self.reduction, self.padding = int(kernel_size), reduction, padding
        self.stride, self.downsample = int(stride), downsample
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.input_size))
        self.bias = nn.Parameter(torch.empty(out_channels, *self._reduced_size(self._box_stride)))
        self.reset_parameters()

    def _validate(self, in_channels: int, out_channels: int, size: tuple[int, ...], kernel_size: int,
                  reduction: str, padding: str, stride: int, downsample: str) -> None:
        def fail(problem: str) -> ModelError:
            return ModelError(f"weight-map layer '{self.name}': {problem}")

        if in_channels < 1 or out_channels < 1:
            raise fail(f"needs at least one input and output channel, got {in_channels} -> {out_channels}")
        if len(size) != 2 or min(size) < 1:
            raise fail(f"input size must be (height, width) >= 1, got {size}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise fail(f"kernel size must be odd and >= 1 (the unsharp reduction needs a centre pixel), "
                       f"got {kernel_size}")
        for label, value, allowed in (("reduction", reduction, REDUCTIONS), ("padding", padding, PADDINGS),
                                      ("downsample", downsample, DOWNSAMPLES)):
            if value not in allowed:
                raise fail(f"{label} must be one of {', '.join(allowed)}, got '{value}'")
        if stride < 1:
            raise fail(f"stride must be >= 1, got {stride}")
        if padding == "valid" and min(size) < kernel_size:
            raise fail(f"input of {size[0]}x{size[1]} is smaller than the {kernel_size}x{kernel_size} "
                       "box filter with valid padding; use a larger input or padding 'same'")
        reduced = [s - (kernel_size - 1 if padding == "valid" else 0) for s in size]
        if downsample != "stride" and min(reduced) < stride:
            raise fail(f"a {stride}x{stride} pool does not fit the {reduced[0]}x{reduced[1]} output")

    @property
    def _box_stride(self) -> int:
        return self.stride if self.downsample == "stride" else 1

    @property
    def _pad(self) -> int:
        return self.kernel_size // 2 if self.padding == "same" else 0

    def _reduced_size(self, stride: int) -> tuple[int, int]:
        k, pad = self.kernel_size, self._pad
        height, width = self.input_size
        return (height + 2 * pad - k) // stride + 1, (width + 2 * pad - k) // stride + 1

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the output."""
        height, width = self._reduced_size(self._box_stride)
        if self.downsample == "stride":
            return height, width
        return height // self.stride, width // self.stride

    @property
    def fan_in(self) -> int:
        """Inputs one output pixel sees: C_i channels times the k x k window, as for a convolution."""
        return self.in_channels * self.kernel_size ** 2

    def reset_parameters(self) -> None:
        """The paper's initialisation: weights and biases uniform in [-s, s], s = 1 / sqrt(fan_in)."""
        bound = 1.0 / math.sqrt(self.fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, *self.input_size):
            raise ModelError(f"weight-map layer '{self.name}' was built for inputs (C, H, W) = "
                             f"{(self.in_channels, *self.input_size)} but got {tuple(x.shape[1:])}; "
                             "its weight map has one weight per pixel, so the input size is fixed")
        # One contraction over input channels, pixel by pixel: (N, C_i, H, W) x (C_o, C_i, H, W) -> (N, C_o, H, W).
        z = torch.einsum("nihw,oihw->nohw", x, self.weight)
        out = self.reduce(z) + self.bias
        if self.downsample == "maxpool":
            return F.max_pool2d(out, self.stride)
        if self.downsample == "avgpool":
            return F.avg_pool2d(out, self.stride)
        return out

    def reduce(self, z: Tensor) -> Tensor:
        """Box filter of ones (a sum over the k x k window) or the unsharp 2 z - box(z), strided when asked."""
        k, pad, stride = self.kernel_size, self._pad, self._box_stride
        box = F.avg_pool2d(z, k, stride, pad, count_include_pad=True, divisor_override=1)
        if self.reduction == "smoothing":
            return box
        offset = k // 2 - pad  # where the window centre of output (0, 0) sits in z
        height, width = box.shape[-2:]
        centre = z[..., offset:offset + (height - 1) * stride + 1:stride,
                   offset:offset + (width - 1) * stride + 1:stride]
        return 2 * centre - box

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, input_size={self.input_size}, "
                f"kernel_size={self.kernel_size}, reduction={self.reduction}, padding={self.padding}, "
                f"stride={self.stride}, downsample={self.downsample}")


def weight_map_layers(model: nn.Module) -> list[tuple[str, WeightMap2d]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, WeightMap2d)]


def name_weight_maps(model: nn.Module) -> None:
    """Give each weight-map layer its module path, so errors name it the way state dicts do."""
    for name, module in weight_map_layers(model):
        module.name = name


@torch.no_grad()
def check_weight_map_sizes(model: nn.Module, input_shape: tuple[int, int, int]) -> None:
    """Run one zero image through `model` so a weight-map layer built for the wrong size fails now.

    A weight map has one weight per pixel, so a layer whose input size does not
    match raises a ModelError naming it; better at construction than mid-training.
    """
    name_weight_maps(model)
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- skeleton layers


def make_layer(kind: LayerKind, in_channels: int, out_channels: int, size: tuple[int, int], *,
               kernel_size: int = 3, stride: int = 1, padding: Padding = "same",
               downsample: Downsample = "stride", name: str = "") -> tuple[nn.Module, tuple[int, int]]:
    """A plain convolution or a weight-map layer of the same geometry; returns it and its output size."""
    if kind == "conv":
        pad = kernel_size // 2 if padding == "same" else 0
        if min(size) + 2 * pad < kernel_size:
            raise ModelError(f"layer '{name}': input of {size[0]}x{size[1]} is smaller than its "
                             f"{kernel_size}x{kernel_size} kernel; use larger images")
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=pad)
        out = tuple((s + 2 * pad - kernel_size) // stride + 1 for s in size)
        return conv, (out[0], out[1])
    layer = WeightMap2d(in_channels, out_channels, size, kernel_size, reduction=kind, padding=padding,
                        stride=stride, downsample=downsample, name=name)
    return layer, layer.output_size


def layer_kinds(count: int, reduction: Reduction | None, layout: Layout = "all") -> list[LayerKind]:
    """Which of `count` layers are weight maps: none (reduction None), all, or every second one starting at 1."""
    if reduction is None:
        return ["conv"] * count
    return [reduction if layout == "all" or index % 2 == 1 else "conv" for index in range(count)]


def _spatial(input_shape: tuple[int, int, int]) -> tuple[int, int]:
    return (input_shape[1], input_shape[2])


# ---------------------------------------------------------------- Table 1: the 3-layer CNN


class WeightMapCNN(StagedModel):
    """Table 1: three layers (32, 32, 8 channels; 33, 33, 8 for the plain CNN), FC 64, FC classes.

    Kernel size 3 everywhere. Padding follows the paper's parameter counts
    (Table 4 on 28x28 MNIST: plain CNN 261K, smoothing 1.16M, unsharp 1.49M):
    the plain CNN and the smoothing layers use valid padding, the unsharp layers
    same padding (its 2m - m * k needs equal sizes).
    """

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int],
                 reduction: Reduction | None, kernel_size: int = 3) -> None:
        widths = (33, 33, 8) if reduction is None else (32, 32, 8)
        padding: Padding = "same" if reduction == "unsharp" else "valid"
        kind: LayerKind = "conv" if reduction is None else reduction
        stages: list[nn.Module] = []
        channels, size = input_shape[0], _spatial(input_shape)
        for index, width in enumerate(widths):
            layer, size = make_layer(kind, channels, width, size, kernel_size=kernel_size, padding=padding,
                                     name=f"layer {index + 1}")
            stages.append(nn.Sequential(layer, nn.ReLU()))
            channels = width
        head = nn.Sequential(nn.Flatten(), nn.Linear(channels * size[0] * size[1], 64), nn.ReLU(),
                             nn.Linear(64, num_classes))
        super().__init__(num_classes, input_shape, stages, head)
        check_weight_map_sizes(self, self.input_shape)  # type: ignore[arg-type]


# ---------------------------------------------------------------- Table 2: ResNet


class WeightMapResBlock(nn.Module):
    """Two 3x3 layers with ReLU and a residual connection (1x1 projection when shapes change)."""

    def __init__(self, in_channels: int, out_channels: int, size: tuple[int, int], stride: int,
                 kinds: tuple[LayerKind, LayerKind], name: str, downsample: Downsample = "stride") -> None:
        super().__init__()
        self.layer1, mid = make_layer(kinds[0], in_channels, out_channels, size, stride=stride,
                                      downsample=downsample, name=f"{name} layer 1")
        self.layer2, self.output_size = make_layer(kinds[1], out_channels, out_channels, mid,
                                                   name=f"{name} layer 2")
        self.shortcut: nn.Module = (nn.Conv2d(in_channels, out_channels, 1, stride=stride)
                                    if stride != 1 or in_channels != out_channels else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.layer2(F.relu(self.layer1(x))) + self.shortcut(x))


class WeightMapResNet(StagedModel):
    """Table 2: ResBlocks of 8, 16, 32, 64 channels (3, 4, 6, 4 blocks), global average pool, FC.

    The first layer of each later stage halves the size (stride 2). With
    layout "alternate" the second layer of every block is a weight map (layers
    1, 3, 5, ... counting from 0); with "all" every 3x3 layer is. The 1x1
    projections stay convolutions.
    """

    WIDTHS = (8, 16, 32, 64)
    DEPTHS = (3, 4, 6, 4)

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], reduction: Reduction | None,
                 layout: Layout = "all", downsample: Downsample = "stride") -> None:
        kinds = layer_kinds(2 * sum(self.DEPTHS), reduction, layout)
        stages: list[nn.Module] = []
        channels, size, index = input_shape[0], _spatial(input_shape), 0
        for stage, (width, depth) in enumerate(zip(self.WIDTHS, self.DEPTHS, strict=True)):
            blocks = []
            for block in range(depth):
                stride = 2 if stage > 0 and block == 0 else 1
                res = WeightMapResBlock(channels, width, size, stride, (kinds[index], kinds[index + 1]),
                                        f"stage {stage + 1} block {block + 1}", downsample)
                blocks.append(res)
                channels, size, index = width, res.output_size, index + 2
            stages.append(nn.Sequential(*blocks))
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
        super().__init__(num_classes, input_shape, stages, head)
        check_weight_map_sizes(self, self.input_shape)  # type: ignore[arg-type]


# ---------------------------------------------------------------- Table 3: DenseNet


class DenseLayer(nn.Module):
    """One 3x3 layer (growth rate channels) + ReLU whose output is concatenated to its input."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, F.relu(self.layer(x))], dim=1)


class WeightMapDenseNet(StagedModel):
    """Table 3: conv 16 + ReLU, dense blocks of 2, 4, 8, 16 layers (growth 8) with 2x2 max pools between, GAP (256), FC.

    Layers counted from the stem (0) on; "alternate" makes the odd ones weight maps.
    """

    STEM = 16
    GROWTH = 8
    BLOCKS = (2, 4, 8, 16)

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], reduction: Reduction | None,
                 layout: Layout = "all") -> None:
        kinds = layer_kinds(1 + sum(self.BLOCKS), reduction, layout)
        size = _spatial(input_shape)
        stem, size = make_layer(kinds[0], input_shape[0], self.STEM, size, name="stem")
        stages: list[nn.Module] = [nn.Sequential(stem, nn.ReLU())]
        channels, index = self.STEM, 1
        for block, count in enumerate(self.BLOCKS):
            parts: list[nn.Module] = []
            if block > 0:
                if min(size) < 2:
                    raise ModelError(f"dense block {block + 1}: a {size[0]}x{size[1]} map cannot be max "
                                     "pooled 2x2; the DenseNet skeleton needs images of at least 16x16")
                parts.append(nn.MaxPool2d(2))
                size = (size[0] // 2, size[1] // 2)
            for layer_index in range(count):
                layer, _ = make_layer(kinds[index], channels, self.GROWTH, size,
                                      name=f"dense block {block + 1} layer {layer_index + 1}")
                parts.append(DenseLayer(layer))
                channels, index = channels + self.GROWTH, index + 1
            stages.append(nn.Sequential(*parts))
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
        super().__init__(num_classes, input_shape, stages, head)
        check_weight_map_sizes(self, self.input_shape)  # type: ignore[arg-type]


# ---------------------------------------------------------------- registry architectures

Builder = Callable[[int, tuple[int, int, int]], StagedModel]


def _variant(base: type[StagedModel], arch: str, **options: str | None) -> type[StagedModel]:
    """A registry class: `base` with fixed options and a `(num_classes, input_shape)` constructor."""

    def __init__(self: StagedModel, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        base.__init__(self, num_classes, input_shape, **options)  # type: ignore[call-arg]

    name = base.__name__ + "_" + arch
    cls = type(name, (base,), {"arch": arch, "__init__": __init__, "__module__": __name__, "__qualname__": name,
                               "__doc__": f"{base.__doc__}\n\nRegistry variant {options}."})
    globals()[name] = cls  # importable by name, like a class written out
    return cls


def _skeleton_variants() -> list[type[StagedModel]]:
    variants = [_variant(WeightMapCNN, "wm_cnn_conv", reduction=None)]
    variants += [_variant(WeightMapCNN, f"wm_cnn_{r}", reduction=r) for r in REDUCTIONS]
    for family, base in (("resnet", WeightMapResNet), ("densenet", WeightMapDenseNet)):
        variants.append(_variant(base, f"wm_{family}_conv", reduction=None))
        for reduction in REDUCTIONS:
            variants.append(_variant(base, f"wm_{family}_{reduction}", reduction=reduction, layout="all"))
            variants.append(_variant(base, f"wm_{family}_{reduction}_alt", reduction=reduction,
                                     layout="alternate"))
    return variants


#: the weight-map paper's skeletons as registry architectures, `wm_<cnn|resnet|densenet>_<conv|smoothing|unsharp>[_alt]`
#: (`wm_cnn_conv` is the 33-channel plain CNN; `_alt` replaces every second layer)
WEIGHT_MAP_MODELS: tuple[type[StagedModel], ...] = tuple(_skeleton_variants())


def weight_map_arch(skeleton: Literal["cnn", "resnet", "densenet"], reduction: Reduction | None,
                    layout: Layout = "all") -> str:
    """The registry name of a skeleton variant (reduction None: the plain-convolution baseline)."""
    if reduction is None:
        return f"wm_{skeleton}_conv"
    if skeleton == "cnn" and layout == "alternate":
        raise ModelError("the 3-layer CNN skeleton has no alternating variant (the paper replaces all three "
                         "layers); use layout 'all' or the resnet/densenet skeletons")
    return f"wm_{skeleton}_{reduction}" + ("_alt" if layout == "alternate" else "")


def parse_weight_map_arch(arch: str) -> tuple[str, Reduction | None, Layout] | None:
    """(skeleton, reduction or None for the plain twin, layout) of a `wm_*` registry name; None for any other."""
    parts = arch.split("_")
    if len(parts) not in (3, 4) or parts[0] != "wm" or parts[1] not in ("cnn", "resnet", "densenet"):
        return None
    if parts[2] not in ("conv", *REDUCTIONS) or (len(parts) == 4 and (parts[3] != "alt" or parts[2] == "conv")):
        return None
    reduction = None if parts[2] == "conv" else parts[2]
    return parts[1], reduction, "alternate" if len(parts) == 4 else "all"  # type: ignore[return-value]

