"""Neural style transfer variant (METHODS.md section 1, `style`).

Each image is optimised so that its deep features keep the image's content while the
Gram matrices of its shallow features move toward those of a style image of another
class. Plain SGD (lr 0.1, momentum 0.9, 10 steps) on the pixels, starting from the
image, projected back to [0, 1] after every step.

Loss per image, with both terms normalised so that the weights are relative and do
not depend on the scale of the extractor's features:

    content_weight * sum_l mse(F_l(x'), F_l(x)) / mean(F_l(x)^2)
  + style_weight   * sum_l mse(G_l(x'), G_l(s)) / mse(G_l(x), G_l(s))

where `G_l` is the Gram matrix of level `l` divided by its number of elements, and the
style term therefore starts at `style_weight` per style level.

Style pool: the *whole split* (the pipeline hands it over with `use_split`; only the chosen style
images are read from it, one by index, so the split may be larger than memory). Image i's
style image is drawn, uniformly and with i's own seed, from the images of the split whose
class differs from i's, so the choice depends on the image, its seed and the split, not
on the batch or on the order of the source (a class-sorted ImageFolder source would
otherwise give same-class style images from its batch). Fallback, only when the split
holds no image of another class: the image's own horizontal mirror; such images are
counted (`fallbacks`, in the manifest's per-variant stats) and logged.

Feature extractor: the source model's `features()` (default), or torchvision's VGG19
with a local weights file (`extractor: vgg19`, `vgg19_weights: path`); nothing is ever
downloaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from advpipe.errors import ConfigError, GenerationError
from advpipe.pipeline.generators.base import Generator, GeneratorParams, image_generator
from advpipe.pipeline.generators.common import Iterations, finalize, gradients_on, seed_list

if TYPE_CHECKING:
    from advpipe.datasets.base import Source

Extractor = Callable[[torch.Tensor], list[torch.Tensor]]

log = logging.getLogger(__name__)

#: Indices of relu1_1 ... relu5_1 in torchvision's `vgg19().features`.
VGG19_TAPS = (1, 6, 11, 20, 29)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class StyleParams(GeneratorParams):
    steps: Iterations = 10
    lr: float = Field(default=0.1, gt=0.0, le=100.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    content_weight: float = Field(default=1.0, ge=0.0)
    style_weight: float = Field(default=1.0, ge=0.0)
    #: Indices into the extractor's levels (shallow -> deep; negative counts from the end).
    #: None: content = the deepest level; style = every other level.
    content_layers: tuple[int, ...] | None = None
    style_layers: tuple[int, ...] | None = None
    extractor: Literal["model", "vgg19"] = "model"
    vgg19_weights: Path | None = None

    @model_validator(mode="after")
    def _weights_match_extractor(self) -> StyleParams:
        if self.extractor == "vgg19" and self.vgg19_weights is None:
            raise ValueError("extractor 'vgg19' needs vgg19_weights: a local state-dict file "
                             "(nothing is downloaded)")
        if self.extractor == "model" and self.vgg19_weights is not None:
            raise ValueError("vgg19_weights is only used with extractor 'vgg19'")
        if self.content_layers == () or self.style_layers == ():
            raise ValueError("content_layers and style_layers must not be empty")
        return self


class VGG19Features(nn.Module):
    """relu1_1 ... relu5_1 of VGG19 for inputs in [0, 1]; grey images are repeated to RGB."""

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.body = features[: VGG19_TAPS[-1] + 1]
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h = (x - self.mean) / self.std
        levels = []
        for index, layer in enumerate(self.body):
            h = layer(h)
            if index in VGG19_TAPS:
                levels.append(h)
        return levels


def load_vgg19_features(path: Path) -> VGG19Features:
    """VGG19 from a local state dict: a full torchvision checkpoint or its `features.*` part."""
    import torchvision

    if not path.is_file():
        raise ConfigError(f"vgg19_weights: file not found: {path}")
    vgg = torchvision.models.vgg19(weights=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if all(key.startswith("features.") for key in state):
            vgg.features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()})
        else:
            vgg.load_state_dict(state)
    except (RuntimeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"vgg19_weights: {path} is not a VGG19 state dict: {exc}") from None
    return VGG19Features(vgg.features).eval()


def gram(features: torch.Tensor) -> torch.Tensor:
    """Per-image Gram matrix of a (N, C, H, W) map, divided by C * H * W."""
    flat = features.flatten(2)
    return flat @ flat.transpose(1, 2) / flat[0].numel()


def mean_square(a: torch.Tensor) -> torch.Tensor:
    """Mean of squares per image."""
    return a.pow(2).flatten(1).mean(dim=1)


class StylePool:
    """The labels of a whole split, grouped by class, to draw style images of other classes from.

    The split's indices are sorted by class once; the images of every class but c are
    then the sorted positions outside c's block, so a draw costs O(log classes).
    """

    def __init__(self, labels: np.ndarray) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        self.order = np.argsort(labels, kind="stable")
        self.classes, self.starts, self.counts = np.unique(labels[self.order], return_index=True,
                                                           return_counts=True)
        self.size = len(labels)

    def _block(self, label: int) -> tuple[int, int]:
        """Start and length of `label`'s block in the sorted order (length 0 if absent)."""
        pos = int(np.searchsorted(self.classes, label))
        if pos < len(self.classes) and self.classes[pos] == label:
            return int(self.starts[pos]), int(self.counts[pos])
        return self.size, 0

    def others(self, label: int) -> int:
        """How many images of the split have another class than `label`."""
        return self.size - self._block(label)[1]

    def choose(self, labels: Sequence[int], seeds: Sequence[int]) -> np.ndarray:
        """Split index of each image's style image, drawn uniformly with the image's own seed from
        the images of other classes; -1 where the split has none (the fallback)."""
        chosen = np.full(len(labels), -1, dtype=np.int64)
        for i, (label, seed) in enumerate(zip(labels, seeds, strict=True)):
            start, count = self._block(int(label))
            if self.size == count:
                continue
            k = int(image_generator(seed).integers(self.size - count))
            chosen[i] = self.order[k if k < start else k + count]
        return chosen


