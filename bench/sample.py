"""Sampler read throughput and shuffle quality, every reader measured side by side in one run (issue 11).

Batches of 256 float32 [256, 3, 32, 32] images plus labels, one variant picked per image (clean or
one of 7), from the same images laid out several ways:

  in-memory          one uint8 array (N, V+1, 3, 32, 32), gathered and converted in numpy: the bound
  in-memory, 4 KiB   the same array in 4 KiB pages (numpy's own gets huge pages, a mapped store cannot):
                     what the page size alone costs a gather; no target
  in-memory, 2 w.    the same through a DataLoader with 2 workers (float32 batches cross processes):
                     the bound for every 2-worker reader
  HDF5 map-style     advpipe.sampler.mapstyle.make_loader over the float16 store (the default precision)
                     and over a uint8-precision store; 0 and 2 workers
  ... stored form    the same loader with stored_form=True: workers send uint8 + the stored delta and
                     the consumer calls batch.decode() (here on the CPU; on a GPU after moving the batch)
  WDS streaming      advpipe.sampler.streaming.make_stream_loader over the WebDataset conversion; 0 and 2
  peer               LitData (`pip install -e ".[bench]"`): the 20,000 x 8 versions as uint8 items in its
                     own chunked format, read by its StreamingDataLoader with shuffle=True, converted to
                     float32 in the consumer as ours are; skipped with a note when litdata is missing

Every reader's line also reports its shuffle quality, from one untimed epoch: the mean number of
distinct images per batch and the number of distinct images per epoch (N samples), since a loader
can look fast by shuffling weakly. Every reader gets one untimed epoch first (page cache, lazy
opens). Then --repeats rounds run every reader in turn for at least half a second each; the best
rate of each is kept, since the machine may be shared and load then falls on all readers alike.

    python bench/sample.py                          # 20,000 images, temporary directory
    python bench/sample.py --images 4000 --dir /tmp/advpipe-bench   # stores reused if present
"""

from __future__ import annotations

import argparse
import json
import logging
import mmap
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from advpipe.config import SamplerConfig
from advpipe.sampler.mapstyle import StoreLoader, make_loader
from advpipe.sampler.streaming import StreamLoader, make_stream_loader
from advpipe.stores import SplitArrays, build_store, convert_store
from advpipe.stores.codec import to_float

SHAPE = (3, 32, 32)
MEMORY, MEMORY_2 = "in-memory, 0 workers", "in-memory, 2 workers"
MEMORY_4K = "in-memory, 4 KiB pages, 0 workers"
PEER = "LitData (peer), 0 workers"
# reader: (the reader it is compared with, the factor it must reach)
TARGETS = {
    "HDF5 map-style, uint8 store, 0 workers": (MEMORY, 0.8),
    "HDF5 map-style, float16 store, 0 workers": (MEMORY, 0.5),
    "WDS streaming, 0 workers": (MEMORY, 0.3),
    "HDF5 map-style, float16 store, 2 workers": (MEMORY_2, 0.8),
    "HDF5 map-style, float16 store, 2 workers, stored form + decode": (MEMORY_2, 0.8),
    "WDS streaming, 2 workers": (MEMORY_2, 0.8),
}
PEER_FACTOR = 3.0
OURS_VS_PEER = ("HDF5 map-style, float16 store, 0 workers", "WDS streaming, 0 workers")
Run = Callable[[int, list | None], int]  # (epoch number, list to record batch indices in or None) -> samples


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--variants", type=int, default=7)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds over all readers (best kept)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the multi-process lines")
    parser.add_argument("--no-peer", action="store_true", help="leave the peer library out")
    parser.add_argument("--only", nargs="*", default=None, help="measure only readers whose name contains one of these")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time readers in this process's CPU time, not wall time: steadier on a loaded machine; "
                             "only the 0-worker readers (the work of workers is elsewhere)")
    parser.add_argument("--dir", type=Path, help="work directory, kept and reused (default: a temporary one)")
    parser.add_argument("--peer-child", nargs=2, metavar=("PATH", "WORKERS"), help=argparse.SUPPRESS)
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


