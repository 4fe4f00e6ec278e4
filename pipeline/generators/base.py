"""The one small protocol every variant generator follows.

A generator is built once per worker process (so an ART classifier wrapper or a
feature extractor is created once, not per batch), then called on float
batches in [0, 1]. Randomness comes only from the per-image seeds it is given,
so an image's variant depends on (config, image, seed), never on worker count or
retries. A generator that needs other images than its batch (`style` draws its style
image from the whole split) is handed the split first (`use_split`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from advpipe.errors import ConfigError

if TYPE_CHECKING:
    from advpipe.datasets.base import Source


class GeneratorParams(BaseModel):
    """Parameters of one generator; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Generator(ABC):
    """Turns a clean batch into its perturbed variant.

    Subclasses set `params_model` (their typed parameters) and `backends`
    (the implementations they offer, the first being the default).
    """

    params_model: ClassVar[type[GeneratorParams]] = GeneratorParams
    backends: ClassVar[tuple[str, ...]] = ("art",)
    needs_model: ClassVar[bool] = True
    #: recorded in the manifest: 'attack' variants make up the sampler's default training mix; 'shift'
    #: variants (scenario shifts for the calibrater) are drawn only when the sampler's weights name them
    kind: ClassVar[Literal["attack", "shift"]] = "attack"

    def __init__(self, params: GeneratorParams, model: nn.Module, *, backend: str = "art",
                 device: torch.device | str = "cpu", batch_size: int = 128) -> None:
        try:
            self.params = self.resolve_params(params, backend)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.model = model
        self.backend = backend
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def resolve_params(cls, params: GeneratorParams, backend: str) -> GeneratorParams:
        """Fill backend-dependent defaults (fields left None) and reject values `backend` cannot honour.

        Raises ValueError with a readable message; `validate_variant` turns it into a ConfigError.
        """
        return params

    @abstractmethod
    def generate(self, x: torch.Tensor, y: torch.Tensor, seeds: np.ndarray) -> torch.Tensor:
        """Return the perturbed batch: same shape as `x`, float32 in [0, 1].

        `x` is (N, C, H, W) float32 in [0, 1] on `self.device`, `y` int64 labels,
        `seeds` one uint64 per image. Per-image failures (a non-finite result, e.g. a
        diverged optimisation) are returned as all-NaN rows; the pipeline records them
        and never stores the NaN. An attack that merely fails to fool the model is not
        a failure: it returns its best attempt (C&W: the clean image, as ART does), and
        the success rate recorded in the manifest shows it.
        """

    def use_split(self, source: Source) -> None:
        """The whole split the next batches come from, before they are generated.

        `source` is an `advpipe.datasets.Source`: its labels are in memory, its images are
        read by index (`read`), so a generator may draw single images from a split larger
        than memory. Most generators need only their batch and ignore this; `style` draws
        its style images from it.
        """

    @classmethod
    def fallbacks(cls, split_labels: np.ndarray, labels: np.ndarray) -> int:
        """How many of the images with `labels` get the generator's documented fallback, given
        the labels of their whole split (style: no image of another class exists).

        The manifest records the count per variant and split (stats `fallbacks`). It is a
        function of the labels alone, so it can also be counted for variants that are reused
        rather than generated again; 0 for generators without a fallback.
        """
        return 0

    def describe(self) -> dict[str, Any]:
        """Parameters as stored in the manifest."""
        return self.params.model_dump(mode="json")


def image_generator(seed: int) -> np.random.Generator:
    """A numpy generator for one image, from its 64-bit seed."""
    return np.random.default_rng(np.random.SeedSequence(int(seed)))


def torch_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator for one image, seeded from its 64-bit seed (device-local)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    return generator
