"""Streaming reads of WebDataset stores, from a local directory or any fsspec URL (http://, s3://, ...).

Teams share stores, so shards may live on another machine: a shard is fetched whole
(memory-mapped if local, one request or fsspec read if remote), checked against the
manifest's sha256 before any of its samples is used, parsed, and its samples flow
through a shuffle buffer into batches. Batches are assembled inside the dataset (use DataLoader with
batch_size=None): stacking per-sample tensors in a collate function would cost more
than reading them.

Exactly once per epoch, and the same number of batches on every rank. The shard order
is shuffled with a generator seeded by (seed, epoch), identical in every process.
DataLoader workers and distributed ranks form `world_size * num_workers` readers (slots),
slot = rank * num_workers + worker_id. Full-size shards are dealt whole, round-robin, to
the slots, as many as divide evenly; every other shard (the split's short last shard, the
remainder) is shared: each slot keeps the images whose position among the shared images,
mod slots, is its slot. Slots then differ by at most one image, and every slot is padded
to ceil(count / slots) images by repeating its first image (as DistributedSampler pads),
or with drop_last cut to floor(count / slots) and its last partial batch dropped. So every
rank yields the same number of batches (DistributedDataParallel needs that), and apart
from at most one padded repeat per slot every image is read exactly once.

The variant of an image is chosen by `Policy.choose` with the image id as position, so
it depends on (seed, epoch, id) only, never on the slot layout or the shuffle. With
redraw='batch' the resampling point is the block of `sampler.batch_size` consecutive ids
an image belongs to (point = id // batch_size): each point governs as many draws as a
batch, and draws stay layout-independent; a shuffled training batch mixes blocks.

Reading cost is kept off the per-record path: a shard with the fixed layout the writer
produces is read as strided numpy views of its bytes (advpipe.stores.wds.TarParser), only each image's
clean pixels and chosen variant are copied out, and decoding runs a batch at a time.

The same seed, epoch and layout (ranks, workers, buffer) give the same sequence.
Changes to the policy (adaptive mode, `set_epoch`) reach DataLoader workers when an
epoch's iterator starts, so do not use persistent workers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from advpipe.batch import Batch, StoredPixels
from advpipe.config import SamplerConfig
from advpipe.errors import IntegrityError, SamplerError, StoreError
from advpipe.sampler.loader import EpochLoader
from advpipe.sampler.mapstyle import distributed_layout, output_buffer
from advpipe.sampler.policy import Policy, scenario_variants
from advpipe.stores import codec
from advpipe.stores.backends import backend
from advpipe.stores.manifest import ShardRecord
from advpipe.stores.source import ShardSource
from advpipe.stores.store import StoredRows
from advpipe.stores.wds import ShardColumns, TarParser

log = logging.getLogger(__name__)

Samples = dict[str, np.ndarray]  # parallel arrays: index, label, variant, clean (uint8), stored (chosen variant)
Verify = Literal["checksum", "size"]
SHARD_ORDER, BUFFER_ORDER = 1, 2  # tags that keep the two shuffles' generators apart
MASK64 = (1 << 64) - 1


class StreamingVariantDataset(IterableDataset):
    """Stream one split of a WebDataset store, choosing each image's variant with the sampler policy.

    With batch_size each item is a `Batch` (advpipe.batch); without, one sample as a dict of
    the same fields (x, y, variant, is_adv, index, and x_clean when pair_clean).

    verify='checksum' (default): a local store's shards are all hashed at construction
    (about a second per GB, so corruption is an error then, naming the shard) and trusted
    afterwards while their size, mtime and inode are unchanged; a changed file is hashed
    again before use. A remote shard is hashed every time it is fetched, before any of its
    samples is used. verify='size' only compares sizes. `prefetch` shards are fetched and
    verified on a background thread while the current one is parsed.
    """

    def __init__(self, location: str | os.PathLike, split: str = "train", sampler: SamplerConfig | None = None, *,
                 batch_size: int | None = None, shuffle: bool = True, shuffle_buffer: int = 1024,
                 rank: int | None = None, world_size: int | None = None, pair_clean: bool | None = None,
                 drop_last: bool = False, verify: Verify = "checksum", prefetch: int = 1,
                 storage_options: dict[str, Any] | None = None, stored_form: bool | None = None) -> None:
        super().__init__()
        self.sampler = sampler or SamplerConfig()
        self.source = ShardSource(str(location), storage_options or {}, verify)
        self.manifest = self.source.manifest()
        self._check_store(split)
        self.reader = TarParser.of(self.manifest)
        self.split = split
        self.shards = self.manifest.splits[split].shards
        self.source.verify_local(self.shards)
        self.policy = Policy.from_config(self.sampler, ["clean", *self.manifest.variant_names],
                                         scenario_variants(self.manifest))
        self.rank, self.world_size = distributed_layout(rank, world_size)
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be positive or None, got {batch_size}")
        self.batch_size, self.drop_last = batch_size, drop_last
        self.shuffle, self.shuffle_buffer = shuffle, max(0, shuffle_buffer) if shuffle else 0
        self.pair_clean = self.sampler.pair_clean if pair_clean is None else pair_clean
        self.stored_form = self.sampler.stored_form if stored_form is None else stored_form
        self.prefetch = max(0, prefetch)
        self.epoch = 0

    def _check_store(self, split: str) -> None:
        location, manifest = self.source.location, self.manifest
        if not backend(manifest.backend).streamable:
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

    def __iter__(self) -> Iterator[Batch | dict[str, torch.Tensor]]:
        slot, slots = self._slot()
        plan = self.plan(self.epoch, slot, slots)
        natural, target = self.slot_count(plan, slot, slots), self.slot_target(slots)
        if natural == 0 and target > 0:
            raise SamplerError(f"split '{self.split}' has {self.count} images, fewer than the {slots} readers "
                               "(ranks x DataLoader workers): use fewer workers or ranks")
        log.debug("epoch %d: slot %d of %d reads %d shard(s), %d images, padded or cut to %d", self.epoch, slot,
                  slots, len(plan), natural, target)
        chunks: Iterator[Samples]
        if self.shuffle_buffer:
            rng = np.random.default_rng([BUFFER_ORDER, self.sampler.seed & MASK64, self.epoch & MASK64, slot])
            chunks = shuffle_chunks(self._chunks(plan, slot, slots), self.shuffle_buffer, rng)
        else:
            chunks = (chunk.take(slice(None)) for chunk in self._chunks(plan, slot, slots))
        chunks = fit_count(chunks, target, max(0, target - natural))
        if self.batch_size is None:
            for chunk in chunks:
                tensors = self._batch(chunk).decode().tensors()
                tensors["is_adv"] = tensors["variant"] > 0
                for row in range(len(chunk["index"])):
                    yield {key: value[row] for key, value in tensors.items()}
        else:
            for batch in rebatch(chunks, self.batch_size, self.drop_last):
                yield self._batch(batch)

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def plan(self, epoch: int, slot: int, slots: int) -> list[tuple[int, int | None]]:
        """(shard index, offset) pairs this slot reads, in order.

        Full-size shards are dealt whole, round-robin, in multiples of `slots`; every other shard is
        shared: offset is the number of shared images before it, and a slot keeps the shared images
        whose position (offset + row) mod slots is its slot. So slots differ by at most one image.
        """
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = np.random.default_rng([SHARD_ORDER, self.sampler.seed & MASK64, epoch & MASK64]).permutation(order)
        full = max((shard.count for shard in self.shards), default=0)
        whole = [int(i) for i in order if self.shards[i].count == full]
        whole = whole[: len(whole) // slots * slots]
        dealt = set(whole)
        plan: list[tuple[int, int | None]] = [(i, None) for i in whole[slot::slots]]
        offset = 0
        for index in (int(i) for i in order if int(i) not in dealt):
            plan.append((index, offset))
            offset += self.shards[index].count
        return plan

    def slot_count(self, plan: list[tuple[int, int | None]], slot: int, slots: int) -> int:
        """Images this slot's plan holds (before padding or cutting)."""
        count = 0
        for index, offset in plan:
            size = self.shards[index].count
            count += size if offset is None else len(range((slot - offset) % slots, size, slots))
        return count

    def slot_target(self, slots: int) -> int:
        """Images every slot yields per epoch: the split shared out, padded up (or, with drop_last, cut down)."""
        return self.count // slots if self.drop_last else -(-self.count // slots)

    def batches_per_slot(self, slots: int) -> int:
        target, size = self.slot_target(slots), self.batch_size or 1
        return target // size if self.drop_last else -(-target // size)

    def _chunks(self, plan: list[tuple[int, int | None]], slot: int, slots: int) -> Iterator[Pending]:
        """Each planned shard's samples for this slot, their variants chosen."""
        shards = [self.shards[index] for index, _ in plan]
        for (_, offset), shard, data in zip(plan, shards, self.source.fetch_all(shards, self.prefetch), strict=True):
            chunk = self._parse(shard, data, None if offset is None else (slot, slots, offset))
            if len(chunk):
                yield chunk

    def _parse(self, shard: ShardRecord, data: Any, keep: tuple[int, int, int] | None) -> Pending:
        """Check the shard's images, keep this slot's and choose their variants (pixels are copied later)."""
        columns = self.reader.read(data, shard)
        ids = columns.ids
        if len(ids) != shard.count or not np.array_equal(ids, np.arange(shard.start, shard.stop)):
            raise IntegrityError(f"shard {shard.name}: holds images {_span(ids)}, manifest says "
                                 f"[{shard.start}, {shard.stop}); run `advpipe verify`")
        rows = np.arange(len(ids))
        if keep is not None:
            slot, slots, offset = keep
            rows = rows[(offset + rows) % slots == slot]
        variants = self._choose(ids[rows], columns.failed[rows])
        return Pending(ids[rows], columns.labels[rows], variants, rows, columns, self.manifest.precision)

    def _choose(self, ids: np.ndarray, failed: np.ndarray) -> np.ndarray:
        if self.policy.redraw != "batch":
            return self.policy.choose(self.epoch, ids, failed=failed)
        blocks = ids // self.sampler.batch_size
        variants = np.empty_like(ids)
        for block in np.unique(blocks):
            rows = blocks == block
            variants[rows] = self.policy.choose(self.epoch, ids[rows], batch=int(block), failed=failed[rows])
        return variants

    def _batch(self, samples: Samples) -> Batch:
        """Decode a chunk or batch in one fused step (clean picks hold the identity of the codec), or, with
        stored_form, hand on the stored form for `Batch.decode` on the device."""
        item = {"y": torch.from_numpy(samples["label"]), "variant": torch.from_numpy(samples["variant"]),
                "index": torch.from_numpy(samples["index"])}
        precision = self.manifest.precision
        if self.stored_form:
            rows = StoredRows(samples["stored"], samples["clean"], precision)
            return Batch(x=None, stored=StoredPixels.of(rows, self.pair_clean), **item)
        x = codec.decode(samples["clean"], samples["stored"], precision, output_buffer(samples["clean"].shape))
        x_clean = codec.to_float(samples["clean"], output_buffer(samples["clean"].shape)) if self.pair_clean else None
        return Batch(x=torch.from_numpy(x), x_clean=None if x_clean is None else torch.from_numpy(x_clean), **item)


