"""Benchmark the `art` and `native` backends of DeepFool and C&W side by side.

Trains a small MNIST-like CNN (sklearn digits upscaled to 28x28, two conv layers) for a
few seconds, then runs each backend with its default parameters on the same images in
batches of 128 and prints images/s, the native/ART speed ratio, the success rate
(prediction != label) and the median L2 of successful perturbations.

Single-threaded by default (`torch.set_num_threads(1)`), so the figures compare
implementations rather than thread pools and do not depend on the machine's load.

    .venv/bin/python bench/generate_attacks.py [--images 256] [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advpipe.config import VariantConfig
from advpipe.pipeline.generators import generator_class, validate_variant

# (label, generator, params shared by both backends, extra params for the native run)
CASES = [
    ("deepfool", "deepfool", {}, {}),
    ("deepfool, ART stop rule", "deepfool", {}, {"stop_check": "iterate"}),
    ("cw (L2)", "cw", {}, {}),
]


class SmallCNN(nn.Module):
    """LeNet-like source model with the interface the generators expect."""

    num_classes = 10

    def __init__(self, size: int) -> None:
        super().__init__()
        self.input_shape = (1, size, size)
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * (size // 4) ** 2, 128)
        self.fc2 = nn.Linear(128, self.num_classes)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = F.max_pool2d(F.relu(self.conv1((x - 0.5) / 0.5)), 2)
        b = F.max_pool2d(F.relu(self.conv2(a)), 2)
        return [a, b]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.features(x)[-1].flatten(1))))


def digits(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(data.target)


def train(x: torch.Tensor, y: torch.Tensor, size: int, epochs: int) -> SmallCNN:
    torch.manual_seed(0)
    model = SmallCNN(size)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            idx = order[start:start + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


@dataclass
class Result:
    images_per_s: float
    success: float
    median_l2: float


def measure(model: nn.Module, name: str, backend: str, params: dict, x: torch.Tensor,
            y: torch.Tensor, batch_size: int, device: torch.device) -> Result:
    """Time one backend over all images (construction and a small warm-up excluded)."""
    cls = generator_class(name)
    variant = VariantConfig(generator=name, backend=backend, **params)
    generator = cls(validate_variant(name, variant), model, backend=backend, device=device,
                    batch_size=batch_size)
    seeds = np.arange(len(x), dtype=np.uint64)
    generator.generate(x[:8], y[:8], seeds[:8])
    outs = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(0, len(x), batch_size):
        outs.append(generator.generate(x[i:i + batch_size], y[i:i + batch_size],
                                       seeds[i:i + batch_size]))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    out = torch.cat(outs)
    with torch.no_grad():
        hit = model(out).argmax(1) != y
    l2 = (out - x).flatten(1).norm(dim=1)[hit]
    return Result(len(x) / seconds, hit.float().mean().item(),
                  l2.median().item() if len(l2) else float("nan"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="images attacked per backend")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=28, help="image side (MNIST: 28)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x_all, y_all = digits(args.size)
    model = train(x_all, y_all, args.size, args.epochs).to(device)
    # Attack held-back images: the last `images` digits.
    x, y = x_all[-args.images:].to(device), y_all[-args.images:].to(device)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    print(f"model: SmallCNN {args.size}x{args.size}, clean accuracy {accuracy:.3f} on "
          f"{len(x)} images; batch {args.batch_size}; device {device}; "
          f"torch threads {torch.get_num_threads()}")

    header = (f"{'variant':<26}{'ART img/s':>11}{'native img/s':>14}{'ratio':>8}"
              f"{'ART success':>13}{'native success':>16}{'ART med L2':>12}{'native med L2':>15}")
    print(header)
    print("-" * len(header))
    art_cache: dict[tuple[str, str], Result] = {}
    for label, name, params, native_extra in CASES:
        key = (name, repr(sorted(params.items())))
        if key not in art_cache:
            art_cache[key] = measure(model, name, "art", params, x, y, args.batch_size, device)
        art = art_cache[key]
        native = measure(model, name, "native", {**params, **native_extra}, x, y,
                         args.batch_size, device)
        print(f"{label:<26}{art.images_per_s:>11.1f}{native.images_per_s:>14.1f}"
              f"{native.images_per_s / art.images_per_s:>7.1f}x"
              f"{art.success:>13.3f}{native.success:>16.3f}"
              f"{art.median_l2:>12.4f}{native.median_l2:>15.4f}", flush=True)


if __name__ == "__main__":
    main()
