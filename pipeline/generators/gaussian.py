"""Gaussian noise: `clip(x + sigma * n, 0, 1)` with `n ~ N(0, I)` drawn per image from its seed."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from advpipe.pipeline.generators.base import Generator, GeneratorParams, torch_generator
from advpipe.pipeline.generators.common import finalize, seed_list


class GaussianParams(GeneratorParams):
    sigma: float = Field(default=0.1, gt=0.0, le=1.0, description="noise std in pixel units")


class GaussianGenerator(Generator):
    """Additive Gaussian noise (METHODS.md section 1, `gaussian`).

    The noise of each image comes from its own generator seeded with the image's seed,
    drawn on the CPU and then moved to the device, so an image's variant is the same
    whatever the batch, the worker or the device (CUDA generators give other numbers).
    There is one pure-torch implementation (backend `native`, the default).
    """

    params_model: ClassVar[type[GeneratorParams]] = GaussianParams
    backends: ClassVar[tuple[str, ...]] = ("native",)  # plain PyTorch
    needs_model: ClassVar[bool] = False
    #: not an attack on the model, but one of the paper's training perturbations (Table 1), so it stays in
    #: the sampler's default mix, as it always has
    kind: ClassVar[Literal["attack", "shift"]] = "attack"
    params: GaussianParams

    def generate(self, x: torch.Tensor, y: torch.Tensor, seeds: np.ndarray) -> torch.Tensor:
        shape = tuple(x.shape)
        noise = torch.empty(shape, dtype=torch.float32)
        for i, seed in enumerate(seed_list(x, seeds)):
            noise[i] = torch.randn(shape[1:], generator=torch_generator(seed), dtype=torch.float32)
        return finalize(x + self.params.sigma * noise.to(x.device), x, "gaussian")
