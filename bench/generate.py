"""Generation speed, measured in one run: our pipeline vs its references, side by side.

    python bench/generate.py [--images 1024] [--slow-images 128]

1. Per attack: our pipeline end to end (read source, generate, encode, write the
   shard, checksum, statistics) vs calling ART directly on an in-memory array,
   same model, data and batch size (target >= 0.9).
2. FGSM end to end vs one raw torch forward+backward pass per image, the floor
   (target >= 0.5).
3. One vs two worker processes on the same job (target >= 1.6x; needs 2 free cores).

Single-core comparisons run with one torch thread. The model is a LeNet trained
for a few seconds on digits upscaled to 28x28 (an MNIST-size CNN).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from advpipe.config import config_from_dict
from advpipe.datasets import load_source
from advpipe.pipeline.generators import generator_class
from advpipe.pipeline.generators.art_support import art_classifier
from advpipe.pipeline.job import absolute_paths, generate
from advpipe.pipeline.plan import JobSpec, ShardTask, variant_plans
from advpipe.pipeline.worker import run_shard
from advpipe.trainers.clean import train_source

BATCH = 128
ATTACKS = {
    "fgsm": {"eps": 0.1},
    "bim": {"eps": 0.1, "eps_step": 0.02, "max_iter": 10},
    "deepfool": {"overshoot": 0.02, "max_iter": 50},
    "cw": {"initial_const": 1.0, "learning_rate": 0.01, "max_iter": 50},
}


def base_config(root: Path, variants: dict, images: int, shard_size: int, cluster: str = "inline") -> dict:
    return {
        "seed": 0, "device": "cpu",
        "source": {"kind": "digits", "image_size": 28, "limit": images},
        "model": {"arch": "lenet", "checkpoint": str(root / "model.pt")},
        "train_source": {"epochs": 4, "batch_size": 32, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0},
        "store": {"path": str(root / "store"), "shard_size": shard_size, "splits": ["train"]},
        "variants": variants,
        "generation": {"batch_size": BATCH, "cluster": cluster},
    }


def rate(count: int, seconds: float) -> float:
    return count / seconds


def ours(root: Path, name: str, params: dict, images: int, statistics: bool = True) -> float:
    """Images/s of run_shard on one shard of `images` images (worker context warmed on a tiny shard first)."""
    raw = base_config(root, {name: params}, images, images)
    raw["generation"]["statistics"] = statistics
    config = absolute_paths(config_from_dict(raw))
    plans = variant_plans(config)
    job = JobSpec(config=config.model_dump(mode="json"), variants=plans, fingerprint=f"bench-{name}-{statistics}",
                  base_fingerprint="bench", model_fingerprint=_model_fingerprint(config), device="cpu")
    run_shard(ShardTask("train", 99, 0, 8, f"train/warm-{name}.h5", (name,)), job)
    start = time.perf_counter()
    run_shard(ShardTask("train", 0, 0, images, f"train/{name}.h5", (name,)), job)
    return rate(images, time.perf_counter() - start)


def _model_fingerprint(config) -> str:
    from advpipe.models.checkpoint import load_checkpoint

    return load_checkpoint(config.model.checkpoint)[1].fingerprint


def art_direct(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, name: str, params: dict) -> float:
    """Images/s of the ART attack itself on an in-memory float array (the classifier built beforehand)."""
    typed = generator_class(name).params_model.model_validate(params)
    attack = _reference_attack(name, art_classifier(model, torch.device("cpu")), typed)
    attack.generate(x[:8], y=y[:8])
    start = time.perf_counter()
    for begin in range(0, len(x), BATCH):
        attack.generate(x[begin : begin + BATCH], y=y[begin : begin + BATCH])
    return rate(len(x), time.perf_counter() - start)


def _reference_attack(name: str, classifier, params):
    from art.attacks.evasion import BasicIterativeMethod, CarliniL2Method, DeepFool, FastGradientMethod

    if name == "fgsm":
        return FastGradientMethod(classifier, eps=params.eps, batch_size=BATCH)
    if name == "bim":
        return BasicIterativeMethod(classifier, eps=params.eps, eps_step=params.eps_step, max_iter=params.max_iter,
                                    batch_size=BATCH, verbose=False)
    if name == "deepfool":
        return DeepFool(classifier, epsilon=params.overshoot, max_iter=params.max_iter, nb_grads=params.nb_grads,
                        batch_size=BATCH, verbose=False)
    return CarliniL2Method(classifier, confidence=params.confidence, learning_rate=params.learning_rate or 0.01,
                           initial_const=params.initial_const, max_iter=params.max_iter,
                           binary_search_steps=params.binary_search_steps, batch_size=BATCH, verbose=False)


def raw_forward_backward(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    start = time.perf_counter()
    for begin in range(0, len(x), BATCH):
        batch = xs[begin : begin + BATCH].clone().requires_grad_(True)
        loss = F.cross_entropy(model(batch), ys[begin : begin + BATCH])
        torch.autograd.grad(loss, batch)
    return rate(len(x), time.perf_counter() - start)


def workers_speedup(root: Path, images: int) -> tuple[float, float]:
    """Wall time of one job on LocalClusters of 1 and 2 worker processes.

    Cluster start-up and each worker's first imports (torch, ART: seconds, paid once per worker
    in a real run of many shards) are not timed: a tiny job warms the workers first.
    """
    from distributed import LocalCluster

    times = []
    for workers in (1, 2):
        raw = base_config(root / f"w{workers}", {"bim": ATTACKS["bim"]}, images, 64)
        raw["model"]["checkpoint"] = str(root / "model.pt")
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as c:
            warm = base_config(root / f"warm{workers}", {"bim": ATTACKS["bim"]}, 8 * workers, 8)
            warm["model"]["checkpoint"] = str(root / "model.pt")
            generate(config_from_dict(warm), scheduler=c.scheduler_address, progress=False)  # imports, ART
            start = time.perf_counter()
            generate(config_from_dict(raw), scheduler=c.scheduler_address, progress=False)
            times.append(time.perf_counter() - start)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024, help="images for fgsm/bim and the worker test")
    parser.add_argument("--slow-images", type=int, default=128, help="images for deepfool and cw")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="advpipe-bench-"))
    config = config_from_dict(base_config(root, {}, None, 512))
    train_source(config, progress=False)
    model = _load(root)
    source = load_source(config.source, "train")
    x_all = source.images.transpose(0, 3, 1, 2).astype(np.float32) / 255
    y_all = np.array(source.labels)

    print(f"model: lenet on digits 28x28, batch {BATCH}, 1 torch thread; store in {root}\n")
    print("pipeline = read source, generate, encode, write shard, sha256; 'stats' adds the manifest's success")
    print("rates (one clean and one adversarial inference pass per image); 'no stats': generation.statistics off\n")
    print(f"{'attack':<10}{'images':>7}{'ART direct':>12}{'pipeline':>10}{'ratio':>7}{'no stats':>10}{'ratio':>7}"
          "  target >= 0.9 (img/s)")
    pipeline_rates, bare_rates = {}, {}
    for name, params in ATTACKS.items():
        count = args.images if name in ("fgsm", "bim") else args.slow_images
        reference = art_direct(model, x_all[:count], y_all[:count], name, params)
        pipeline_rates[name] = ours(root, name, params, count)
        bare = bare_rates[name] = ours(root, name, params, count, statistics=False)
        ratio, bare_ratio = pipeline_rates[name] / reference, bare / reference
        print(f"{name:<10}{count:>7}{reference:>12.1f}{pipeline_rates[name]:>10.1f}{ratio:>7.2f}{bare:>10.1f}"
              f"{bare_ratio:>7.2f}  with stats {'met' if ratio >= 0.9 else 'NOT met'}, "
              f"without {'met' if bare_ratio >= 0.9 else 'NOT met'}")

    floor = raw_forward_backward(model, x_all[: args.images], y_all[: args.images])
    print(f"\nraw forward+backward {floor:.0f} img/s (the floor)")
    for label, value in (("with stats", pipeline_rates["fgsm"]), ("no stats", bare_rates["fgsm"])):
        ratio = value / floor
        print(f"FGSM pipeline, {label}: {value:.0f} img/s, ratio {ratio:.2f} "
              f"(target >= 0.5: {'met' if ratio >= 0.5 else 'NOT met'})")

    one, two = workers_speedup(root, args.images)
    speedup = one / two
    print(f"\nBIM job, {args.images} images: 1 worker {one:.1f}s, 2 workers {two:.1f}s, speed-up {speedup:.2f}x "
          f"(target >= 1.6x: {'met' if speedup >= 1.6 else 'NOT met'})")


def _load(root: Path) -> torch.nn.Module:
    from advpipe.models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(root / "model.pt")
    return model.requires_grad_(False)


if __name__ == "__main__":
    main()
