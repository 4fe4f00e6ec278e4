"""Map-style read throughput of a store on object storage (cold and warm shard cache) next to local disk, one run.

One HDF5 store of random images (uint8 clean + float16 variants) is written to local disk and
published to an S3 bucket: moto's S3 server started on 127.0.0.1 (default), or any S3-compatible
endpoint given with --endpoint and --bucket (credentials from the usual AWS environment). Then
`make_loader` (num_workers 0, batch 256) reads one split from:

  local disk        the directory itself
  s3, cold cache    the bucket through an empty shard cache: opening the loader fetches and verifies
                    every shard into the cache
  s3, warm cache    the bucket through the cache filled by the cold run: nothing is fetched
  s3, no cache      the bucket with cache=None: each shard fetched into memory

For each: samples/s of "open + first epoch" (what a job pays to start) and of a steady epoch
(best of --repeats rounds over all readers in turn), and the cache hits/misses and bytes fetched
the loader reports after its first epoch. moto serves from
the same machine, so its fetch rate is a local server's (CPU bound), not a WAN's.

    python bench/object_storage.py                       # 8,000 images, moto, temporary directory
    python bench/object_storage.py --endpoint https://minio.local:9000 --bucket scratch
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from advpipe.config import SamplerConfig
from advpipe.sampler.mapstyle import make_loader
from advpipe.stores import SplitArrays, build_store
from advpipe.stores.cache import ShardCache
from advpipe.stores.transfer import publish

SHAPE = (3, 32, 32)
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--variants", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="steady epochs timed per reader (best kept)")
    parser.add_argument("--endpoint", help="an S3-compatible endpoint to use instead of a local moto server")
    parser.add_argument("--bucket", help="existing bucket at --endpoint (a fresh prefix is used)")
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    return parser.parse_args()


def make_data(count: int, variants: int, seed: int = 0) -> SplitArrays:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, *SHAPE), dtype=np.uint8)
    base = images.astype(np.float32) / 255
    arrays = {f"v{i}": np.clip(base + rng.normal(0, 0.03, base.shape), 0, 1).astype(np.float32)
              for i in range(variants)}
    return SplitArrays(images=images, labels=rng.integers(0, 10, count), source_fingerprint="bench", variants=arrays)


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            return server, endpoint
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("moto's S3 server did not start within 60 s")


def open_and_first_epoch(name: str, open_loader: Callable[[], object]) -> tuple[object, dict]:
    """Samples/s of opening the loader plus its first epoch (what a job pays to start), and its store metrics."""
    start = time.perf_counter()
    loader = open_loader()
    samples = sum(len(batch.index) for batch in loader)
    row = {"reader": name, "first": samples / (time.perf_counter() - start), "steady": 0.0}
    row.update({k.split("/")[1]: v for k, v in loader.metrics().items() if k.startswith("store/")})
    return loader, row


def steady_epochs(loaders: list, rows: list[dict], repeats: int) -> None:
    """`repeats` rounds, each timing one epoch of every loader in turn; the best rate of each is kept.

    Interleaving spreads the load of a shared machine over all readers alike.
    """
    for _ in range(repeats):
        for loader, row in zip(loaders, rows, strict=True):
            start = time.perf_counter()
            count = sum(len(batch.index) for batch in loader)
            row["steady"] = max(row["steady"], count / (time.perf_counter() - start))


def main() -> None:
    args = parse_args()
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="advpipe-bench-s3-"))
    server = None
    if args.endpoint:
        endpoint, bucket = args.endpoint, args.bucket
        if not bucket:
            raise SystemExit("--endpoint needs --bucket")
    else:
        server, endpoint = start_moto()
        os.environ.update(FAKE_CREDENTIALS)
        bucket = "advpipe-bench"
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        run(args, workdir, f"s3://{bucket}/bench-{uuid.uuid4().hex[:8]}")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)


def run(args: argparse.Namespace, workdir: Path, url: str) -> None:
    local = workdir / "store"
    if not (local / "manifest.json").exists():
        build_store(local, {"train": make_data(args.images, args.variants)}, class_names=[f"c{i}" for i in range(10)],
                    shard_size=args.shard_size, progress=False)
    size = sum(p.stat().st_size for p in local.rglob("*.h5"))
    start = time.perf_counter()
    publish(local, url)
    seconds = time.perf_counter() - start
    print(f"store: {args.images} images {SHAPE}, {args.variants} variants, {size / 2**20:.1f} MiB in "
          f"{args.images // args.shard_size + (args.images % args.shard_size > 0)} shards; published to {url} in "
          f"{seconds:.1f} s ({size / 2**20 / seconds:.1f} MiB/s incl. read-back)")
    config = SamplerConfig(ratio=(0.5, 0.5), seed=0, batch_size=args.batch)
    cache = ShardCache(workdir / f"cache-{uuid.uuid4().hex[:8]}", max_bytes=4 * size)
    opened = [
        open_and_first_epoch("local disk", lambda: make_loader(local, "train", config)),
        open_and_first_epoch("s3, cold cache", lambda: make_loader(url, "train", config, cache=cache)),
        open_and_first_epoch("s3, warm cache", lambda: make_loader(url, "train", config, cache=cache)),
        open_and_first_epoch("s3, no cache", lambda: make_loader(url, "train", config, cache=None)),
    ]
    rows = [row for _, row in opened]
    steady_epochs([loader for loader, _ in opened], rows, args.repeats)
    print(f"\n{'reader':<16}{'open+epoch 1':>14}{'steady':>11}{'hits':>7}{'misses':>8}{'MiB fetched':>13}"
          "   (samples/s, map-style, 0 workers)")
    for row in rows:
        print(f"{row['reader']:<16}{row['first']:>14,.0f}{row['steady']:>11,.0f}{row.get('cache_hits', 0):>7}"
              f"{row.get('cache_misses', 0):>8}{row.get('bytes_fetched', 0) / 2**20:>13.1f}")
    local_first, local_steady = rows[0]["first"], rows[0]["steady"]
    print("\nrelative to local disk (open+epoch 1 / steady): "
          + ", ".join(f"{r['reader']} {r['first'] / local_first:.2f} / {r['steady'] / local_steady:.2f}"
                      for r in rows[1:]))


if __name__ == "__main__":
    main()