@dataclass
class Pending:
    """A shard's samples for one slot, variants chosen, pixels still in the shard's bytes.

    `take` and `put` copy out only each sample's clean image and chosen variant, straight
    to where the sample goes next (the shuffle buffer or an output chunk); the shard's
    bytes are released once its samples have all been copied.
    """

    index: np.ndarray  # int64 (n,): image ids
    label: np.ndarray
    variant: np.ndarray  # chosen variant ids (0 = clean)
    rows: np.ndarray  # the samples' rows in `columns`
    columns: ShardColumns
    precision: str

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, positions: slice | np.ndarray) -> Pending:
        return Pending(self.index[positions], self.label[positions], self.variant[positions], self.rows[positions],
                       self.columns, self.precision)

    def take(self, positions: slice | np.ndarray) -> Samples:
        """The samples at `positions` as new arrays; a clean pick stores the codec's identity."""
        positions = np.arange(len(self))[positions]  # an index array, so that every result is a copy
        rows, variant = self.rows[positions], self.variant[positions]
        clean = self.columns.clean[rows]
        stored = clean.copy() if self.precision == "uint8" else np.zeros(clean.shape, self.columns.stored_dtype)
        adversarial = np.flatnonzero(variant)
        stored[adversarial] = self.columns.gather(rows[adversarial], variant[adversarial] - 1)
        return {"index": self.index[positions], "label": self.label[positions], "variant": variant, "clean": clean,
                "stored": stored}

    def put(self, positions: np.ndarray, out: Samples, at: np.ndarray) -> None:
        """Write the samples at `positions` into rows `at` of `out`."""
        for key, values in self.take(positions).items():
            out[key][at] = values


