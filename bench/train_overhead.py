"""Training-step cost of BANG, perturbation bias and weight maps against plain training, measured in one run.

Every contender in a group trains its own copy of the same initial weights on the
same fixed batches, one full step as the shared loop runs it (zero_grad,
training_step, backward, after_backward, optimizer step). Rounds interleave the
contenders, so load from anything else on the machine falls on all of them
alike (contenders take turns step by step); each reports its median step time.

  BANG               lenet 1x28x28 batch 64 (MNIST preset), caffe_quick 3x32x32 batch 100 (CIFAR-10 preset);
                     target: at most 1.25x plain. --groups methods-large: cifar_resnet18 batch 256
  perturbation bias  naive and multimodal (625 memories) on the same models; target: at most 1.10x plain
  weight maps        each skeleton's weight-map variants against its plain-convolution twin
                     (the CNN they replace): step time and parameter count

    python bench/train_overhead.py                       # CPU
    python bench/train_overhead.py --device cuda --steps 100
    python bench/train_overhead.py --threads 1 --groups methods
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advpipe.batch import Batch
from advpipe.config import OptimConfig
from advpipe.models import build_model
from advpipe.models.weight_map import weight_map_arch
from advpipe.trainers.bang import PRESETS, BangMethod
from advpipe.trainers.loop import Method, StepContext, accuracy, build_optimizer
from advpipe.trainers.perturbation_bias import PerturbationBiasMethod
from advpipe.trainers.weight_map import WeightMapMethod


class PlainMethod(Method):
    """Plain cross-entropy: the baseline every group is compared with."""

    name = "plain"

    def training_step(self, model: nn.Module, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, float]]:
        logits = model(batch.x)
        return F.cross_entropy(logits, batch.y), {"acc": accuracy(logits, batch.y)}


@dataclass
class Contender:
    label: str
    model: nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    target: float | None = None
    times: list[float] | None = None


@dataclass
class Group:
    title: str
    contenders: list[Contender]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per contender first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--groups", nargs="+", choices=("methods", "methods-large", "weight-maps"),
                        default=["methods", "weight-maps"],
                        help="methods-large: cifar_resnet18 batch 256 (meant for a GPU)")
    return parser.parse_args()


def make_batches(shape: tuple[int, int, int], batch_size: int, device: torch.device, count: int = 4) -> list[Batch]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        x = torch.rand(batch_size, *shape, generator=generator)
        y = torch.randint(0, 10, (batch_size,), generator=generator)
        batches.append(Batch.clean(x, y, torch.arange(batch_size)).to(device))
    return batches


def contender(label: str, base: nn.Module, method: Method, device: torch.device,
              target: float | None = None) -> Contender:
    model = copy.deepcopy(base).to(device).train()
    method.setup(model, device)
    optim = OptimConfig(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, epochs=1, batch_size=1)
    return Contender(label, model, method, build_optimizer(method.parameters(model), optim), target, [])


def one_step(c: Contender, batch: Batch, step: int, device: torch.device) -> float:
    """Seconds for one full training step, as the shared loop runs it."""
    ctx = StepContext(0, 1, step, step, device, c.optimizer)
    sync(device)
    start = time.perf_counter()
    c.optimizer.zero_grad(set_to_none=True)
    loss, _ = c.method.training_step(c.model, batch, ctx)
    loss.backward()
    c.method.after_backward(c.model, batch, ctx)
    c.optimizer.step()
    sync(device)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(group: Group, batches: list[Batch], steps: int, warmup: int, device: torch.device) -> None:
    """Contenders take turns step by step, so a busy moment on the machine hits them alike."""
    for step in range(warmup + steps):
        batch = batches[step % len(batches)]
        for c in group.contenders:
            seconds = one_step(c, batch, step, device)
            if step >= warmup:
                c.times.append(seconds)  # type: ignore[union-attr]
    for c in group.contenders:
        c.method.teardown(c.model)


SMALL = (("lenet", (1, 28, 28), "mnist", 64), ("caffe_quick", (3, 32, 32), "cifar10", 100))
LARGE = (("cifar_resnet18", (3, 32, 32), "cifar10", 256),)


def method_groups(device: torch.device, cases: tuple = SMALL) -> list[tuple[Group, list[Batch]]]:
    groups = []
    for arch, shape, preset, batch_size in cases:
        torch.manual_seed(0)
        base = build_model(arch, 10, shape)
        settings = PRESETS[preset]
        contenders = [
            contender("plain", base, PlainMethod(), device),
            contender(f"BANG ({preset} preset)", base, BangMethod(settings.params), device, 1.25),
            contender("perturbation bias, naive", base, PerturbationBiasMethod(eps_ap=0.01), device, 1.10),
            contender("perturbation bias, multimodal 625", base,
                      PerturbationBiasMethod(kind="multimodal", memories=625, eps_ap=0.01), device, 1.10),
        ]
        title = f"{arch} {shape[0]}x{shape[1]}x{shape[2]}, batch {batch_size}"
        groups.append((Group(title, contenders), make_batches(shape, batch_size, device)))
    return groups


def weight_map_groups(device: torch.device) -> list[tuple[Group, list[Batch]]]:
    groups = []
    cases: list[tuple[str, tuple[int, int, int], list[tuple[str | None, str]]]] = [
        ("cnn", (1, 28, 28), [(None, "all"), ("smoothing", "all"), ("unsharp", "all")]),
        ("resnet", (3, 32, 32), [(None, "all"), ("smoothing", "alternate"), ("unsharp", "alternate"),
                                 ("unsharp", "all")]),
        ("densenet", (3, 32, 32), [(None, "all"), ("smoothing", "alternate"), ("unsharp", "alternate"),
                                   ("unsharp", "all")]),
    ]
    for skeleton, shape, variants in cases:
        contenders = []
        for reduction, layout in variants:
            arch = weight_map_arch(skeleton, reduction, layout)  # type: ignore[arg-type]
            torch.manual_seed(0)
            model = build_model(arch, 10, shape)
            method: Method = PlainMethod() if reduction is None else WeightMapMethod()
            contenders.append(contender(arch, model, method, device))
        groups.append((Group(f"{skeleton} skeleton {shape[0]}x{shape[1]}x{shape[2]}, batch 64", contenders),
                       make_batches(shape, 64, device)))
    return groups


def report(group: Group, with_params: bool) -> None:
    base = statistics.median(group.contenders[0].times)  # type: ignore[arg-type]
    print(f"\n{group.title}")
    header = f"  {'contender':<36} {'ms/step':>9} {'vs plain':>9} {'target':>8}"
    print(header + (f" {'params':>11} {'vs plain':>9}" if with_params else ""))
    base_params = count(group.contenders[0].model)
    for c in group.contenders:
        best = statistics.median(c.times)  # type: ignore[arg-type]
        ratio = best / base
        target = "" if c.target is None else f"<={c.target:.2f}x" + (" ok" if ratio <= c.target else " MISS")
        line = f"  {c.label:<36} {1000 * best:>9.2f} {ratio:>8.2f}x {target:>8}"
        if with_params:
            line += f" {count(c.model):>11,} {count(c.model) / base_params:>8.2f}x"
        print(line)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{args.steps} timed steps per contender (after {args.warmup}), taking turns; median step time")
    plans: list[tuple[Callable[[torch.device], list[tuple[Group, list[Batch]]]], bool]] = []
    if "methods" in args.groups:
        plans.append((method_groups, False))
    if "methods-large" in args.groups:
        plans.append((lambda d: method_groups(d, LARGE), False))
    if "weight-maps" in args.groups:
        plans.append((weight_map_groups, True))
    for build, with_params in plans:
        for group, batches in build(device):
            measure(group, batches, args.steps, args.warmup, device)
            report(group, with_params)


if __name__ == "__main__":
    main()
