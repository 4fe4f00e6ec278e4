"""Streaming reads of WebDataset stores, from a local directory or any fsspec URL (http://, s3://, ...).

Teams share stores, so shards may live on another machine: a shard is fetched whole
(one sequential read or one HTTP request), checked against the manifest's sha256
before any of its samples is used, parsed, and its samples flow through a shuffle
buffer into batches. Batches are assembled inside the dataset (use DataLoader with
batch_size=None): stacking per-sample tensors in a collate function would cost more
than reading them.

Exactly once per epoch. The shard order is shuffled with a generator seeded by
(seed, epoch), identical in every process. DataLoader workers and distributed ranks
form `world_size * num_workers` slots, slot = rank * num_workers + worker_id. With S
shards, the first S - S mod slots shards of the order are dealt round-robin, whole, to
the slots; the remaining shards (all of them when S < slots) are read by every slot,
and each slot keeps only the images whose id mod slots is its slot. Every image thus
goes to exactly one slot; slots differ by at most one shard's worth of images, so ranks
can end an epoch a batch or so apart (the last batch of each slot may be partial).

The variant of an image is chosen by `Policy.choose` with the image id as position, so
it depends on (seed, epoch, id) only, never on the slot layout or the shuffle. With
redraw='batch' the resampling point is the block of `sampler.batch_size` consecutive ids
an image belongs to (point = id // batch_size): each point governs as many draws as a
batch, and draws stay layout-independent; a shuffled training batch mixes blocks.

The same seed, epoch and layout (ranks, workers, buffer) give the same sequence.
Changes to the policy (adaptive mode, `set_epoch`) reach DataLoader workers when an
epoch's iterator starts, so do not use persistent workers.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from advpipe.config import SamplerConfig
from advpipe.errors import IntegrityError, StoreError
from advpipe.sampler.policy import Policy
from stores import codec
from stores.manifest import MANIFEST_NAME, Manifest, ShardRecord, parse_manifest
from stores.wds import Record, iter_records

log = logging.getLogger(__name__)

Samples = dict[str, np.ndarray]  # parallel arrays: index, label, variant, clean (uint8), stored (chosen variant)
Verify = Literal["checksum", "size"]
SHARD_ORDER, BUFFER_ORDER = 1, 2  # tags that keep the two shuffles' generators apart
MASK64 = (1 << 64) - 1


class StreamingVariantDataset(IterableDataset):
    """Stream one split of a WebDataset store, choosing each image's variant with the sampler policy.

    Yields dicts of tensors: x float32 in [0, 1], y int64 label, variant int64 (0 = clean),
    is_adv bool, index int64 (the image id), and x_clean when pair_clean. With batch_size
    each item is a batch (leading dimension); without, one sample.

    verify='checksum' hashes every fetched shard; a local shard that this process has
    already verified and whose size, mtime and inode are unchanged is trusted, as
    `stores.Store` does. verify='size' only compares sizes. `prefetch` shards are fetched
    and verified on a background thread while the current one is parsed.
    """

    def __init__(self, location: str | os.PathLike, split: str = "train", sampler: SamplerConfig | None = None, *,
                 batch_size: int | None = None, shuffle: bool = True, shuffle_buffer: int = 1024,
                 rank: int | None = None, world_size: int | None = None, pair_clean: bool | None = None,
                 drop_last: bool = False, verify: Verify = "checksum", prefetch: int = 1,
                 storage_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.sampler = sampler or SamplerConfig()
        self.source = ShardSource(str(location), storage_options or {}, verify)
        self.manifest = self.source.manifest()
        self._check_store(split)
        self.split = split
        self.shards = self.manifest.splits[split].shards
        self.policy = Policy.from_config(self.sampler, ["clean", *self.manifest.variant_names])
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be positive or None, got {batch_size}")
        self.batch_size, self.drop_last = batch_size, drop_last
        self.shuffle, self.shuffle_buffer = shuffle, max(0, shuffle_buffer) if shuffle else 0
        self.pair_clean = self.sampler.pair_clean if pair_clean is None else pair_clean
        self.prefetch = max(0, prefetch)
        self.epoch = 0

    def _check_store(self, split: str) -> None:
        location, manifest = self.source.location, self.manifest
        if manifest.backend != "webdataset":
            raise StoreError(
                f"{location}: a {manifest.backend} store cannot be streamed; streaming reads WebDataset stores. "
                f"Convert it with `advpipe convert {location} NEW_STORE --to webdataset`, or read it with the "
                "map-style sampler (advpipe.sampler.mapstyle)"
            )
        if split not in manifest.splits:
            raise StoreError(f"{location}: store has no split '{split}' (it has: {', '.join(manifest.splits)})")

    @property
    def count(self) -> int:
        """Images in the split (over all ranks and workers)."""
        return self.manifest.splits[self.split].count

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffles and variant draws the next iteration makes."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        slot, slots = self._slot()
        plan = self.plan(self.epoch, slot, slots)
        log.debug("epoch %d: slot %d of %d reads %d shard(s)", self.epoch, slot, slots, len(plan))
        chunks = self._chunks(plan, slot, slots)
        if self.shuffle_buffer:
            rng = np.random.default_rng([BUFFER_ORDER, self.sampler.seed & MASK64, self.epoch & MASK64, slot])
            chunks = shuffle_chunks(chunks, self.shuffle_buffer, rng)
        if self.batch_size is None:
            for chunk in chunks:
                tensors = self._tensors(chunk)
                for row in range(len(chunk["index"])):
                    yield {key: value[row] for key, value in tensors.items()}
        else:
            for batch in rebatch(chunks, self.batch_size, self.drop_last):
                yield self._tensors(batch)

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def plan(self, epoch: int, slot: int, slots: int) -> list[tuple[int, bool]]:
        """(shard index, shared) pairs this slot reads, in order; a shared shard is split by image id."""
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = np.random.default_rng([SHARD_ORDER, self.sampler.seed & MASK64, epoch & MASK64]).permutation(order)
        whole = len(order) // slots * slots
        return [(int(i), False) for i in order[slot:whole:slots]] + [(int(i), True) for i in order[whole:]]

    def _chunks(self, plan: list[tuple[int, bool]], slot: int, slots: int) -> Iterator[Samples]:
        """Each planned shard as one chunk of samples in stored form, its variants already chosen."""
        records = [self.shards[index] for index, _ in plan]
        for (_, shared), record, data in zip(plan, records, self.source.fetch_all(records, self.prefetch),
                                             strict=True):
            chunk = self._parse(record, data, (slot, slots) if shared else None)
            if len(chunk["index"]):
                yield chunk

    def _parse(self, shard: ShardRecord, data: Any, keep: tuple[int, int] | None) -> Samples:
        records = list(iter_records(memoryview(data), shard.name))
        ids = np.fromiter((r.id for r in records), dtype=np.int64, count=len(records))
        if len(ids) != shard.count or not np.array_equal(ids, np.arange(shard.start, shard.stop)):
            raise IntegrityError(f"shard {shard.name}: holds images {_span(ids)}, manifest says "
                                 f"[{shard.start}, {shard.stop}); run `advpipe verify`")
        if keep is not None:
            slot, slots = keep
            records = [r for r in records if r.id % slots == slot]
            ids = ids[ids % slots == slot]
        variants = self._choose(ids, self._failed(shard.name, records))
        clean, stored = self._gather(shard.name, records, variants)
        labels = np.fromiter((r.label for r in records), dtype=np.int64, count=len(records))
        return {"index": ids, "label": labels, "variant": variants, "clean": clean, "stored": stored}

    def _failed(self, shard: str, records: list[Record]) -> np.ndarray:
        """Bool (n, V+1): the variants whose generation failed for each image."""
        columns = {name: column for column, name in enumerate(self.manifest.variant_names, start=1)}
        failed = np.zeros((len(records), len(columns) + 1), dtype=bool)
        for row, record in enumerate(records):
            for name in record.failed:
                if name not in columns:
                    raise IntegrityError(f"shard {shard}: record '{record.key}' lists unknown failed variant "
                                         f"'{name}'; run `advpipe verify`")
                failed[row, columns[name]] = True
        return failed

    def _choose(self, ids: np.ndarray, failed: np.ndarray) -> np.ndarray:
        if self.policy.redraw != "batch":
            return self.policy.choose(self.epoch, ids, failed=failed)
        blocks = ids // self.sampler.batch_size
        variants = np.empty_like(ids)
        for block in np.unique(blocks):
            rows = blocks == block
            variants[rows] = self.policy.choose(self.epoch, ids[rows], batch=int(block), failed=failed[rows])
        return variants

    def _gather(self, shard: str, records: list[Record], variants: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Copy out each image's clean pixels and its chosen variant, so the shard's bytes can go."""
        shape = tuple(self.manifest.image_shape)
        dtype = np.dtype(codec.STORED_DTYPE[self.manifest.precision])
        stacked = (len(self.manifest.variants), *shape)
        bad = [r.key for r in records if r.clean.shape != shape or r.clean.dtype != np.uint8
               or (stacked[0] and (r.variants is None or r.variants.shape != stacked or r.variants.dtype != dtype))]
        if bad:
            raise IntegrityError(f"shard {shard}: record '{bad[0]}' does not have the manifest's image shape "
                                 f"{shape}, variants or precision; run `advpipe verify`")
        clean = np.stack([r.clean for r in records]) if records else np.empty((0, *shape), dtype=np.uint8)
        stored = clean.copy() if self.manifest.precision == "uint8" else np.zeros(clean.shape, dtype=dtype)
        adversarial = np.flatnonzero(variants)
        if len(adversarial):
            stored[adversarial] = np.stack([records[i].variants[variants[i] - 1] for i in adversarial])
        return clean, stored

    def _tensors(self, samples: Samples) -> dict[str, torch.Tensor]:
        """Decode a chunk or batch in one vectorised step (clean picks hold the identity of the codec)."""
        out = {
            "x": torch.from_numpy(codec.decode(samples["clean"], samples["stored"], self.manifest.precision)),
            "y": torch.from_numpy(samples["label"]),
            "variant": torch.from_numpy(samples["variant"]),
            "is_adv": torch.from_numpy(samples["variant"] > 0),
            "index": torch.from_numpy(samples["index"]),
        }
        if self.pair_clean:
            out["x_clean"] = torch.from_numpy(codec.to_float(samples["clean"]))
        return out