def pixel_table(data: SplitArrays) -> np.ndarray:
    """uint8 (N, V+1, C, H, W): clean first, then each variant rounded to uint8."""
    table = np.empty((len(data.images), len(data.variants) + 1, *SHAPE), dtype=np.uint8)
    table[:, 0] = data.images
    for k, array in enumerate(data.variants.values(), start=1):
        table[:, k] = np.rint(array * 255)
    return table


def build(workdir: Path, data: SplitArrays, shard_size: int) -> dict[str, Path]:
    """The float16 and uint8 HDF5 stores and the WebDataset conversion (each skipped if already complete)."""
    paths = {"h5": workdir / "store-h5", "h5-uint8": workdir / "store-h5-uint8", "wds": workdir / "store-wds"}
    classes = [str(c) for c in range(10)]
    for key, precision in (("h5", "float16"), ("h5-uint8", "uint8")):
        if not (paths[key] / "manifest.json").exists():
            timed(f"build HDF5 store, {precision} ({len(data.images)} images)", lambda p=precision, k=key: build_store(
                paths[k], {"train": data}, class_names=classes, backend="hdf5", precision=p, shard_size=shard_size,
                progress=False))
    if not (paths["wds"] / "manifest.json").exists():
        timed("convert to WebDataset", lambda: convert_store(paths["h5"], paths["wds"], "webdataset", progress=False))
    return paths


def timed(label: str, action: Callable[[], object]) -> None:
    start = time.perf_counter()
    action()
    print(f"  {label}: {time.perf_counter() - start:.1f} s", flush=True)


# readers: each returns a Run -------------------------------------------------------------------------------