def shuffle_chunks(chunks: Iterable[Pending], size: int, rng: np.random.Generator) -> Iterator[Samples]:
    """A shuffle buffer of `size` samples, exchanged a chunk at a time.

    Each incoming chunk of n samples sends out n samples drawn uniformly without
    replacement from buffer + chunk, in random order; the chunk's samples not sent take
    the freed places. Working on whole chunks keeps the cost to numpy gathers instead of
    Python work per sample.
    """
    pool: Samples | None = None
    for chunk in chunks:
        held = 0 if pool is None else len(pool["index"])
        if held < size:  # filling
            head = chunk.take(slice(0, size - held))
            pool = head if pool is None else concat([pool, head])
            chunk = chunk.subset(slice(size - held, None))
            if not len(chunk):
                continue
        yield _exchange(pool, chunk, rng)
    if pool is not None and len(pool["index"]):
        yield take(pool, rng.permutation(len(pool["index"])))


def _exchange(pool: Samples, chunk: Pending, rng: np.random.Generator) -> Samples:
    """Send out len(chunk) random samples of pool + chunk; refill the pool in place with the chunk's rest."""
    held, incoming = len(pool["index"]), len(chunk)
    picks = rng.permutation(held + incoming)[:incoming]
    at_pool, at_chunk = np.flatnonzero(picks < held), np.flatnonzero(picks >= held)
    freed, sent = picks[at_pool], picks[at_chunk] - held
    out = {key: np.empty((incoming, *values.shape[1:]), values.dtype) for key, values in pool.items()}
    for key, values in pool.items():
        out[key][at_pool] = values[freed]
    chunk.put(sent, out, at_chunk)
    staying = np.ones(incoming, dtype=bool)
    staying[sent] = False
    chunk.put(np.flatnonzero(staying), pool, freed)
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


