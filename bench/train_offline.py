"""Store-fed adversarial training vs ART's on-the-fly AdversarialTrainer: epoch time, measured in one run (issue 9.6).

Both sides train a LeNet (advpipe.models.build_model("lenet", 10, (1, 16, 16)), the same initial
weights) on the digits 16x16 train split, with the same batch size, optimiser (Adam) and share of
adversarial images per batch (--ratio, default 0.5), for two attack mixes: FGSM + BIM, and
FGSM + BIM + DeepFool + C&W. The attack parameters are the same on both sides (printed first).

  store-fed   the `adversarial` baseline in the project's loop: advpipe.trainers.loop.fit with
              AdversarialMethod over open_loader(store, "train", AdversarialMethod().sampler_config("both",
              ...)), the store generated first (advpipe.pipeline.job.generate; paid once, reported apart)
  on the fly  ART AdversarialTrainer(classifier, attacks, ratio): every batch, one attack (rotating)
              replaces `ratio` of it with adversarial images computed against the model being trained.
              The ART attacks get the training batch size (DeepFool and C&W default to one image at a time).

The two sides take turns, so load from elsewhere on the machine falls on both alike: after each
store-fed epoch (the first is an untimed warm-up), ART runs its share: a whole epoch for FGSM + BIM;
for the full mix one rotation of its attacks (one batch each, random images), from which an epoch
is extrapolated, labelled as such (a whole on-the-fly epoch with C&W takes minutes; --art-full-epoch
measures it instead). Extrapolated epoch = sum over attacks of (that attack's batches in an epoch x
its mean seconds per call) + batches x the mean rest of a batch (training step, ART overhead); the
epoch's last, smaller batch counts as a full one. Store-fed epoch: the loop's own per-epoch time
(median over the timed epochs); loader share: the time the loop waited for its next batch over that
epoch time.

The store's DeepFool and C&W are generated with the project's native (batched PyTorch) backends by
default (--store-backend art for ART's; generation then takes far longer): the backend changes what
generation costs, not a store-fed epoch. Both sides start from the same weights: --init scratch (a
fresh LeNet, default) or source (the clean source model the store was attacked with, like a model in
later epochs). One CPU thread by default, so the figures compare work, not thread pools on a shared
machine.

    python bench/train_offline.py                 # 1,438 train images, 5 timed epochs per mix
    python bench/train_offline.py --quick         # 512 images, 2 timed epochs per mix
    python bench/train_offline.py --dir /tmp/advpipe-offline   # store and source model kept and reused
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from advpipe.batch import Batch
from advpipe.config import Config, OptimConfig, SamplerConfig, SourceConfig, VariantConfig, config_from_dict
from advpipe.datasets import load_source
from advpipe.models import build_model, load_checkpoint
from advpipe.pipeline.generators import generator_class, validate_variant
from advpipe.pipeline.job import generate
from advpipe.sampler import open_loader
from advpipe.stores.manifest import Manifest
from advpipe.trainers.baselines import AdversarialMethod, AdversarialParams
from advpipe.trainers.clean import train_source
from advpipe.trainers.loop import fit

SHAPE = (1, 16, 16)
#: attack parameters, the same for the store and for ART (digits-sized budgets; the rest are the generators'
#: defaults: DeepFool max_iter 50, overshoot 0.02, nb_grads 10; C&W L2, 50 steps x 5 binary-search steps)
ATTACKS: dict[str, dict[str, Any]] = {
    "fgsm": {"eps": 0.15},
    "bim": {"eps": 0.15, "eps_step": 0.03, "max_iter": 8},
    "deepfool": {},
    "cw": {},
}
FULL_MIX = "full mix (FGSM, BIM, DeepFool, C&W)"
MIXES = {"FGSM + BIM": ["fgsm", "bim"], FULL_MIX: ["fgsm", "bim", "deepfool", "cw"]}
TARGETS = {"FGSM + BIM": 5.0, FULL_MIX: 100.0}  # ART epoch / store-fed epoch, at least
SOURCE_TRAINING = {"epochs": 6, "batch_size": 32, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0}
LR = 0.003


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="training batch size, both sides (and ART's attacks)")
    parser.add_argument("--ratio", type=float, default=0.5, help="share of adversarial images per batch")
    parser.add_argument("--epochs", type=int, default=5, help="timed store-fed epochs per mix (after one warm-up)")
    parser.add_argument("--limit", type=int, help="keep the first N images of the train split (default: all)")
    parser.add_argument("--init", choices=("scratch", "source"), default="scratch",
                        help="both sides start from a fresh LeNet or from the clean source model")
    parser.add_argument("--store-backend", choices=("native", "art"), default="native",
                        help="backend generating the store's DeepFool and C&W")
    parser.add_argument("--cluster", default="inline", help="generation cluster: inline or local:N")
    parser.add_argument("--art-full-epoch", action="store_true",
                        help="time whole on-the-fly epochs for the full mix too (slow: minutes per epoch)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--dir", type=Path, help="work directory, kept and reused (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="512 images, 2 timed epochs per mix")
    args = parser.parse_args()
    if args.quick:
        args.limit = args.limit or 512
        args.epochs = min(args.epochs, 2)
    if not 0 < args.ratio <= 1:
        parser.error("--ratio must lie in (0, 1] (ART refuses 0)")
    return args


# one-time cost: source model and store ---------------------------------------------------------------------------


def bench_config(workdir: Path, args: argparse.Namespace) -> Config:
    variants = {name: dict(params) for name, params in ATTACKS.items()}
    for name in ("deepfool", "cw"):
        variants[name]["backend"] = args.store_backend
    return config_from_dict({
        "name": "bench-train-offline", "seed": 0, "device": "cpu",
        "source": {"kind": "digits", "image_size": SHAPE[1], "limit": args.limit},
        "model": {"arch": "lenet", "checkpoint": str(workdir / "source_model.pt")},
        "train_source": SOURCE_TRAINING,
        "store": {"path": str(workdir / "store"), "shard_size": 512, "splits": ["train"]},
        "variants": variants,
        "generation": {"batch_size": 128, "cluster": args.cluster},
    })


@dataclass
class OneTimeCost:
    manifest: Manifest
    source_s: float | None  # None: the source model was already there (--dir)
    generate_s: float | None  # None: the store was already complete (--dir)


def one_time_cost(config: Config) -> OneTimeCost:
    """Train the source model (if absent) and generate the store (skipped when up to date); seconds of each."""
    source_s = generate_s = None
    if not Path(config.model.checkpoint).is_file():
        start = time.perf_counter()
        train_source(config, progress=False)
        source_s = time.perf_counter() - start
    start = time.perf_counter()
    outcome = generate(config, progress=False)
    if outcome.computed:
        generate_s = time.perf_counter() - start
    print(f"  source model {'reused' if source_s is None else f'trained: {source_s:.1f} s'}; store "
          f"{outcome.status} ({outcome.computed} shards computed, {outcome.reused} reused)"
          + ("" if generate_s is None else f": {generate_s:.1f} s"), flush=True)
    return OneTimeCost(outcome.manifest, source_s, generate_s)


# store-fed side ---------------------------------------------------------------------------------------------------


class WaitTimer:
    """Passes a loader through to the training loop, adding up the time the loop waits for each next batch."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.waits: list[float] = []  # per epoch (per pass over the loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # metrics(), variant_names, policy, update() ...
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Batch]:
        self.waits.append(0.0)
        iterator = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                self.waits[-1] += time.perf_counter() - start
                return
            self.waits[-1] += time.perf_counter() - start
            yield batch