class ShardSource:
    """Where a store's files are, and how to fetch a shard's bytes verified against the manifest.

    Holds only the location and options, so it pickles into DataLoader workers; each
    process makes its own fsspec filesystem (and HTTP session) on first use.
    """

    def __init__(self, location: str, storage_options: dict[str, Any], verify: Verify) -> None:
        if verify not in ("checksum", "size"):
            raise ValueError(f"verify must be 'checksum' or 'size', got {verify!r}")
        self.location = location
        self.storage_options = storage_options
        self.verify = verify
        self._verified: dict[str, tuple[int, ...]] = {}  # local shard path -> stat signature it was hashed at
        self._fs: tuple[int, fsspec.AbstractFileSystem, str] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None}

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        if self._fs is None or self._fs[0] != os.getpid():
            fs, root = fsspec.core.url_to_fs(self.location, **self.storage_options)
            self._fs = (os.getpid(), fs, root.rstrip("/"))
        return self._fs[1], self._fs[2]

    def manifest(self) -> Manifest:
        fs, root = self.filesystem()
        try:
            text = fs.cat_file(f"{root}/{MANIFEST_NAME}")
        except FileNotFoundError:
            raise StoreError(f"{self.location}: not a finished store (no {MANIFEST_NAME}); it may still be being "
                             "generated, or the location is wrong") from None
        except OSError as exc:
            raise StoreError(f"{self.location}: cannot read {MANIFEST_NAME} ({exc})") from None
        return parse_manifest(text, f"{self.location}/{MANIFEST_NAME}")

    def fetch_all(self, shards: list[ShardRecord], ahead: int) -> Iterator[Any]:
        """Each shard's verified bytes in order, fetching up to `ahead` shards in the background."""
        if not ahead:
            yield from map(self.fetch, shards)
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="advpipe-shard-fetch")
        pending: deque[Future] = deque()
        try:
            for shard in shards:
                pending.append(pool.submit(self.fetch, shard))
                if len(pending) > ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def fetch(self, shard: ShardRecord) -> Any:
        """The shard's whole bytes (a read-only mmap for local files); IntegrityError if they do not match."""
        fs, root = self.filesystem()
        path = f"{root}/{shard.name}"
        if isinstance(fs, LocalFileSystem):
            data, signature = self._local(shard, path)
        else:
            data, signature = self._remote(fs, shard, path), None
        if len(data) != shard.bytes:
            raise IntegrityError(f"shard {shard.name}: {len(data)} bytes, manifest says {shard.bytes} "
                                 "(truncated or replaced)")
        if self.verify == "checksum" and (signature is None or self._verified.get(path) != signature):
            if hashlib.sha256(data).hexdigest() != shard.sha256:
                raise IntegrityError(f"shard {shard.name}: sha256 does not match the manifest (the file is corrupt)")
            if signature is not None:
                self._verified[path] = signature
        return data

    def _local(self, shard: ShardRecord, path: str) -> tuple[Any, tuple[int, ...]]:
        try:
            with open(path, "rb") as handle:
                stat = os.fstat(handle.fileno())
                data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if stat.st_size else b""
        except FileNotFoundError:
            raise IntegrityError(f"shard {shard.name}: missing from {self.location}") from None
        except OSError as exc:
            raise IntegrityError(f"shard {shard.name}: cannot be read ({exc})") from None
        return data, (stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev)

    def _remote(self, fs: fsspec.AbstractFileSystem, shard: ShardRecord, path: str) -> bytes:
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            raise IntegrityError(f"shard {shard.name}: missing from {self.location}") from None
        except OSError as exc:
            raise StoreError(f"shard {shard.name}: cannot be read from {self.location} ({exc})") from None


