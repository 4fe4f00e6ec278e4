"""Benchmark the `art` and `native` backends of DeepFool and C&W side by side, at equal settings.

Trains a small MNIST-like CNN (sklearn digits upscaled to 28x28, two conv layers) for a
few seconds, then runs both backends of each case on the same held-back images, in the
same batches, and prints per backend: seconds, images/s, success rate and the mean and
median L2 of the successful perturbations.

Equal settings: both backends of a case get the same parameters (for C&W: max_iter,
binary_search_steps, initial_const, confidence; the batch size is shared by every run).
The one exception is C&W's `learning_rate`, which means different things (the start of
ART's per-image line search; native's Adam step), so each backend keeps its own default;
the settings line printed first shows every value used. The C&W rows are the default (a
binary search over c) and the same with one search step (a fixed c, the old default), so
the effect of the search shows too.

Success rate = images the model classified correctly that the variant makes it misclassify,
over the correctly classified images (the manifest's `success_rate`). Single-threaded by
default (`torch.set_num_threads(1)`), so the figures compare implementations rather than
thread pools. ART's C&W with the default search is the slow part: minutes for the default
128 images on one CPU thread (17 minutes on a heavily shared 2-core machine), about 40 s for
512 images on an H200 (`--device cuda`).

    .venv/bin/python bench/generate_attacks.py [--images 128] [--device cpu] [--threads 1]
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

# (label, generator, params for both backends, extra params for the native run only)
CASES = [
    ("deepfool", "deepfool", {}, {}),
    ("deepfool, ART stop rule", "deepfool", {}, {"stop_check": "iterate"}),
    ("cw (default search)", "cw", {}, {}),
    ("cw, 1 search step", "cw", {"binary_search_steps": 1}, {}),
]
#: C&W parameters printed in the settings line, as each backend resolves them
CW_SETTINGS = ("max_iter", "binary_search_steps", "initial_const", "confidence", "learning_rate")


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
    seconds: float
    images_per_s: float
    success: float
    mean_l2: float
    median_l2: float
    params: dict
    hit: torch.Tensor  # per image: correctly classified, and fooled by the variant
    l2: torch.Tensor  # per image: L2 norm of the perturbation


def measure(model: nn.Module, name: str, backend: str, params: dict, x: torch.Tensor, y: torch.Tensor,
            batch_size: int, device: torch.device) -> Result:
    """Time one backend over all images (construction and a small warm-up excluded)."""
    cls = generator_class(name)
    variant = VariantConfig(generator=name, backend=backend, **params)
    generator = cls(validate_variant(name, variant), model, backend=backend, device=device, batch_size=batch_size)
    seeds = np.arange(len(x), dtype=np.uint64)
    generator.generate(x[:8], y[:8], seeds[:8])
    outs = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(0, len(x), batch_size):
        outs.append(generator.generate(x[i:i + batch_size], y[i:i + batch_size], seeds[i:i + batch_size]))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    out = torch.cat(outs)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
        hit = correct & (model(out).argmax(1) != y)
    norms = (out - x).flatten(1).norm(dim=1)
    l2 = norms[hit]
    return Result(seconds, len(x) / seconds, (hit.sum() / correct.sum()).item(),
                  l2.mean().item() if len(l2) else float("nan"), l2.median().item() if len(l2) else float("nan"),
                  generator.describe(), hit.cpu(), norms.cpu())


def search_effect(searched: Result, fixed: Result) -> str:
    """Mean L2 with and without the search over the images both fooled (the rows' own means cover
    different images when the success rates differ)."""
    both = searched.hit & fixed.hit
    return (f"{searched.l2[both].mean().item():.4f} with the search vs {fixed.l2[both].mean().item():.4f} "
            f"with a fixed c on the {int(both.sum())} images both fooled "
            f"({fixed.l2[both].mean().item() / searched.l2[both].mean().item() - 1:+.0%} larger without)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="images attacked per backend and case")
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
    print(f"model: SmallCNN {args.size}x{args.size}, clean accuracy {accuracy:.3f} on {len(x)} images; "
          f"batch {args.batch_size}; device {device}; torch threads {torch.get_num_threads()}")

    header = (f"{'case':<25}{'ART s':>9}{'native s':>10}{'speed-up':>10}{'ART success':>13}{'native success':>16}"
              f"{'ART mean L2':>13}{'native mean L2':>16}{'ART med L2':>12}{'native med L2':>15}")
    lines = [header, "-" * len(header)]
    settings, results = [], {}
    for label, name, params, native_extra in CASES:
        art = measure(model, name, "art", params, x, y, args.batch_size, device)
        native = measure(model, name, "native", {**params, **native_extra}, x, y, args.batch_size, device)
        results[label] = {"art": art, "native": native}
        lines.append(f"{label:<25}{art.seconds:>9.1f}{native.seconds:>10.1f}{art.seconds / native.seconds:>9.1f}x"
                     f"{art.success:>13.3f}{native.success:>16.3f}{art.mean_l2:>13.4f}{native.mean_l2:>16.4f}"
                     f"{art.median_l2:>12.4f}{native.median_l2:>15.4f}")
        print(lines[-1], flush=True)  # progress: the table is printed whole at the end
        if name == "cw":
            shown = {backend: {k: result.params[k] for k in CW_SETTINGS}
                     for backend, result in (("art", art), ("native", native))}
            settings.append(f"{label}: art {shown['art']}; native {shown['native']}")
    print("\nsettings (learning_rate is each backend's own default; everything else is equal):")
    print("\n".join(settings))
    print("\nC&W mean L2, default search vs 1 search step:")
    for backend in ("art", "native"):
        print(f"  {backend}: " + search_effect(results["cw (default search)"][backend],
                                               results["cw, 1 search step"][backend]))
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