@dataclass
class StoreSide:
    epoch_s: list[float] = field(default_factory=list)
    wait_s: list[float] = field(default_factory=list)
    adversarial_fraction: list[float] = field(default_factory=list)

    def median_epoch(self) -> float:
        return statistics.median(self.epoch_s)

    def loader_share(self) -> float:
        return statistics.median(w / e for w, e in zip(self.wait_s, self.epoch_s, strict=True))


def train_store_fed(model: nn.Module, store: Path, attacks: list[str], args: argparse.Namespace,
                    between_epochs: Callable[[int], None]) -> StoreSide:
    """Warm-up + args.epochs epochs of the `adversarial` baseline; `between_epochs(epoch)` runs after each."""
    method = AdversarialMethod(AdversarialParams(ratio=args.ratio))
    sampler_config = method.sampler_config("both", SamplerConfig(), attacks)
    loader = WaitTimer(open_loader(store, "train", sampler_config, batch_size=args.batch))
    optim = OptimConfig(epochs=args.epochs + 1, batch_size=args.batch, optimizer="adam", lr=LR, weight_decay=0.0,
                        schedule="constant")
    side = StoreSide()

    def on_epoch(record: dict[str, Any]) -> None:
        if record["epoch"] > 1:  # the first is the warm-up (page cache, lazy opens)
            side.epoch_s.append(record["time_s"])
            side.wait_s.append(loader.waits[-1])
            side.adversarial_fraction.append(record["sampler/adversarial_fraction"])
        between_epochs(record["epoch"])

    fit(model, method, loader, optim=optim, device="cpu", progress=False, seed=0, on_epoch=on_epoch)
    return side