def shuffle_chunks(chunks: Iterable[Samples], size: int, rng: np.random.Generator) -> Iterator[Samples]:
    """A shuffle buffer of `size` samples, exchanged a chunk at a time.

    Each incoming chunk of n samples sends out n samples drawn uniformly without
    replacement from buffer + chunk, in random order; the chunk's samples not sent take
    the freed places. Working on whole chunks keeps the cost to numpy gathers instead of
    Python work per sample.
    """
    pool: Samples | None = None
    for chunk in chunks:
        if pool is None or len(pool["index"]) < size:  # filling: the pool owns copies, it is refilled in place
            room = size - (0 if pool is None else len(pool["index"]))
            head = {key: values[:room].copy() for key, values in chunk.items()}
            pool = head if pool is None else concat([pool, head])
            chunk = take(chunk, slice(room, None))
            if not len(chunk["index"]):
                continue
        yield _exchange(pool, chunk, rng)
    if pool is not None and len(pool["index"]):
        yield take(pool, rng.permutation(len(pool["index"])))


def _exchange(pool: Samples, chunk: Samples, rng: np.random.Generator) -> Samples:
    """Send out len(chunk) random samples of pool + chunk; refill the pool in place with the chunk's rest."""
    held, incoming = len(pool["index"]), len(chunk["index"])
    picks = rng.permutation(held + incoming)[:incoming]
    from_pool = picks < held
    out = {}
    for key, values in pool.items():
        out[key] = np.empty((incoming, *values.shape[1:]), dtype=values.dtype)
        out[key][from_pool] = values[picks[from_pool]]
        out[key][~from_pool] = chunk[key][picks[~from_pool] - held]
    staying = np.ones(incoming, dtype=bool)
    staying[picks[~from_pool] - held] = False
    for key, values in pool.items():
        values[picks[from_pool]] = chunk[key][staying]
    return out


