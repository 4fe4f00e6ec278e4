"""Training-time augmentation "scenario A" (METHODS.md section 1): random resized crop + horizontal flip.

Applied to whole batches on the device, after the store's variants are drawn, so an adversarial
variant is augmented like its clean image. The randomness is a pure function of (seed, step): a
resumed run augments exactly as an uninterrupted one, and no global RNG state is touched.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from advpipe.batch import Batch

SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop's defaults
RATIO = (3 / 4, 4 / 3)


def scenario_a(batch: Batch, seed: int, step: int) -> Batch:
    """Each image cropped to a random area and aspect ratio, resized back, and flipped with p = 0.5."""
    x = batch.x
    n, _, height, width = x.shape
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    area = torch.empty(n).uniform_(*SCALE, generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(RATIO[0]), math.log(RATIO[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    crop_w = torch.sqrt(area * aspect).clamp(max=1.0)  # as fractions of the side
    crop_h = torch.sqrt(area / aspect).clamp(max=1.0)
    centre_x = (torch.rand(n, generator=generator) * (1 - crop_w) + crop_w / 2) * 2 - 1
    centre_y = (torch.rand(n, generator=generator) * (1 - crop_h) + crop_h / 2) * 2 - 1
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = crop_w * flip
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = crop_h
    theta[:, 1, 2] = centre_y
    grid = F.affine_grid(theta.to(x.device, x.dtype), [n, x.shape[1], height, width], align_corners=False)
    warp = lambda images: F.grid_sample(images, grid, mode="bilinear", padding_mode="border",  # noqa: E731
                                        align_corners=False).clamp_(0, 1)
    return replace(batch, x=warp(x), x_clean=None if batch.x_clean is None else warp(batch.x_clean))
