"""Sampler read throughput, measured in one run (issue part 9).

Batches of 256 float32 [256, 3, 32, 32] images plus labels, one variant picked per
image (clean or one of 7), from the same images stored five ways:

  in-memory      one uint8 array (N, V+1, 3, 32, 32), gathered in numpy: the upper bound
  HDF5 map-style advpipe.sampler.mapstyle.make_loader over an HDF5 store (num_workers 0 and 2;
                 also the compact uint8-precision store, 0 workers)
  WDS streaming  advpipe.sampler.streaming.make_stream_loader over a WebDataset store (0 and 2)
  PNG per file   the seed code's layout: one PNG per image per variant, read with PIL

Every reader gets one untimed epoch first (warm page cache; building a loader
verifies its store, both hash every shard once). Then --repeats rounds each time every
reader in turn for at least half a second; the best rate of each is reported, since
the machine may be shared and load then falls on all readers alike.

    python bench/sample.py                         # 20,000 images, temporary directory
    python bench/sample.py --images 4000 --dir /tmp/advpipe-bench   # reused if present
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from advpipe.config import SamplerConfig
from advpipe.sampler.mapstyle import make_loader
from advpipe.sampler.streaming import make_stream_loader
from advpipe.stores import SplitArrays, build_store, convert_store
from advpipe.stores.codec import to_float

SHAPE = (3, 32, 32)
TARGETS = {"HDF5 map-style, 0 workers": ("in-memory", 0.5),
           "HDF5 map-style, uint8 precision, 0 workers": ("in-memory", 0.5),
           "WDS streaming, 0 workers": ("PNG", 3.0)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--variants", type=int, default=7)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds over all readers (best kept)")
    parser.add_argument("--dir", type=Path, help="work directory, kept and reused (default: a temporary one)")
    return parser.parse_args()


def make_data(count: int, variants: int, seed: int = 0) -> SplitArrays:
    """Random uint8 images and small random float perturbations of them (a stand-in for attacks)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, *SHAPE), dtype=np.uint8)
    base = to_float(images)
    arrays = {f"v{k}": np.clip(base + rng.uniform(-0.03, 0.03, base.shape).astype(np.float32), 0, 1)
              for k in range(1, variants + 1)}
    return SplitArrays(images=images, labels=rng.integers(0, 10, count), variants=arrays,
                       source_fingerprint=f"bench-{count}-{variants}-{seed}")


def build(workdir: Path, data: SplitArrays, shard_size: int) -> tuple[Path, Path, Path]:
    """The HDF5 store, its WebDataset conversion and the PNG tree (each skipped if already complete)."""
    h5, wds, png = workdir / "store-h5", workdir / "store-wds", workdir / "png"
    if not (h5 / "manifest.json").exists():
        timed(f"build HDF5 store ({len(data.images)} images)", lambda: build_store(
            h5, {"train": data}, class_names=[str(c) for c in range(10)], backend="hdf5", shard_size=shard_size,
            progress=False))
    compact = workdir / "store-h5-uint8"
    if not (compact / "manifest.json").exists():
        timed("build HDF5 store, uint8 precision", lambda: build_store(
            compact, {"train": data}, class_names=[str(c) for c in range(10)], backend="hdf5", precision="uint8",
            shard_size=shard_size, progress=False))
    if not (wds / "manifest.json").exists():
        timed("convert to WebDataset", lambda: convert_store(h5, wds, "webdataset", progress=False))
    if not (png / "complete").exists():
        timed(f"write {len(data.images) * (len(data.variants) + 1)} PNG files", lambda: write_pngs(png, data))
    return h5, wds, png


def pixel_table(data: SplitArrays) -> np.ndarray:
    """uint8 (N, V+1, C, H, W): clean first, then each variant rounded to uint8 (as the seed code kept them)."""
    table = np.empty((len(data.images), len(data.variants) + 1, *SHAPE), dtype=np.uint8)
    table[:, 0] = data.images
    for k, array in enumerate(data.variants.values(), start=1):
        table[:, k] = np.rint(array * 255)
    return table


def write_pngs(root: Path, data: SplitArrays) -> None:
    table = pixel_table(data)
    for variant in range(table.shape[1]):
        folder = root / str(variant)
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(len(table)):
            Image.fromarray(table[index, variant].transpose(1, 2, 0)).save(folder / f"{index:06d}.png")
    (root / "complete").write_text("ok\n")


def timed(label: str, action: Callable[[], object]) -> None:
    start = time.perf_counter()
    action()
    print(f"  {label}: {time.perf_counter() - start:.1f} s", flush=True)


# readers: each returns a function that runs one epoch and returns how many samples it produced ------------


def random_batches(count: int, variants: int, batch: int, epoch: int) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(epoch)
    order = rng.permutation(count)
    picks = rng.integers(0, variants + 1, count)
    for start in range(0, count, batch):
        yield order[start:start + batch], picks[order[start:start + batch]]


