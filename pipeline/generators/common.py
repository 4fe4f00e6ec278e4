"""Helpers shared by the generators: parameter types, output checks, autograd context.

Nothing here imports ART, so validating a config stays light.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Annotated

import numpy as np
import torch
from pydantic import AfterValidator, Field
from torch import nn

logger = logging.getLogger(__name__)


def _pixel_budget(value: float) -> float:
    # Inputs are in [0, 1], so a budget above 1 is a unit mistake (0-255 scale), not a strong attack.
    if not 0.0 < value <= 1.0:
        raise ValueError("must be > 0 and <= 1 (pixel units for images in [0, 1])")
    return value


#: A perturbation size in pixel units: (0, 1].
PixelBudget = Annotated[float, AfterValidator(_pixel_budget)]
#: An iteration count: at least 1, and not absurdly many.
Iterations = Annotated[int, Field(ge=1, le=100_000)]


def finalize(x_out: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """Return `x_out` as float32 in [0, 1] on `like`'s device, with failed images as NaN rows.

    A row with any non-finite value (e.g. a diverged optimisation) becomes all NaN so that
    the pipeline can record it as a failure instead of storing garbage or a clipped artefact.
    """
    out = x_out.detach().to(device=like.device, dtype=torch.float32).reshape(like.shape)
    bad = ~torch.isfinite(out.flatten(1)).all(dim=1)
    out = out.clamp(0.0, 1.0)
    if bool(bad.any()):
        logger.warning("%s: %d of %d images failed (non-finite result)", name, int(bad.sum()), len(out))
        out[bad] = float("nan")
    return out


@contextlib.contextmanager
def gradients_on(model: nn.Module | None = None) -> Iterator[None]:
    """Enable autograd for an attack even if the caller runs under no_grad/inference_mode.

    The model's parameters are frozen meanwhile (gradients w.r.t. the input only, which
    skips the weight-gradient kernels) and their flags are restored afterwards.
    """
    params = [p for p in model.parameters() if p.requires_grad] if model is not None else []
    with torch.inference_mode(False), torch.enable_grad():
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)


def seed_list(x: torch.Tensor, seeds: np.ndarray) -> list[int]:
    """The per-image seeds as Python ints, checked against the batch size."""
    if len(seeds) != len(x):
        raise ValueError(f"got {len(seeds)} seeds for a batch of {len(x)} images")
    return [int(seed) for seed in seeds]
