"""Scenario-B distribution shifts for the calibrater (METHODS.md section 1 and section 7).

`b1`: rotation up to 15 degrees + colour jitter (brightness, contrast, saturation 0.8).
`b2`: rotation up to 20 degrees + colour jitter (2, 2, 2).

Like torchvision's `RandomRotation` + `ColorJitter`, but every random draw (angle, the
jitter factors and the order of the jitter operations) comes from the image's own
seeded numpy generator, never from torch's global RNG, so each image's variant depends
only on its seed. Saturation and hue need colour: on 1-channel images they are skipped
(their factors are still drawn, so the other draws do not depend on the channel count).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from advpipe.pipeline.generators.base import Generator, GeneratorParams, image_generator
from advpipe.pipeline.generators.common import finalize, seed_list

_INTERPOLATION = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR}


class ShiftParams(GeneratorParams):
    """Ranges as in torchvision: angle ~ U(-degrees, degrees); a factor f ~ U(max(0, 1 - f), 1 + f)."""

    degrees: float = Field(default=15.0, ge=0.0, le=180.0)
    brightness: float = Field(default=0.8, ge=0.0)
    contrast: float = Field(default=0.8, ge=0.0)
    saturation: float = Field(default=0.8, ge=0.0)
    hue: float = Field(default=0.0, ge=0.0, le=0.5, description="hue shift ~ U(-hue, hue)")
    #: torchvision's RandomRotation default; corners are filled with 0.
    interpolation: Literal["nearest", "bilinear"] = "nearest"


class B1Params(ShiftParams):
    pass


class B2Params(ShiftParams):
    degrees: float = Field(default=20.0, ge=0.0, le=180.0)
    brightness: float = Field(default=2.0, ge=0.0)
    contrast: float = Field(default=2.0, ge=0.0)
    saturation: float = Field(default=2.0, ge=0.0)


def _factor(rng: np.random.Generator, spread: float) -> float:
    return float(rng.uniform(max(0.0, 1.0 - spread), 1.0 + spread))


def shift_image(image: torch.Tensor, params: ShiftParams, rng: np.random.Generator) -> torch.Tensor:
    """Rotate, then apply the jitter operations in a random order (as ColorJitter does)."""
    angle = float(rng.uniform(-params.degrees, params.degrees))
    factors = {
        "brightness": _factor(rng, params.brightness),
        "contrast": _factor(rng, params.contrast),
        "saturation": _factor(rng, params.saturation),
        "hue": float(rng.uniform(-params.hue, params.hue)),
    }
    names = list(factors)
    order = [names[i] for i in rng.permutation(len(names))]
    out = TF.rotate(image, angle, interpolation=_INTERPOLATION[params.interpolation], fill=0.0)
    colour = image.shape[0] == 3
    for name in order:
        if name == "brightness":
            out = TF.adjust_brightness(out, factors[name])
        elif name == "contrast":
            out = TF.adjust_contrast(out, factors[name])
        elif colour and name == "saturation":
            out = TF.adjust_saturation(out, factors[name])
        elif colour and name == "hue" and params.hue > 0:
            out = TF.adjust_hue(out, factors[name])
    return out


class ShiftGenerator(Generator):
    """Applies `shift_image` to each image with its own seeded generator (no model needed).

    One pure-torch implementation (backend `native`, the default).
    """

    backends: ClassVar[tuple[str, ...]] = ("native",)  # plain PyTorch
    needs_model: ClassVar[bool] = False
    kind: ClassVar[Literal["attack", "shift"]] = "shift"  # a scenario shift: out of the sampler's default mix
    name: ClassVar[str] = "shift"
    params: ShiftParams

    def generate(self, x: torch.Tensor, y: torch.Tensor, seeds: np.ndarray) -> torch.Tensor:
        if x.shape[1] not in (1, 3):
            raise ValueError(f"{self.name}: images must have 1 or 3 channels, got {x.shape[1]}")
        out = torch.empty_like(x)
        for i, seed in enumerate(seed_list(x, seeds)):
            out[i] = shift_image(x[i], self.params, image_generator(seed))
        return finalize(out, x, self.name)


class ScenarioB1Generator(ShiftGenerator):
    params_model: ClassVar[type[GeneratorParams]] = B1Params
    name: ClassVar[str] = "b1"


class ScenarioB2Generator(ShiftGenerator):
    params_model: ClassVar[type[GeneratorParams]] = B2Params
    name: ClassVar[str] = "b2"