def fit_count(chunks: Iterable[Samples], target: int, pad: int) -> Iterator[Samples]:
    """Cut a stream at `target` samples, or pad it to `target` by repeating its first `pad` samples.

    This is what gives every rank the same number of batches per epoch (as DistributedSampler does):
    the only repeats are the documented padding, at most one image per reader.
    """
    sent, head = 0, []
    for chunk in chunks:
        room = target - sent
        if room <= 0:
            break
        part = chunk if len(chunk["index"]) <= room else take(chunk, slice(0, room))
        held = sum(len(h["index"]) for h in head)
        if held < pad:
            head.append(take(part, slice(0, pad - held)))
        sent += len(part["index"])
        yield part
    if sent < target and head:
        yield take(concat(head), slice(0, target - sent))


def take(samples: Samples, rows: slice | np.ndarray) -> Samples:
    return {key: values[rows] for key, values in samples.items()}


def concat(parts: list[Samples]) -> Samples:
    if len(parts) == 1:
        return parts[0]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _span(ids: np.ndarray) -> str:
    return f"{len(ids)} images [{ids.min()}, {ids.max() + 1})" if len(ids) else "no images"


class StreamLoader(EpochLoader):
    """Streaming loader: one pass of `for batch in loader` is one epoch, as with `mapstyle.StoreLoader`.

    Resuming: the stream's order is a pure function of (seed, epoch, rank, world size,
    num_workers), so resuming replays the epoch and drops the batches the consumer had
    already received; the rest is identical to an uninterrupted run. The saved layout must
    match: a state from another layout is refused. Policy changes (adaptive mode) reach
    DataLoader workers when an epoch starts, so workers are never persistent.
    """

    def __init__(self, dataset: StreamingVariantDataset, num_workers: int = 0, pin_memory: bool = False) -> None:
        super().__init__(["clean", *dataset.manifest.variant_names])
        self.dataset = dataset
        self.policy = dataset.policy
        self.num_workers = num_workers
        self.dataloader = DataLoader(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False,
                                     pin_memory=pin_memory)
        slots = dataset.world_size * max(1, num_workers)
        if dataset.count < slots:
            raise SamplerError(f"split '{dataset.split}' has {dataset.count} images, fewer than the {slots} readers "
                               "(ranks x DataLoader workers): use fewer workers or ranks")
        self._length = max(1, num_workers) * dataset.batches_per_slot(slots)
        if not self._length:
            raise SamplerError(f"split '{dataset.split}' has {dataset.count} images: no full batch of "
                               f"{dataset.batch_size} per reader with drop_last ({slots} readers)")

    def __len__(self) -> int:
        return self._length

    def layout(self) -> dict:
        return {"seed": self.policy.seed, "rank": self.dataset.rank, "world_size": self.dataset.world_size,
                "num_workers": self.num_workers, "batch_size": self.dataset.batch_size}

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[Batch]:
        self.dataset.set_epoch(epoch)
        for index, batch in enumerate(self.dataloader):
            if index >= skip:
                yield batch

    def metrics(self) -> dict[str, float]:
        """The sampler's counts, plus the store's bytes fetched (all workers; streaming uses no shard cache)."""
        return {**super().metrics(), **self.dataset.source.metrics()}


def make_stream_loader(location: str | os.PathLike, split: str = "train", sampler_config: SamplerConfig | None = None,
                       batch_size: int = 256, num_workers: int = 0, shuffle_buffer: int = 1024,
                       rank: int | None = None, world_size: int | None = None, pair_clean: bool | None = None,
                       pin_memory: bool = False, **options: Any) -> StreamLoader:
    """A StreamLoader over one split, batching inside the dataset; every store and policy problem is raised here.

    `options` go to StreamingVariantDataset (shuffle, drop_last, verify, prefetch, storage_options).
    """
    dataset = StreamingVariantDataset(location, split, sampler_config, batch_size=batch_size,
                                      shuffle_buffer=shuffle_buffer, rank=rank, world_size=world_size,
                                      pair_clean=pair_clean, **options)
    return StreamLoader(dataset, num_workers=num_workers, pin_memory=pin_memory)