def random_batches(count: int, variants: int, batch: int, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(epoch)
    order = rng.permutation(count)
    picks = rng.integers(0, variants + 1, count)
    for start in range(0, count, batch):
        yield order[start:start + batch], picks[order[start:start + batch]]


def small_pages(table: np.ndarray) -> np.ndarray:
    """A copy of `table` in 4 KiB pages, as a store's mapped file is in the page cache.

    numpy asks for transparent huge pages for large arrays (madvise), so the in-memory table gathers
    with a fraction of the TLB misses any memory-mapped store pays: this line shows how much of a
    store reader's gap to the in-memory line is that page size, not the reader's work.
    """
    mapping = mmap.mmap(-1, max(table.nbytes, 1))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        mapping.madvise(mmap.MADV_NOHUGEPAGE)
    copy = np.frombuffer(mapping, np.uint8, count=table.size).reshape(table.shape)
    copy[...] = table
    return copy


def in_memory(table: np.ndarray, labels: np.ndarray, batch: int) -> Run:
    def epoch(number: int, record: list | None) -> int:
        done = 0
        for index, variant in random_batches(len(table), table.shape[1] - 1, batch, number):
            x, _y = torch.from_numpy(to_float(table[index, variant])), torch.from_numpy(labels[index])
            done += len(x)
            if record is not None:
                record.append(index)
        return done
    return epoch


class TableBatches(Dataset):
    """The in-memory gather as a DataLoader dataset: one item is one batch of (index, variant) pairs."""

    def __init__(self, table: np.ndarray, labels: np.ndarray) -> None:
        self.table, self.labels = table, labels

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, pairs: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index, variant = pairs
        return (torch.from_numpy(to_float(self.table[index, variant])), torch.from_numpy(self.labels[index]),
                torch.from_numpy(index))


class EpochBatches:
    """A batch sampler over `random_batches` whose epoch is set before each pass."""

    def __init__(self, count: int, variants: int, batch: int) -> None:
        self.count, self.variants, self.batch, self.epoch = count, variants, batch, 0

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return random_batches(self.count, self.variants, self.batch, self.epoch)

    def __len__(self) -> int:
        return -(-self.count // self.batch)


def in_memory_workers(table: np.ndarray, labels: np.ndarray, batch: int, workers: int) -> Run:
    batches = EpochBatches(len(table), table.shape[1] - 1, batch)
    loader = DataLoader(TableBatches(table, labels), sampler=batches, batch_size=None, num_workers=workers,
                        persistent_workers=True)

    def epoch(number: int, record: list | None) -> int:
        batches.epoch = number
        done = 0
        for x, _y, index in loader:
            done += len(x)
            if record is not None:
                record.append(index.numpy())
        return done
    return epoch


def loader_epochs(loader: Iterable) -> Run:
    """One pass of a StoreLoader or StreamLoader is one epoch (each advances its own epoch); stored-form
    batches are decoded here, in the consumer, as a training loop would after moving them to its device."""
    def epoch(_: int, record: list | None) -> int:
        done = 0
        for batch in loader:
            x = batch.decode().x
            done += len(x)
            if record is not None:
                record.append(batch.index.numpy())
        return done
    return epoch


def loader_stored_only(loader: Iterable) -> Run:
    """A stored-form loader's batches, not decoded: the CPU's whole share of the work when a GPU decodes."""
    def epoch(_: int, record: list | None) -> int:
        done = 0
        for batch in loader:
            done += len(batch)
            if record is not None:
                record.append(batch.index.numpy())
        return done
    return epoch


# the peer ---------------------------------------------------------------------------------------------------


def litdata_items(block: tuple[int, int, str]) -> Iterator[dict]:
    """optimize()'s fn: every version of the images in [start, stop), one item per (image, version)."""
    start, stop, path = block
    table = np.load(path, mmap_mode="r")
    labels = np.load(path.replace("table.npy", "labels.npy"))
    for index in range(start, stop):
        for variant in range(table.shape[1]):
            yield {"index": index, "variant": variant, "label": int(labels[index]),
                   "x": np.ascontiguousarray(table[index, variant])}


def build_litdata(workdir: Path, table: np.ndarray, labels: np.ndarray) -> Path | None:
    try:
        import litdata
    except ImportError:
        print("  peer: litdata is not installed (pip install -e '.[bench]'); its line is left out", flush=True)
        return None
    out = workdir / "litdata"
    if not (out / "index.json").exists():
        np.save(workdir / "table.npy", table)
        np.save(workdir / "labels.npy", labels)
        step = 1000
        blocks = [(s, min(s + step, len(table)), str(workdir / "table.npy")) for s in range(0, len(table), step)]
        method = multiprocessing.get_start_method()  # optimize() sets 'spawn' for the whole process (force=True):
        timed("LitData optimize (its own chunked format)", lambda: litdata.optimize(  # every DataLoader measured
            fn=litdata_items, inputs=blocks, output_dir=str(out), chunk_bytes="64MB", num_workers=1, verbose=False))
        multiprocessing.set_start_method(method, force=True)  # after it would start its workers by spawning
    return out


def litdata_reader(path: Path, batch: int, images: int, workers: int) -> Run:
    """LitData's StreamingDataLoader with shuffle=True and a full in-chunk shuffle (its default window of 256
    items puts a few dozen distinct images in a batch; batch_decode with a full window reads ~100 samples/s
    here); an epoch is N samples, as in ours."""
    import litdata

    dataset = litdata.StreamingDataset(str(path), shuffle=True, seed=0, item_shuffle_window="full", batch_decode=False)
    loader = litdata.StreamingDataLoader(dataset, batch_size=batch, num_workers=workers)
    stream: Iterator = iter(())

    def epoch(number: int, record: list | None) -> int:
        nonlocal stream
        done = 0
        while done < images:
            item = next(stream, None)
            if item is None:
                dataset.set_epoch(number + 1)
                stream = iter(loader)
                continue
            x = torch.from_numpy(to_float(item["x"].numpy()))
            done += len(x)
            if record is not None:
                record.append(item["index"].numpy())
        return done
    return epoch


class PeerProcess:
    """The peer measured in a child process per round: LitData's loader keeps background threads busy after
    a pass, which would slow every reader measured after it in this process (by up to 50x with workers)."""

    def __init__(self, args: argparse.Namespace, path: Path, workers: int) -> None:
        self.command = [sys.executable, __file__, "--images", str(args.images), "--batch", str(args.batch),
                        "--peer-child", str(path), str(workers)]

    def measure(self) -> tuple[float, tuple[float, int]]:
        done = subprocess.run(self.command, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return result["rate"], (result["per_batch"], result["per_epoch"])


def peer_child(args: argparse.Namespace) -> None:
    """--peer-child PATH WORKERS: one warm epoch (the shuffle-quality sample), then a timed run; JSON on stdout."""
    torch.set_num_threads(1)
    run = litdata_reader(Path(args.peer_child[0]), args.batch, args.images, int(args.peer_child[1]))
    recorded: list[np.ndarray] = []
    run(0, recorded)
    per_batch, per_epoch = shuffle_quality(recorded, args.images)
    rate = samples_per_second(run, 1)
    print(json.dumps({"rate": rate, "per_batch": per_batch, "per_epoch": per_epoch}), flush=True)
    os._exit(0)  # LitData's background threads would otherwise hold the process open


# measuring --------------------------------------------------------------------------------------------------


def samples_per_second(run: Run, first_epoch: int, min_seconds: float = 0.5,
                       clock: Callable[[], float] = time.perf_counter) -> float:
    """Run epochs until `min_seconds` have passed; samples/s over them."""
    start, samples, epoch = clock(), 0, first_epoch
    while (elapsed := clock() - start) < min_seconds or not samples:
        samples += run(epoch, None)
        epoch += 1
    return samples / elapsed


def shuffle_quality(batches: list[np.ndarray], images: int) -> tuple[float, int]:
    """(mean distinct images per batch, distinct images among the epoch's first `images` samples)."""
    per_batch = float(np.mean([len(np.unique(b)) for b in batches]))
    return per_batch, len(np.unique(np.concatenate(batches)[:images]))


def builders(args: argparse.Namespace, table: np.ndarray, labels: np.ndarray, paths: dict[str, Path],
             peer: Path | None) -> dict[str, Callable[[], Run]]:
    policy = SamplerConfig(ratio=args.variants / (args.variants + 1), seed=0)  # uniform over clean + variants
    w = args.workers
    h5, h5u8, wds = paths["h5"], paths["h5-uint8"], paths["wds"]

    def mapstyle(path: Path, workers: int, stored: bool = False) -> StoreLoader:
        return make_loader(path, "train", policy, batch_size=args.batch, num_workers=workers, verify="size",
                           stored_form=stored, persistent_workers=True)

    def stream(workers: int, stored: bool = False) -> StreamLoader:
        return make_stream_loader(wds, sampler_config=policy, batch_size=args.batch, num_workers=workers,
                                  verify="size", stored_form=stored)

    readers: dict[str, Callable[[], Run]] = {
        MEMORY: lambda: in_memory(table, labels, args.batch),
        MEMORY_4K: lambda: in_memory(small_pages(table), labels, args.batch),
        MEMORY_2.replace("2", str(w)): lambda: in_memory_workers(table, labels, args.batch, w),
        "HDF5 map-style, uint8 store, 0 workers": lambda: loader_epochs(mapstyle(h5u8, 0)),
        "HDF5 map-style, float16 store, 0 workers": lambda: loader_epochs(mapstyle(h5, 0)),
        "HDF5 map-style, float16 store, 0 workers, stored form (GPU decodes)":
            lambda: loader_stored_only(mapstyle(h5, 0, stored=True)),
        "WDS streaming, 0 workers": lambda: loader_epochs(stream(0)),
        "WDS streaming, 0 workers, stored form (GPU decodes)": lambda: loader_stored_only(stream(0, stored=True)),
        f"HDF5 map-style, uint8 store, {w} workers": lambda: loader_epochs(mapstyle(h5u8, w)),
        f"HDF5 map-style, float16 store, {w} workers": lambda: loader_epochs(mapstyle(h5, w)),
        f"HDF5 map-style, float16 store, {w} workers, stored form + decode":
            lambda: loader_epochs(mapstyle(h5, w, stored=True)),
        f"HDF5 map-style, uint8 store, {w} workers, stored form + decode":
            lambda: loader_epochs(mapstyle(h5u8, w, stored=True)),
        f"WDS streaming, {w} workers": lambda: loader_epochs(stream(w)),
        f"WDS streaming, {w} workers, stored form + decode": lambda: loader_epochs(stream(w, stored=True)),
    }
    if peer is not None:
        readers[PEER] = lambda: PeerProcess(args, peer, 0)
        readers[PEER.replace("0 workers", f"{w} workers")] = lambda: PeerProcess(args, peer, w)
    if args.only:
        readers = {k: v for k, v in readers.items()
                   if k in (MEMORY, MEMORY_2, MEMORY_4K) or any(o in k for o in args.only)}
    if args.cpu_time:
        readers = {k: v for k, v in readers.items() if "0 workers" in k and k != PEER}
    return readers


def measure(args: argparse.Namespace, table: np.ndarray, labels: np.ndarray, paths: dict[str, Path],
            peer: Path | None) -> tuple[dict[str, float], dict[str, tuple[float, int]]]:
    """Best samples/s of each reader over --repeats rounds, and its shuffle quality; rounds visit every reader in
    turn, so load from elsewhere on the machine falls on all of them alike. Set-up and the first epoch are untimed."""
    readers, quality = {}, {}
    for name, build_reader in builders(args, table, labels, paths, peer).items():
        start = time.perf_counter()
        readers[name] = build_reader()
        if isinstance(readers[name], PeerProcess):
            continue
        recorded: list[np.ndarray] = []
        readers[name](0, recorded)  # warm: page cache, lazy opens; and the shuffle-quality sample
        quality[name] = shuffle_quality(recorded, args.images)
        print(f"  {name}: set-up and one warm epoch {time.perf_counter() - start:.2f} s", flush=True)
    best = dict.fromkeys(readers, 0.0)
    for round_number in range(1, args.repeats + 1):
        for name, run in readers.items():
            if isinstance(run, PeerProcess):
                rate, quality[name] = run.measure()
                best[name] = max(best[name], rate)
            else:
                best[name] = max(best[name], samples_per_second(
                    run, 100 * round_number, clock=time.process_time if args.cpu_time else time.perf_counter))
        print(f"  round {round_number} done, load average {os.getloadavg()[0]:.2f}", flush=True)
    return best, quality


def report(results: dict[str, float], quality: dict[str, tuple[float, int]], workers: int) -> None:
    memory, memory_w = results[MEMORY], results.get(MEMORY_2.replace("2", str(workers)), float("nan"))
    peer = results.get(PEER)
    print(f"\n{'reader':66s} {'samples/s':>10s} {'x mem':>6s} {'x mem,' + str(workers) + 'w':>8s} "
          f"{'x peer':>7s} {'img/batch':>9s} {'img/epoch':>9s}  target")
    for name, value in results.items():
        target = ""
        key = name.replace(f"{workers} workers", "2 workers")
        if key in TARGETS:
            base, factor = TARGETS[key]
            ratio = value / results.get(base.replace("2", str(workers)), float("nan"))
            target = f">= {factor} x {base.replace('2', str(workers))}: {'met' if ratio >= factor else 'NOT met'}"
        if name in OURS_VS_PEER and peer:
            verdict = "met" if value >= PEER_FACTOR * peer else "NOT met"
            target += f"{'; ' if target else ''}>= {PEER_FACTOR} x peer: {verdict}"
        per_batch, per_epoch = quality[name]
        print(f"{name:66s} {value:10,.0f} {value / memory:6.3f} {value / memory_w:8.2f} "
              f"{value / peer if peer else float('nan'):7.2f} {per_batch:9.1f} {per_epoch:9,d}  {target}")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.peer_child:
        peer_child(args)
    torch.set_num_threads(1)
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="advpipe-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"{args.images} images x {args.variants} variants of {SHAPE}, batches of {args.batch}, in {workdir}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, torch threads 1, "
          f"{'CPU' if args.cpu_time else 'wall'} time", flush=True)
    try:
        data = make_data(args.images, args.variants)
        paths = build(workdir, data, args.shard_size)
        table, labels = pixel_table(data), np.asarray(data.labels, dtype=np.int64)
        del data  # the float variants (7 x 4 bytes a pixel) would only weigh on every forked worker
        peer = None if args.no_peer else build_litdata(workdir, table, labels)
        results, quality = measure(args, table, labels, paths, peer)
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report(results, quality, args.workers)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
