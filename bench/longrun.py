"""Long runs: resident memory must stay flat.

    python bench/longrun.py [--samples 1000000] [--generate-images 20000]

1. Stream `--samples` samples through the map-style sampler (HDF5; in this process, and with
   2 persistent workers yielding the stored form) and through WebDataset streaming; RSS of
   this process and its DataLoader workers is sampled every 50 batches. Growth = (last RSS - RSS after warm-up) / RSS
   after warm-up, warm-up being the first quarter of the run (target < 5%).
2. Generate `--generate-images` images with ONE Dask worker process (shards of
   500), sampling the worker's RSS after every finished shard through the Dask
   client: the worker's memory must not grow with the number of shards (the first
   quarter is warm-up: the worker loads the source, the model and ART there).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from advpipe.config import SamplerConfig, config_from_dict
from advpipe.stores import SplitArrays, build_store

MiB = 2**20


def growth(samples: list[float]) -> tuple[float, float, float]:
    """(RSS after warm-up, last RSS, relative growth) from a list of RSS samples."""
    warm = samples[max(1, len(samples) // 4)]
    return warm, samples[-1], (samples[-1] - warm) / warm


def small_store(root: Path, images: int, backend: str) -> Path:
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 256, (images, 1, 8, 8), dtype=np.uint8)
    base = clean / np.float32(255)
    variants = {f"v{i}": np.clip(base + rng.normal(0, 0.02, base.shape), 0, 1).astype(np.float32) for i in range(3)}
    path = root / f"store-{backend}"
    build_store(path, {"train": SplitArrays(clean, rng.integers(0, 10, images), variants, "bench")},
                class_names=[str(i) for i in range(10)], backend=backend, shard_size=2048, progress=False)
    return path


def stream(loader_factory, total: int, batch: int) -> list[float]:
    process = psutil.Process()
    rss, seen, batches = [], 0, 0
    while seen < total:
        for item in loader_factory():
            seen += len(item.decode().x)  # a stored-form batch is decoded as a training loop would
            batches += 1
            if batches % 50 == 0:
                rss.append(sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / MiB)
            if seen >= total:
                break
    return rss


def sampler_runs(root: Path, total: int) -> None:
    from advpipe.sampler import make_loader

    config = SamplerConfig(ratio=[0.3, 0.7], weights={"v0": 1, "v1": [0.5, 2], "v2": 1}, redraw="batch",
                           batch_size=256)
    hdf5 = small_store(root, 100_000, "hdf5")
    runs = {"hdf5 map-style": lambda: make_loader(hdf5, "train", config),
            "hdf5 map-style, 2 workers, stored form": lambda: make_loader(hdf5, "train", config, num_workers=2,
                                                                         persistent_workers=True, stored_form=True)}
    try:
        from advpipe.sampler.streaming import make_stream_loader

        runs["webdataset streaming"] = lambda: make_stream_loader(
            small_store(root, 100_000, "webdataset"), "train", config, batch_size=256)
    except ImportError:
        print("webdataset streaming: module not available, skipped")
    for name, build in runs.items():
        loader = build()
        start = time.perf_counter()
        rss = stream(lambda loader=loader: loader, total, 256)
        warm, last, grew = growth(rss)
        print(f"{name:<22} {total:,} samples in {time.perf_counter() - start:.0f}s; RSS after warm-up "
              f"{warm:.1f} MiB, at end {last:.1f} MiB, growth {100 * grew:+.2f}% "
              f"(target < 5%: {'met' if grew < 0.05 else 'NOT met'})")


def generation_run(root: Path, images: int) -> None:
    from distributed import Client, LocalCluster

    from advpipe.pipeline.job import generate
    from advpipe.trainers.clean import train_source

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (images, 16, 16), dtype=np.uint8)
    y = rng.integers(0, 10, images)
    np.savez(root / "source.npz", x=x, y=y, x_test=x[:500], y_test=y[:500])
    raw = {
        "seed": 0, "device": "cpu",
        "source": {"kind": "npz", "path": str(root / "source.npz")},
        "model": {"arch": "lenet", "checkpoint": str(root / "model.pt")},
        "train_source": {"epochs": 1, "batch_size": 256},
        "store": {"path": str(root / "gen-store"), "shard_size": 500, "splits": ["train"]},
        "variants": {"gaussian": {}, "fgsm": {"eps": 0.05}},
        "generation": {"batch_size": 250},
    }
    config = config_from_dict(raw)
    train_source(config, progress=False)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        samples: list[float] = []
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                samples.extend(v / MiB for v in client.run(lambda: psutil.Process().memory_info().rss).values())
                time.sleep(0.5)

        watcher = threading.Thread(target=poll)
        watcher.start()
        start = time.perf_counter()
        generate(config, scheduler=cluster.scheduler_address, progress=False)
        done.set()
        watcher.join()
    warm, last, grew = growth(samples)
    quartiles = ", ".join(f"{samples[int(q * (len(samples) - 1))]:.0f}" for q in (0.1, 0.25, 0.5, 0.75, 1.0))
    print(f"worker RSS (MiB) at 10/25/50/75/100% of the run: {quartiles}")
    print(f"generation, 1 worker, {images:,} images in {images // 500} shards, {time.perf_counter() - start:.0f}s: "
          f"worker RSS after warm-up {warm:.1f} MiB, at end {last:.1f} MiB, peak {max(samples):.1f} MiB, "
          f"growth {100 * grew:+.2f}% (target < 5%: {'met' if grew < 0.05 else 'NOT met'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--generate-images", type=int, default=20_000, help="0: leave the generation run out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="advpipe-longrun-"))
    sampler_runs(root, args.samples)
    if args.generate_images:
        generation_run(root, args.generate_images)


if __name__ == "__main__":
    main()