def in_memory(table: np.ndarray, labels: np.ndarray, batch: int) -> Callable[[int], int]:
    def epoch(number: int) -> int:
        done = 0
        for index, variant in random_batches(len(table), table.shape[1] - 1, batch, number):
            x, _y = torch.from_numpy(to_float(table[index, variant])), torch.from_numpy(labels[index])
            done += len(x)
        return done
    return epoch


def png_files(root: Path, labels: np.ndarray, variants: int, batch: int) -> Callable[[int], int]:
    def epoch(number: int) -> int:
        done = 0
        for index, variant in random_batches(len(labels), variants, batch, number):
            pixels = np.stack([np.asarray(Image.open(root / str(v) / f"{i:06d}.png")).transpose(2, 0, 1)
                               for i, v in zip(index.tolist(), variant.tolist(), strict=True)])
            x, _y = torch.from_numpy(to_float(pixels)), torch.from_numpy(labels[index])
            done += len(x)
        return done
    return epoch


def loader_epochs(loader: Iterable[dict[str, torch.Tensor]]) -> Callable[[int], int]:
    """One pass of a StoreLoader or StreamLoader is one epoch (each advances its own epoch)."""
    def epoch(_: int) -> int:
        return sum(len(batch["x"]) for batch in loader)
    return epoch


def samples_per_second(run: Callable[[int], int], first_epoch: int, min_seconds: float = 0.5) -> float:
    """Run epochs until `min_seconds` have passed; samples/s over them."""
    start, samples, epoch = time.perf_counter(), 0, first_epoch
    while (elapsed := time.perf_counter() - start) < min_seconds or not samples:
        samples += run(epoch)
        epoch += 1
    return samples / elapsed


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="advpipe-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"{args.images} images x {args.variants} variants of {SHAPE}, batches of {args.batch}, in {workdir}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    try:
        data = make_data(args.images, args.variants)
        h5, wds, png = build(workdir, data, args.shard_size)
        results = measure(args, data, h5, wds, png)
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report(results)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


def measure(args: argparse.Namespace, data: SplitArrays, h5: Path, wds: Path, png: Path) -> dict[str, float]:
    """Best samples/s of each reader over --repeats rounds; rounds visit every reader in turn, so load from
    elsewhere on the machine falls on all of them alike. Loaders are built (and verify their store) untimed."""
    policy = SamplerConfig(ratio=args.variants / (args.variants + 1), seed=0)  # uniform over clean + variants
    labels = np.asarray(data.labels, dtype=np.int64)
    table = pixel_table(data)
    builders: dict[str, Callable[[], Callable[[int], int]]] = {
        "in-memory": lambda: in_memory(table, labels, args.batch),
        "PNG": lambda: png_files(png, labels, args.variants, args.batch),
    }
    builders["HDF5 map-style, uint8 precision, 0 workers"] = lambda: loader_epochs(make_loader(
        h5.parent / "store-h5-uint8", "train", policy, batch_size=args.batch, num_workers=0))
    for workers in (0, 2):
        builders[f"HDF5 map-style, {workers} workers"] = lambda w=workers: loader_epochs(make_loader(
            h5, "train", policy, batch_size=args.batch, num_workers=w))
        builders[f"WDS streaming, {workers} workers"] = lambda w=workers: loader_epochs(make_stream_loader(
            wds, sampler_config=policy, batch_size=args.batch, num_workers=w))
    readers = {}
    for name, build_reader in builders.items():
        start = time.perf_counter()
        readers[name] = build_reader()
        readers[name](0)  # warm: page cache, lazy opens
        print(f"  {name}: set-up and one warm epoch {time.perf_counter() - start:.2f} s", flush=True)
    best = dict.fromkeys(readers, 0.0)
    for round_number in range(1, args.repeats + 1):
        for name, run in readers.items():
            best[name] = max(best[name], samples_per_second(run, 100 * round_number))
        print(f"  round {round_number}: " + ", ".join(f"{n} {v:,.0f}" for n, v in best.items()), flush=True)
    return best


def report(results: dict[str, float]) -> None:
    memory, png = results["in-memory"], results["PNG"]
    print(f"\n{'reader':40s} {'samples/s':>11s} {'x in-memory':>12s} {'x PNG':>8s}  target")
    for name, value in results.items():
        target = ""
        if name in TARGETS:
            base, factor = TARGETS[name]
            ratio = value / (memory if base == "in-memory" else png)
            target = f">= {factor} x {base}: {'met' if ratio >= factor else 'NOT met'}"
        print(f"{name:40s} {value:11,.0f} {value / memory:12.3f} {value / png:8.2f}  {target}")


if __name__ == "__main__":
    main()