# on-the-fly side --------------------------------------------------------------------------------------------------


@dataclass
class ArtSide:
    """What ART spent: wall seconds and batches per measured call, seconds per attack call."""

    wall_s: list[float] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    attack_s: dict[str, list[float]] = field(default_factory=dict)

    def rest_per_batch(self) -> float:
        attack_total = sum(sum(v) for v in self.attack_s.values())
        return (sum(self.wall_s) - attack_total) / sum(self.batches)

    def extrapolated_epoch(self, attacks: list[str], batches_per_epoch: int) -> float:
        counts = [len(range(k, batches_per_epoch, len(attacks))) for k in range(len(attacks))]
        return sum(c * statistics.mean(self.attack_s[name]) for c, name in zip(counts, attacks, strict=True)) \
            + batches_per_epoch * self.rest_per_batch()

    def attack_share(self) -> float:
        return sum(sum(v) for v in self.attack_s.values()) / sum(self.wall_s)


class OnTheFly:
    """ART's AdversarialTrainer with the mix's attacks, built from the project's generators' ART settings."""

    def __init__(self, model: nn.Module, attacks: list[str], x: np.ndarray, y: np.ndarray,
                 args: argparse.Namespace) -> None:
        from art.defences.trainer import AdversarialTrainer
        from art.estimators.classification import PyTorchClassifier

        self.classifier = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=SHAPE,
                                            nb_classes=10, optimizer=torch.optim.Adam(model.parameters(), lr=LR),
                                            clip_values=(0.0, 1.0), device_type="cpu")
        self.names = attacks
        self.side = ArtSide(attack_s={name: [] for name in attacks})
        self.trainer = AdversarialTrainer(self.classifier, [self._timed_attack(n, args.batch) for n in attacks],
                                          ratio=args.ratio)
        self.x, self.y, self.batch = x, y, args.batch
        self.rng = np.random.default_rng(1)

    def _timed_attack(self, name: str, batch_size: int) -> Any:
        params = validate_variant(name, VariantConfig(backend="art", **ATTACKS[name]))
        cls = generator_class(name)
        # the generator is only a factory for its ART attack; its own classifier wraps a throwaway copy
        throwaway = build_model("lenet", 10, SHAPE)
        attack = cls(params, throwaway, backend="art", batch_size=batch_size).build_art_attack(self.classifier)
        generate_fn = attack.generate

        def timed_generate(x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> np.ndarray:
            start = time.perf_counter()
            out = generate_fn(x, y=y, **kwargs)
            self.side.attack_s[name].append(time.perf_counter() - start)
            return out

        attack.generate = timed_generate  # type: ignore[method-assign]
        return attack

    def run(self, images: np.ndarray | None = None) -> None:
        """One ART epoch over `images` (indices; default all), timed; ART's progress bars are silenced."""
        index = np.arange(len(self.x)) if images is None else images
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            self.trainer.fit(self.x[index], self.y[index], batch_size=self.batch, nb_epochs=1)
        self.side.wall_s.append(time.perf_counter() - start)
        self.side.batches.append(math.ceil(len(index) / self.batch))

    def one_rotation(self) -> None:
        """One batch per attack, random images: the unit an epoch is extrapolated from."""
        self.run(self.rng.choice(len(self.x), size=self.batch * len(self.names), replace=False))


# the run ----------------------------------------------------------------------------------------------------------


@dataclass
class MixResult:
    store: StoreSide
    art: ArtSide
    art_epoch_s: float
    extrapolated: bool
    batches_per_epoch: int


def measure_mix(name: str, attacks: list[str], init: dict[str, torch.Tensor], store: Path, x: np.ndarray,
                y: np.ndarray, args: argparse.Namespace) -> MixResult:
    store_model, art_model = build_model("lenet", 10, SHAPE), build_model("lenet", 10, SHAPE)
    store_model.load_state_dict(init)
    art_model.load_state_dict(copy.deepcopy(init))
    np.random.seed(0)  # ART draws its adversarial positions from numpy's global generator
    art = OnTheFly(art_model, attacks, x, y, args)
    whole_epochs = name != FULL_MIX or args.art_full_epoch

    def art_turn(epoch: int) -> None:
        if epoch == 1:
            return  # the store-fed warm-up epoch
        art.run() if whole_epochs else art.one_rotation()
        side = art.side
        print(f"    {name}: store-fed epoch {epoch - 1}, then ART {'epoch' if whole_epochs else 'rotation'} "
              f"{side.wall_s[-1]:.2f} s ({side.batches[-1]} batches)", flush=True)

    store_side = train_store_fed(store_model, store, attacks, args, art_turn)
    batches = math.ceil(len(x) / args.batch)
    if whole_epochs:
        epoch_s = statistics.median(art.side.wall_s)
    else:
        epoch_s = art.side.extrapolated_epoch(attacks, batches)
    return MixResult(store_side, art.side, epoch_s, not whole_epochs, batches)


def report(results: dict[str, MixResult], cost: OneTimeCost, args: argparse.Namespace) -> None:
    manifest = cost.manifest
    stats = manifest.splits["train"].stats
    source = "reused from --dir" if cost.source_s is None else f"{cost.source_s:.1f} s"
    store = ("reused from --dir; seconds per variant below are from its generation" if cost.generate_s is None
             else f"{cost.generate_s:.1f} s")
    print(f"\none-time cost (paid once, in no epoch): source model {source}, store generation {store} "
          f"({manifest.splits['train'].count} train images; cluster {args.cluster})")
    for record in manifest.variants:
        s = stats.get(record.name)
        seconds = "-" if s is None or s.seconds is None else f"{s.seconds:.1f} s"
        success = "-" if s is None or s.success_rate is None else f"{s.success_rate:.2f}"
        print(f"  {record.name:<9} backend {record.backend:<7} {seconds:>9}  success rate {success}")
    print(f"\n{'mix':<38} {'store-fed s':>11} {'loader share':>12} {'ART s':>9} {'ART / store':>11}  target"
          "            ART epoch")
    for name, r in results.items():
        store_epoch = r.store.median_epoch()
        ratio = r.art_epoch_s / store_epoch
        target = TARGETS[name]
        how = (f"extrapolated from {len(r.art.wall_s)} rotations ({sum(r.art.batches)} batches) to "
               f"{r.batches_per_epoch} batches" if r.extrapolated else f"measured, median of {len(r.art.wall_s)}")
        print(f"{name:<38} {store_epoch:>11.3f} {100 * r.store.loader_share():>11.1f}% {r.art_epoch_s:>9.1f} "
              f"{ratio:>10.1f}x  >= {target:g}x: {'met' if ratio >= target else 'NOT met':<8} {how}")
    print("\ndetails per mix:")
    for name, r in results.items():
        per_attack = ", ".join(f"{a} {statistics.mean(v):.3f} s" for a, v in r.art.attack_s.items())
        mix_generation = sum((stats[a].seconds or 0.0) for a in MIXES[name] if a in stats)
        saved = r.art_epoch_s - r.store.median_epoch()
        print(f"  {name}:")
        print(f"    store-fed epochs {', '.join(f'{e:.3f}' for e in r.store.epoch_s)} s; waiting for batches "
              f"{', '.join(f'{w:.3f}' for w in r.store.wait_s)} s; realised adversarial fraction "
              f"{statistics.mean(r.store.adversarial_fraction):.3f}")
        print(f"    ART: attack calls per batch (mean) {per_attack}; rest of a batch {r.art.rest_per_batch():.3f} s; "
              f"attacks take {100 * r.art.attack_share():.1f}% of ART's time")
        when = "manifest" if cost.generate_s is not None else "manifest, an earlier run under other load"
        if saved <= 0:
            print("    the store-fed epoch is not faster")
            continue
        print(f"    generating this mix's variants took {mix_generation:.1f} s ({when}): the store is ahead after "
              f"{mix_generation / saved:.2f} epochs (source model not counted)")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="advpipe-offline-"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = bench_config(workdir, args)
    print(f"digits {SHAPE[1]}x{SHAPE[2]}, LeNet, batch {args.batch}, adversarial ratio {args.ratio}, init "
          f"{args.init}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}; in {workdir}", flush=True)
    print(f"attacks (both sides): {ATTACKS}; store DeepFool/C&W backend {args.store_backend}, ART side: ART's "
          f"(C&W learning_rate: each backend's own default)", flush=True)
    try:
        cost = one_time_cost(config)
        train = load_source(SourceConfig(kind="digits", image_size=SHAPE[1], limit=args.limit), "train")
        x = np.ascontiguousarray(train.images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)
        y = np.asarray(train.labels, dtype=np.int64)
        torch.manual_seed(0)
        init = build_model("lenet", 10, SHAPE).state_dict()
        if args.init == "source":
            init = load_checkpoint(config.model.checkpoint, arch="lenet")[0].state_dict()
        results = {name: measure_mix(name, attacks, init, Path(config.store.path), x, y, args)
                   for name, attacks in MIXES.items()}
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report(results, cost, args)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