class StyleTransferGenerator(Generator):
    """Style transfer from another class's image; see the module docstring."""

    params_model: ClassVar[type[GeneratorParams]] = StyleParams
    backends: ClassVar[tuple[str, ...]] = ("native",)  # plain PyTorch
    needs_model: ClassVar[bool] = True
    params: StyleParams

    def __init__(self, params: GeneratorParams, model: nn.Module, *, backend: str = "art",
                 device: torch.device | str = "cpu", batch_size: int = 128) -> None:
        super().__init__(params, model, backend=backend, device=device, batch_size=batch_size)
        if self.params.extractor == "vgg19":
            assert self.params.vgg19_weights is not None
            self.network: nn.Module = load_vgg19_features(self.params.vgg19_weights)
            extractor: Extractor = self.network
        else:
            if not callable(getattr(model, "features", None)):
                raise ConfigError("style: the source model has no features() method; "
                                  "use extractor 'vgg19' with local weights")
            self.network = model
            extractor = model.features
        self.network.to(self.device).eval()
        self.extract = extractor
        self.content_layers, self.style_layers = self._levels()
        # Record the levels actually used, not None, in the manifest.
        self.params = self.params.model_copy(update={"content_layers": tuple(self.content_layers),
                                                     "style_layers": tuple(self.style_layers)})
        self.split: Source | None = None
        self.pool: StylePool | None = None

    def use_split(self, source: Source) -> None:
        """Draw style images from this split from now on (module docstring)."""
        if self.pool is None or self.split is not source:
            # the worker passes the same split for every shard: the pool is built once per split
            self.split, self.pool = source, StylePool(np.asarray(source.labels))

    @classmethod
    def fallbacks(cls, split_labels: np.ndarray, labels: np.ndarray) -> int:
        pool = StylePool(split_labels)
        return sum(pool.others(int(label)) == 0 for label in labels)

    def style_indices(self, y: torch.Tensor, seeds: np.ndarray) -> np.ndarray:
        """Split index of each image's style image; -1 for the mirror fallback."""
        if self.pool is None:
            raise GenerationError("style: no split to draw style images from; call use_split(images, labels) "
                                  "before generate (the pipeline does)")
        return self.pool.choose([int(label) for label in y.tolist()], seed_list(y, seeds))

    def _style_images(self, x: torch.Tensor, chosen: np.ndarray) -> torch.Tensor:
        """The chosen split images as floats like `x` (x / 255, as the pipeline converts), mirrors for -1."""
        assert self.split is not None
        images = self.split.read(np.maximum(chosen, 0)).transpose(0, 3, 1, 2)  # one image each, by index
        if images.shape[1:] != tuple(x.shape[1:]):
            raise GenerationError(f"style: the split's images are {images.shape[1:]} (C, H, W) but the batch's "
                                  f"are {tuple(x.shape[1:])}")
        style = torch.from_numpy(images.astype(np.float32) / np.float32(255)).to(x.device)
        fallback = torch.from_numpy(chosen < 0).to(x.device)
        if bool(fallback.any()):
            log.warning("style: %d of %d images have no image of another class in the split; using their "
                        "own mirror as the style image", int(fallback.sum()), len(x))
            style[fallback] = x[fallback].flip(-1)
        return style

    def _levels(self) -> tuple[list[int], list[int]]:
        """Resolve the layer indices against the extractor's actual levels."""
        probe = torch.zeros((1, *self._input_shape()), device=self.device)
        with torch.no_grad():
            count = len(self.extract(probe))
        content = self.params.content_layers or (count - 1,)
        style = self.params.style_layers or tuple(range(max(count - 1, 1)))
        resolved = []
        for name, layers in (("content_layers", content), ("style_layers", style)):
            bad = [i for i in layers if not -count <= i < count]
            if bad:
                raise ConfigError(f"style: {name} {bad} out of range: the extractor has {count} levels")
            resolved.append(sorted({i % count for i in layers}))
        return resolved[0], resolved[1]

    def _input_shape(self) -> tuple[int, ...]:
        shape = tuple(int(d) for d in self.model.input_shape)
        if self.params.extractor == "vgg19" and shape[-1] < 16:
            raise ConfigError(f"style: VGG19 needs images of at least 16x16, got {shape}")
        return shape

    def generate(self, x: torch.Tensor, y: torch.Tensor, seeds: np.ndarray) -> torch.Tensor:
        style_images = self._style_images(x, self.style_indices(y, seeds))
        with gradients_on(self.network):
            out = self._transfer(x.clone(), style_images)
        return finalize(out, x, "style")

    def _transfer(self, x: torch.Tensor, style_images: torch.Tensor) -> torch.Tensor:
        p = self.params
        with torch.no_grad():
            start = self.extract(x)
            content = {i: start[i] for i in self.content_layers}
            content_scale = {i: mean_square(start[i]).clamp_min(1e-12) for i in self.content_layers}
            style_feats = self.extract(style_images)
            style = {i: gram(style_feats[i]) for i in self.style_layers}
            style_scale = {i: mean_square(gram(start[i]) - style[i]).clamp_min(1e-12)
                           for i in self.style_layers}

        x_adv = x.clone().requires_grad_(True)
        optimiser = torch.optim.SGD([x_adv], lr=p.lr, momentum=p.momentum)
        for _ in range(p.steps):
            levels = self.extract(x_adv)
            loss = sum(p.content_weight * mean_square(levels[i] - content[i]) / content_scale[i]
                       for i in self.content_layers)
            loss = loss + sum(p.style_weight * mean_square(gram(levels[i]) - style[i]) / style_scale[i]
                              for i in self.style_layers)
            optimiser.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimiser.step()
            with torch.no_grad():
                x_adv.clamp_(0.0, 1.0)
        return x_adv.detach()
