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
produces is read as strided numpy views of its bytes (advpipe.stores.wds.TarParser; a local shard's
views are kept while its file is unchanged). Between shard and batch a sample is only a reference
(shard, row, chosen variant): the shuffle buffer, padding and batching move references, and each
sample's clean pixels and chosen variant are copied once, from the shard straight into its batch,
which is then decoded in one pass (or handed on in stored form, from a worker in shared memory).
The shuffle buffer keeps at most `live_shards` shards alive (see ShuffleBuffer), so memory stays
bounded by those shards, the prefetched ones and one buffer of samples.

The same seed, epoch and layout (ranks, workers, buffer) give the same sequence.
Changes to the policy (adaptive mode, `set_epoch`) reach StreamLoader's persistent workers
through shared memory when an epoch's iterator starts (`share_epoch`); a DataLoader of your own
over the dataset must not use persistent workers.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Callable, Iterable, Iterator
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

Refs = dict[str, np.ndarray]  # parallel arrays: index, label, variant, row, key, source (see refs_of)
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
    verified on a background thread while the current one is parsed. `live_shards` bounds the
    fetched shards the shuffle buffer keeps (ShuffleBuffer): with remote stores, memory is about
    (live_shards + prefetch + 1) shards; a local shard is memory-mapped and costs page cache only.
    """

    def __init__(self, location: str | os.PathLike, split: str = "train", sampler: SamplerConfig | None = None, *,
                 batch_size: int | None = None, shuffle: bool = True, shuffle_buffer: int = 1024,
                 rank: int | None = None, world_size: int | None = None, pair_clean: bool | None = None,
                 drop_last: bool = False, verify: Verify = "checksum", prefetch: int = 1,
                 storage_options: dict[str, Any] | None = None, stored_form: bool | None = None,
                 live_shards: int = 6) -> None:
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
        if live_shards < 1:
            raise SamplerError(f"live_shards must be at least 1 (the shards the shuffle buffer keeps fetched), "
                               f"got {live_shards}")
        self.live_shards = live_shards
        self._parsed: dict[str, tuple[mmap.mmap, ShardColumns]] = {}
        self._shared: torch.Tensor | None = None
        self.pixels = ShardPixels(self.manifest.precision, self.manifest.image_shape, self.manifest.layout.dtype)
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
        self.publish()

    def share_epoch(self) -> None:
        """Let persistent DataLoader workers follow `set_epoch` and adaptive policy updates.

        A worker copies the dataset once, when it starts. After this call the epoch and the policy's
        centres (all that `Policy.choose` reads that can change) live in shared memory: `publish` writes
        them in the main process before an epoch's iterator starts, and each worker reads them when its
        iteration of that epoch begins (the DataLoader's resume message orders the two).
        """
        self._shared = torch.zeros(1 + len(self.policy.centres), dtype=torch.float64).share_memory_()

    def publish(self) -> None:
        """Write this process's epoch and policy centres for the workers (see `share_epoch`)."""
        if self._shared is not None:
            self._shared[0] = float(self.epoch)
            self._shared[1:] = torch.from_numpy(np.asarray(self.policy.centres, dtype=np.float64))

    def _follow(self) -> None:
        if self._shared is not None and get_worker_info() is not None:
            self.epoch = int(self._shared[0])
            self.policy.centres = self._shared[1:].numpy().copy()

    def __iter__(self) -> Iterator[Batch | dict[str, torch.Tensor]]:
        self._follow()
        slot, slots = self._slot()
        plan = self.plan(self.epoch, slot, slots)
        natural, target = self.slot_count(plan, slot, slots), self.slot_target(slots)
        if natural == 0 and target > 0:
            raise SamplerError(f"split '{self.split}' has {self.count} images, fewer than the {slots} readers "
                               "(ranks x DataLoader workers): use fewer workers or ranks")
        log.debug("epoch %d: slot %d of %d reads %d shard(s), %d images, padded or cut to %d", self.epoch, slot,
                  slots, len(plan), natural, target)
        chunks = self._chunks(plan, slot, slots)
        if self.shuffle_buffer:
            rng = np.random.default_rng([BUFFER_ORDER, self.sampler.seed & MASK64, self.epoch & MASK64, slot])
            chunks = shuffle_chunks(chunks, self.shuffle_buffer, rng, self.pixels, self.live_shards)
        chunks = fit_count(chunks, target, max(0, target - natural), self.pixels)
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

    def _chunks(self, plan: list[tuple[int, int | None]], slot: int, slots: int) -> Iterator[Refs]:
        """Each planned shard's references for this slot, their variants chosen (pixels stay in the shard)."""
        shards = [self.shards[index] for index, _ in plan]
        fetched = self.source.fetch_all(shards, self.prefetch)
        for key, ((_, offset), shard, data) in enumerate(zip(plan, shards, fetched, strict=True)):
            chunk = self._parse(key, shard, data, None if offset is None else (slot, slots, offset))
            if len(chunk["index"]):
                yield chunk

    def _parse(self, key: int, shard: ShardRecord, data: Any, keep: tuple[int, int, int] | None) -> Refs:
        """Check the shard's images, keep this slot's and choose their variants: references, no pixels copied."""
        columns = self._columns(shard, data)
        ids = columns.ids
        if len(ids) != shard.count or not np.array_equal(ids, np.arange(shard.start, shard.stop)):
            raise IntegrityError(f"shard {shard.name}: holds images {_span(ids)}, manifest says "
                                 f"[{shard.start}, {shard.stop}); run `advpipe verify`")
        rows = np.arange(len(ids))
        if keep is not None:
            slot, slots, offset = keep
            rows = rows[(offset + rows) % slots == slot]
        variants = self._choose(ids[rows], columns.failed[rows])
        return refs_of(columns, key, rows, ids[rows], columns.labels[rows], variants)

    def _columns(self, shard: ShardRecord, data: Any) -> ShardColumns:
        """The shard parsed; a memory-mapped shard is parsed once and reused while the source hands back the same
        map (it maps a local file again when its size, mtime or inode change): header checks cost about as much
        as a shard's batches."""
        if not isinstance(data, mmap.mmap):
            return self.reader.read(data, shard)
        known = self._parsed.get(shard.name)
        if known is None or known[0] is not data:
            self._parsed[shard.name] = (data, self.reader.read(data, shard))
        return self._parsed[shard.name][1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_parsed": {}}  # maps are not sent to worker processes

    def _choose(self, ids: np.ndarray, failed: np.ndarray) -> np.ndarray:
        if self.policy.redraw != "batch":
            return self.policy.choose(self.epoch, ids, failed=failed)
        blocks = ids // self.sampler.batch_size
        variants = np.empty_like(ids)
        for block in np.unique(blocks):
            rows = blocks == block
            variants[rows] = self.policy.choose(self.epoch, ids[rows], batch=int(block), failed=failed[rows])
        return variants

    def _batch(self, refs: Refs) -> Batch:
        """Gather a batch's pixels from its shards (each sample's once) and decode them in one fused step,
        or, with stored_form, hand on the stored form (in shared memory from a worker) for `Batch.decode`."""
        item = {"y": torch.from_numpy(refs["label"]), "variant": torch.from_numpy(refs["variant"]),
                "index": torch.from_numpy(refs["index"])}
        precision, delta = self.pixels.precision, self.pixels.precision != "uint8"
        if self.stored_form:
            clean, stored = self.pixels.gather(refs, delta or self.pair_clean, shared_buffer)
            return Batch(x=None, stored=StoredPixels.of(StoredRows(stored, clean, precision), self.pair_clean), **item)
        clean, stored = self.pixels.gather(refs, delta or self.pair_clean, None)
        x = codec.decode(clean, stored, precision, output_buffer(stored.shape))
        x_clean = codec.to_float(clean, output_buffer(clean.shape)) if self.pair_clean else None
        return Batch(x=torch.from_numpy(x), x_clean=None if x_clean is None else torch.from_numpy(x_clean), **item)


# References, not pixels -------------------------------------------------------------------------------------
#
# Between a shard and a batch a sample is a reference: its id, label and chosen variant, the
# shard it lives in (`source`, the parsed ShardColumns: views of the fetched bytes) and its row
# there. The shuffle buffer, the padding and the cutting into batches move references only;
# `ShardPixels.gather` copies each sample's clean image and chosen variant once, straight into
# the batch. A shard's bytes are held exactly as long as a reference names it (the `source`
# column holds the object), and the shuffle buffer keeps at most `live_shards` shards alive by
# copying the few samples it still holds of older ones into a `Spill`.


def refs_of(columns: ShardColumns, key: int, rows: np.ndarray, index: np.ndarray, label: np.ndarray,
            variant: np.ndarray) -> Refs:
    """References to `rows` of one shard; `key` orders shards by arrival (spills take negative keys)."""
    source = np.empty(len(rows), dtype=object)
    source.fill(columns)
    return {"index": index, "label": label, "variant": variant, "row": rows,
            "key": np.full(len(rows), key, dtype=np.int64), "source": source}


@dataclass
class Spill:
    """Pixels of samples whose shard was let go while the shuffle buffer still held them: the clean
    image and the chosen variant's stored form (the codec's identity for a clean pick), by row."""

    clean: np.ndarray
    stored: np.ndarray


Buffer = Callable[[tuple[int, ...], np.dtype], np.ndarray]


def shared_buffer(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Like `output_buffer` for any dtype: in a DataLoader worker, in shared memory, so that sending the
    batch to the main process passes a handle instead of copying it."""
    if get_worker_info() is None:
        return np.empty(shape, dtype)
    return torch.from_numpy(np.empty(0, dtype)).new_empty(shape).share_memory_().numpy()


class ShardPixels:
    """Copies the pixels that references name out of their shards, once per sample."""

    def __init__(self, precision: str, shape: tuple[int, ...], stored_dtype: np.dtype) -> None:
        self.precision, self.shape, self.stored_dtype = precision, tuple(shape), np.dtype(stored_dtype)
        self.spills = 0
        self._scratch: dict[tuple[str, tuple[int, ...], str], np.ndarray] = {}

    def scratch(self, role: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A buffer reused from batch to batch, for pixels decoded before the batch is handed on: a fresh one would
        cost a page fault for every 4 KiB of it, about as much as copying it."""
        key = (role, tuple(shape[1:]), np.dtype(dtype).str)
        held = self._scratch.get(key)
        if held is None or len(held) < shape[0]:
            held = self._scratch[key] = np.empty(shape, dtype)
        return held[: shape[0]]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_scratch": {}}

    def gather(self, refs: Refs, with_clean: bool, buffer: Buffer | None = np.empty
               ) -> tuple[np.ndarray | None, np.ndarray]:
        """(clean uint8 or None, stored form of the chosen variants) in the references' order, in new arrays
        from `buffer`, or with buffer=None in this object's `scratch` (valid until the next such call).

        In a delta store a clean pick stores 0; in a uint8 store the stored form is the pixels themselves,
        so a clean pick's are copied from its clean image and `clean` is only gathered when asked for.
        """
        shape = (len(refs["index"]), *self.shape)
        clean_shape, stored_shape = (shape, np.dtype(np.uint8)), (shape, self.stored_dtype)
        if buffer is None:
            clean = self.scratch("clean", *clean_shape) if with_clean else None
            stored = self.scratch("stored", *stored_shape)
        else:
            clean = buffer(*clean_shape) if with_clean else None
            stored = buffer(*stored_shape)
        variant, row = refs["variant"], refs["row"]
        for positions in _groups(refs["key"]):
            source, rows, picks = refs["source"][positions[0]], row[positions], variant[positions]
            if isinstance(source, Spill):
                stored[positions] = source.stored[rows]
                if clean is not None:
                    clean[positions] = source.clean[rows]
                continue
            if clean is not None:
                clean[positions] = source.clean[rows]
            adversarial = picks > 0
            if adversarial.any():
                stored[positions[adversarial]] = source.gather(rows[adversarial], picks[adversarial] - 1)
            if self.precision == "uint8" and not adversarial.all():
                plain = ~adversarial
                stored[positions[plain]] = source.clean[rows[plain]] if clean is None else clean[positions[plain]]
        if self.precision != "uint8":
            stored[variant == 0] = 0
        return clean, stored

    def spill(self, refs: Refs) -> Refs:
        """The same samples, their pixels copied into one `Spill` (freeing their shards), under a new negative key
        (shards' keys count up from 0 in each iteration, spills' down from -1: every source keeps its own key)."""
        self.spills += 1
        key = -self.spills
        clean, stored = self.gather(refs, True)
        rows = np.arange(len(clean))
        source = np.empty(len(rows), dtype=object)
        source.fill(Spill(clean, stored))
        return {**refs, "row": rows, "key": np.full(len(rows), key, dtype=np.int64), "source": source}


def _groups(keys: np.ndarray) -> list[np.ndarray]:
    """Positions of each distinct key, each in increasing order."""
    if len(keys) and (keys == keys[0]).all():
        return [np.arange(len(keys))]
    order = np.argsort(keys, kind="stable")
    cuts = np.flatnonzero(np.diff(keys[order])) + 1
    return np.split(order, cuts)


class ShuffleBuffer:
    """A shuffle buffer of `size` references, exchanged a chunk at a time, holding at most `live` shards.

    Each incoming chunk of n samples sends out n samples drawn uniformly without replacement
    from buffer + chunk, in random order; the chunk's samples not sent take the freed places.
    Working on whole chunks keeps the cost to numpy gathers of a few small columns.

    A shard's samples leave the buffer geometrically (half of them per exchange when chunks fill
    it), so a shard is still referenced long after most of its samples have gone. Once more than
    `live` shards are referenced, the oldest ones' remaining samples (a few percent of a shard
    with the default) are copied into a Spill and the shards' bytes released: memory stays
    bounded by `live` shards plus `size` samples, and the order of samples is unchanged.
    """

    def __init__(self, size: int, rng: np.random.Generator, pixels: ShardPixels, live: int) -> None:
        if live < 1:
            raise SamplerError(f"live_shards must be at least 1 (the shards the shuffle buffer keeps), got {live}")
        self.size, self.rng, self.pixels, self.live = size, rng, pixels, live
        self.pool: Refs | None = None

    def __call__(self, chunks: Iterable[Refs]) -> Iterator[Refs]:
        for chunk in chunks:
            held = 0 if self.pool is None else len(self.pool["index"])
            if held < self.size:  # filling
                head = take(chunk, slice(0, self.size - held))
                self.pool = head if self.pool is None else concat([self.pool, head])
                chunk = take(chunk, slice(self.size - held, None))
                self._bound()
                if not len(chunk["index"]):
                    continue
            out = self._exchange(chunk)
            self._bound()
            yield out
        if self.pool is not None and len(self.pool["index"]):
            yield take(self.pool, self.rng.permutation(len(self.pool["index"])))
        self.pool = None

    def _exchange(self, chunk: Refs) -> Refs:
        """Send out len(chunk) random samples of pool + chunk; refill the pool in place with the chunk's rest."""
        pool = self.pool
        assert pool is not None
        held, incoming = len(pool["index"]), len(chunk["index"])
        picks = self.rng.permutation(held + incoming)[:incoming]
        at_pool, at_chunk = np.flatnonzero(picks < held), np.flatnonzero(picks >= held)
        freed, sent = picks[at_pool], picks[at_chunk] - held
        staying = np.ones(incoming, dtype=bool)
        staying[sent] = False
        kept = np.flatnonzero(staying)
        out = {}
        for key, values in pool.items():
            column = np.empty(incoming, values.dtype)
            column[at_pool] = values[freed]
            column[at_chunk] = chunk[key][sent]
            values[freed] = chunk[key][kept]
            out[key] = column
        return out

    def _bound(self) -> None:
        """Spill the oldest shards' samples while the pool references more than `live` shards."""
        keys = self.pool["key"]
        shards = np.unique(keys[keys >= 0])
        if len(shards) <= self.live:
            return
        positions = np.flatnonzero(np.isin(keys, shards[: len(shards) - self.live]))
        spilled = self.pixels.spill(take(self.pool, positions))
        for key, values in spilled.items():
            self.pool[key][positions] = values


def shuffle_chunks(chunks: Iterable[Refs], size: int, rng: np.random.Generator, pixels: ShardPixels,
                   live: int = 6) -> Iterator[Refs]:
    """The references of `chunks`, shuffled through a `ShuffleBuffer` of `size` holding at most `live` shards."""
    return ShuffleBuffer(size, rng, pixels, live)(chunks)


def rebatch(chunks: Iterable[Refs], size: int, drop_last: bool = False) -> Iterator[Refs]:
    """Cut a stream of chunks into batches of `size` (the last may be smaller unless drop_last)."""
    parts: list[Refs] = []
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


def fit_count(chunks: Iterable[Refs], target: int, pad: int, pixels: ShardPixels) -> Iterator[Refs]:
    """Cut a stream at `target` samples, or pad it to `target` by repeating its first `pad` samples.

    This is what gives every rank the same number of batches per epoch (as DistributedSampler does):
    the only repeats are the documented padding, at most one image per reader. The repeated samples
    are spilled (copied) at once, so that their shards need not stay alive until the end of the epoch.
    """
    sent, head = 0, []
    for chunk in chunks:
        room = target - sent
        if room <= 0:
            break
        part = chunk if len(chunk["index"]) <= room else take(chunk, slice(0, room))
        held = sum(len(h["index"]) for h in head)
        if held < pad:
            head.append(pixels.spill(take(part, slice(0, pad - held))))
        sent += len(part["index"])
        yield part
    if sent < target and head:
        yield take(concat(head), slice(0, target - sent))


def take(samples: Refs, rows: slice | np.ndarray) -> Refs:
    return {key: values[rows] for key, values in samples.items()}


def concat(parts: list[Refs]) -> Refs:
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
    match: a state from another layout is refused. Workers are persistent (they keep their mapped
    shards and parsed headers from epoch to epoch, which a fresh process must fault in again); the
    epoch and policy changes (adaptive mode) reach them through `StreamingVariantDataset.share_epoch`.
    """

    def __init__(self, dataset: StreamingVariantDataset, num_workers: int = 0, pin_memory: bool = False) -> None:
        super().__init__(["clean", *dataset.manifest.variant_names])
        self.dataset = dataset
        self.policy = dataset.policy
        self.num_workers = num_workers
        if num_workers:
            dataset.share_epoch()
        self.dataloader = DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                     persistent_workers=num_workers > 0, pin_memory=pin_memory)
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
        self.dataset.set_epoch(epoch)  # also publishes the epoch and the policy's centres to the workers
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
