"""CIFAR-10-C style common corruptions on torch tensors, seeded.

The parameters are those of CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019; `make_cifar_c.py`), five
severities each. The `imagecorruptions` package does not work with current scikit-image and is tuned
for large images, so the nine corruptions used here are written on torch and PIL:

    x = corrupt(images, "shot_noise", severity=3, generator=torch.Generator().manual_seed(0))

`images` are float (N, C, H, W) in [0, 1] with C = 1 or 3; the result has the same shape and, as
CIFAR-10-C stores its images, 8-bit values (rounded). Every random draw comes from `generator`, on
the CPU, so a corruption is the same on every device and every run.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from advpipe.errors import ConfigError

#: name -> the five severities' parameters (CIFAR-10-C's values)
SEVERITIES: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # standard deviation
    "shot_noise": (500, 250, 100, 75, 50),  # photons per unit intensity
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # share of salt-and-pepper values
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # disk radius, anti-alias sigma
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor towards the per-channel mean
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to the HSV value
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # down-scaling factor (box filter)
}


def corrupt(x: Tensor, name: str, severity: int, generator: torch.Generator) -> Tensor:
    """`x` under corruption `name` at `severity` (1-5), values rounded to 8 bits."""
    if name not in SEVERITIES:
        raise ConfigError(f"unknown corruption '{name}' (known: {', '.join(SEVERITIES)})")
    if not 1 <= int(severity) <= 5:
        raise ConfigError(f"corruption severity must be 1-5, got {severity}")
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ConfigError(f"corruptions need (N, C, H, W) images with 1 or 3 channels, got {tuple(x.shape)}")
    parameter = SEVERITIES[name][int(severity) - 1]
    out = CORRUPTIONS[name](x.detach().float().cpu(), parameter, generator)
    return to_8bit(out.clamp(0.0, 1.0)).to(x.device)


def to_8bit(x: Tensor) -> Tensor:
    return (x * 255).round() / 255


def gaussian_noise(x: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    return x + sigma * torch.randn(x.shape, generator=generator)


def shot_noise(x: Tensor, photons: float, generator: torch.Generator) -> Tensor:
    return torch.poisson(x * photons, generator=generator) / photons


def impulse_noise(x: Tensor, amount: float, generator: torch.Generator) -> Tensor:
    """scikit-image's `random_noise(mode='s&p')`: each value is replaced with probability `amount`, half by 1."""
    flipped = torch.rand(x.shape, generator=generator) <= amount
    salted = torch.rand(x.shape, generator=generator) <= 0.5
    out = x.clone()
    out[flipped & salted] = 1.0
    out[flipped & ~salted] = 0.0
    return out


def defocus_blur(x: Tensor, parameter: tuple[float, float], generator: torch.Generator) -> Tensor:
    radius, alias_blur = parameter
    return _filter(x, torch.from_numpy(disk(radius, alias_blur)).float(), "reflect")


def gaussian_blur(x: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """scipy's gaussian_filter as scikit-image calls it: truncate at 4 sigma, edges repeated ('nearest')."""
    radius = int(4.0 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    return _filter(x, torch.from_numpy(np.outer(taps, taps)).float(), "replicate")


def contrast(x: Tensor, factor: float, generator: torch.Generator) -> Tensor:
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * factor + means


def brightness(x: Tensor, shift: float, generator: torch.Generator) -> Tensor:
    """Add `shift` to the HSV value, keeping hue and saturation (grey images: to the intensity).

    With hue and saturation fixed, RGB is proportional to the value V, so the new image is
    rgb * V' / V; a black pixel (V = 0, saturation 0 in HSV) becomes grey V'.
    """
    value = x.amax(dim=1, keepdim=True)
    new_value = (value + shift).clamp(0.0, 1.0)
    scale = torch.where(value > 0, new_value / value.clamp_min(1e-12), torch.zeros_like(value))
    return torch.where(value > 0, x * scale, new_value.expand_as(x))


def jpeg_compression(x: Tensor, quality: int, generator: torch.Generator) -> Tensor:
    def encode(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=int(quality))
        return Image.open(buffer)

    return _per_image(x, encode)


def pixelate(x: Tensor, factor: float, generator: torch.Generator) -> Tensor:
    height, width = x.shape[-2:]
    small = (max(1, int(width * factor)), max(1, int(height * factor)))
    return _per_image(x, lambda image: image.resize(small, Image.BOX).resize((width, height), Image.BOX))


def disk(radius: float, alias_blur: float) -> np.ndarray:
    """CIFAR-10-C's anti-aliased disk kernel: a normalised disk, blurred by a 3x3 Gaussian of `alias_blur`.

    OpenCV's GaussianBlur(ksize=3) with its default reflect-101 border, written in numpy; the
    kernel is then trimmed to its non-zero support (it is symmetric, so the trim is too).
    """
    span = np.arange(-8, 9) if radius <= 8 else np.arange(-int(radius), int(radius) + 1)
    size = 3 if radius <= 8 else 5
    xs, ys = np.meshgrid(span, span)
    kernel = ((xs ** 2 + ys ** 2) <= radius ** 2).astype(np.float64)
    kernel /= kernel.sum()
    half = size // 2
    taps = np.exp(-0.5 * (np.arange(-half, half + 1) / alias_blur) ** 2)
    taps /= taps.sum()
    padded = np.pad(kernel, half, mode="reflect")
    rows = sum(taps[i] * padded[i:i + kernel.shape[0], :] for i in range(size))
    kernel = sum(taps[i] * rows[:, i:i + kernel.shape[1]] for i in range(size))
    nonzero = np.flatnonzero(kernel.any(axis=0))
    trim = int(nonzero[0]) if len(nonzero) else 0
    return kernel[trim:kernel.shape[0] - trim, trim:kernel.shape[1] - trim]


def _filter(x: Tensor, kernel: Tensor, padding: str) -> Tensor:
    """Correlate every channel with `kernel` (odd, square), padding the edges as `padding` says."""
    pad = kernel.shape[-1] // 2
    if pad == 0:
        return x * kernel.reshape(())
    if padding == "reflect" and pad >= min(x.shape[-2:]):  # reflection needs a pad smaller than the image
        padding = "replicate"
    channels = x.shape[1]
    weight = kernel.to(x.dtype).expand(channels, 1, *kernel.shape).contiguous()
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode=padding), weight, groups=channels)


def _per_image(x: Tensor, transform: Callable[[Image.Image], Image.Image]) -> Tensor:
    """Apply a PIL transform to each 8-bit image ('L' for one channel, 'RGB' for three)."""
    pixels = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for image in pixels:
        pil = Image.fromarray(image[..., 0], "L") if image.shape[-1] == 1 else Image.fromarray(image, "RGB")
        array = np.asarray(transform(pil).convert(pil.mode), dtype=np.float32) / 255
        out.append(array[..., None] if array.ndim == 2 else array)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


CORRUPTIONS: dict[str, Callable[[Tensor, object, torch.Generator], Tensor]] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur, "gaussian_blur": gaussian_blur, "contrast": contrast,
    "brightness": brightness, "jpeg_compression": jpeg_compression, "pixelate": pixelate,
}