def rebatch(chunks: Iterable[Samples], size: int, drop_last: bool = False) -> Iterator[Samples]:
    """Cut a stream of chunks into batches of `size` (the last may be smaller unless drop_last)."""
    parts: list[Samples] = []
    have = 0
    for chunk in chunks:
        start, length = 0, len(chunk["index"])
        while start < length:
            step = min(size - have, length - start)
            parts.append(take(chunk, slice(start, start + step)))
            have, start = have + step, start + step
            if have == size:
                yield concat(parts)
                parts, have = [], 0
    if have and not drop_last:
        yield concat(parts)


def take(samples: Samples, rows: slice | np.ndarray) -> Samples:
    return {key: values[rows] for key, values in samples.items()}


def concat(parts: list[Samples]) -> Samples:
    if len(parts) == 1:
        return parts[0]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _span(ids: np.ndarray) -> str:
    return f"{len(ids)} images [{ids.min()}, {ids.max() + 1})" if len(ids) else "no images"


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values win; otherwise torch.distributed's, if initialised; otherwise a single process."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if distributed else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if distributed else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank} and world_size {world_size}")
    return rank, world_size


def make_stream_loader(location: str | os.PathLike, split: str = "train", sampler_config: SamplerConfig | None = None,
                       batch_size: int = 256, num_workers: int = 0, shuffle_buffer: int = 1024,
                       rank: int | None = None, world_size: int | None = None, pair_clean: bool | None = None,
                       **options: Any) -> DataLoader:
    """A DataLoader over a StreamingVariantDataset that batches inside the dataset.

    Call `loader.dataset.set_epoch(epoch)` before each epoch. Workers are not persistent,
    so each epoch's workers start from the dataset's current epoch and policy. `options`
    go to StreamingVariantDataset (shuffle, drop_last, verify, prefetch, storage_options).
    """
    dataset = StreamingVariantDataset(location, split, sampler_config, batch_size=batch_size,
                                      shuffle_buffer=shuffle_buffer, rank=rank, world_size=world_size,
                                      pair_clean=pair_clean, **options)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      prefetch_factor=2 if num_workers else None)
