"""Map-style reading of a store: which (image, variant) pairs to read, and reading them a batch at a time.

    loader = make_loader("runs/digits/store", "train", config.sampler, num_workers=4)
    for epoch in range(epochs):
        for batch in loader:              # one epoch: dict of x, y, variant, is_adv, index (, x_clean)
            ...
        loader.update({"fgsm": 0.4, "pgd": 0.7})    # adaptive mode: applied at the next epoch
        metrics.update(loader.metrics())

Three pieces, so that every random choice happens in the main process and reading in the workers:
- `VariantBatchSampler` decides, per epoch, the order of the images and the variant of each, as a pure
  function of (seed, epoch, batch), drawn for the whole epoch in a few array operations: the sequence
  cannot depend on num_workers or on prefetching.
- `StoreDataset.__getitem__` receives a whole batch of (index, variant) pairs as one (B, 2) array and does
  one batched `SplitReader.read_stored` (a few gathers per shard, no per-sample Python) and one fused
  decode, or hands on the stored form (stored_form=True) for `Batch.decode` on the device; shards open
  lazily in each worker.
- `StoreLoader` wraps the DataLoader and counts the batches its consumer has received (not what workers
  prefetched), so `state_dict()` resumes mid-epoch exactly, in this process or another.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from advpipe.batch import Batch, StoredPixels
from advpipe.config import SamplerConfig
from advpipe.errors import SamplerError
from advpipe.sampler.loader import EpochLoader
from advpipe.sampler.policy import Policy, scenario_variants, uniforms
from advpipe.stores import codec
from advpipe.stores.backends import backend
from advpipe.stores.cache import ShardCache
from advpipe.stores.store import SplitReader, Store, Verify, open_store
from advpipe.urls import is_remote

log = logging.getLogger(__name__)

SHUFFLE = 1002  # stream tag of the per-epoch permutation (policy.py uses 1000 and 1001)


def distributed_layout(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): given values, else torch.distributed's when initialised, else (0, 1)."""
    active = torch.distributed.is_available() and torch.distributed.is_initialized()
    world_size = world_size if world_size is not None else (torch.distributed.get_world_size() if active else 1)
    rank = rank if rank is not None else (torch.distributed.get_rank() if active else 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise SamplerError(f"rank {rank} is not valid for world_size {world_size}")
    return rank, world_size


class VariantBatchSampler(Sampler[np.ndarray]):
    """Yields each batch as an int64 (B, 2) array of (sample index, variant id) pairs; variant 0 is clean.

    Per epoch the split's indices are permuted (seeded by seed and epoch), dealt to ranks round-robin
    (padded by wrapping, or truncated with drop_last, so every rank gets the same number of batches, as
    DistributedSampler does) and cut into batches. A batch's variants are chosen when it is yielded, by
    `policy.choose` keyed by the images' positions in the epoch's permutation, so they are the same
    whichever rank reads them and however far ahead a DataLoader prefetches.
    """

    def __init__(self, policy: Policy, num_samples: int, batch_size: int, *, failed: np.ndarray | None = None,
                 shuffle: bool = True, drop_last: bool = False, rank: int | None = None,
                 world_size: int | None = None) -> None:
        if batch_size < 1:
            raise SamplerError(f"batch_size must be at least 1, got {batch_size}")
        if failed is not None and failed.shape[0] != num_samples:
            raise SamplerError(f"failed mask has {failed.shape[0]} rows for {num_samples} samples")
        self.policy = policy
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.failed = failed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank, self.world_size = distributed_layout(rank, world_size)
        self.epoch = 0
        self._start = 0  # batches of the current epoch to skip at the next iteration (resumption)

    @property
    def seed(self) -> int:
        return self.policy.seed

    @property
    def per_rank(self) -> int:
        """Samples each rank reads per epoch."""
        whole, rest = divmod(self.num_samples, self.world_size)
        return whole + (1 if rest and not self.drop_last else 0)

    def __len__(self) -> int:
        batches, rest = divmod(self.per_rank, self.batch_size)
        return batches + (1 if rest and not self.drop_last else 0)

    def set_epoch(self, epoch: int) -> None:
        """Draw `epoch`'s order and variants at the next iteration (adaptive updates are the loader's job)."""
        if epoch != self.epoch:
            self.epoch, self._start = epoch, 0

    def skip(self, batches: int) -> None:
        """Make the next iteration start at this batch of the current epoch."""
        if not 0 <= batches <= len(self):
            raise SamplerError(f"cannot skip {batches} batches of an epoch of {len(self)}")
        self._start = batches

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions in the epoch's permutation, sample indices) that this rank reads, in order."""
        n = self.num_samples
        order = np.arange(n)
        if self.shuffle:
            order = np.argsort(uniforms(self.seed, epoch, SHUFFLE, order), kind="stable")
        positions = np.arange(self.rank, self.per_rank * self.world_size, self.world_size)
        return positions, order[positions % n] if n else positions

    def choose(self, epoch: int, batch: int | np.ndarray, positions: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """Variant ids: a pure function of (seed, epoch, batch, positions); `batch` may be one per position."""
        failed = None if self.failed is None else self.failed[indices]
        return self.policy.choose(epoch, positions, batch=batch, failed=failed)

    def epoch_pairs(self, epoch: int) -> np.ndarray:
        """Int64 (samples, 2): every (index, variant) pair this rank reads in `epoch`, batch after batch.

        Drawn for the whole epoch in a few array operations: the same draws as batch by batch.
        """
        positions, indices = self.epoch_order(epoch)
        variants = self.choose(epoch, np.arange(len(positions)) // self.batch_size, positions, indices)
        return np.stack([indices, variants], axis=1)

    def __iter__(self) -> Iterator[np.ndarray]:
        """Each batch of the current epoch from the skip point, as an int64 (B, 2) array of (index, variant).

        The skip is cleared only when the epoch runs to its end (a DataLoader may call iter() twice and
        use the second iterator, so starting one must not consume the skip).
        """
        epoch, start = self.epoch, self._start
        pairs = self.epoch_pairs(epoch)
        for batch in range(start, len(self)):
            yield pairs[batch * self.batch_size:(batch + 1) * self.batch_size]
        self._start = 0

    # resumption --------------------------------------------------------------------------------

    def layout(self) -> dict:
        """What must match for a saved position to mean the same batches."""
        return {"seed": self.seed, "num_samples": self.num_samples, "batch_size": self.batch_size,
                "world_size": self.world_size, "shuffle": self.shuffle, "drop_last": self.drop_last}


class StoreDataset(Dataset):
    """One item is one batch: `dataset[pairs]` -> a `Batch`, read in one gather (pairs: (B, 2) index, variant).

    With pair_clean the batch also holds x_clean (the same images' clean twins, for paired methods).
    With stored_form the batch holds the images as stored (`Batch.stored`: uint8 clean and the chosen
    variant's stored form) instead of x: workers then move a quarter (uint8 stores) to three quarters
    (float16 stores) of the bytes, and the consumer calls `batch.decode()`, best after moving the batch
    to its GPU, so that the CPU does no float work at all.
    """

    def __init__(self, reader: SplitReader, labels: np.ndarray, pair_clean: bool = False,
                 stored_form: bool = False) -> None:
        self.reader = reader
        self.labels = np.asarray(labels, dtype=np.int64)
        self.pair_clean = pair_clean
        self.stored_form = stored_form

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, batch: Sequence[tuple[int, int]] | np.ndarray) -> Batch:
        pairs = np.asarray(batch, dtype=np.int64).reshape(-1, 2)
        indices, variants = pairs[:, 0], pairs[:, 1]
        item = {"y": torch.from_numpy(self.labels[indices]), "variant": torch.from_numpy(variants.copy()),
                "index": torch.from_numpy(indices.copy())}
        if not isinstance(self.reader, SplitReader):  # e.g. in-memory source images: float reads only
            return self._read_floats(indices, variants, item)
        rows = self.reader.read_stored(indices, variants, clean=self.pair_clean)
        if self.stored_form:
            return Batch(x=None, stored=StoredPixels.of(rows, self.pair_clean), **item)
        x = rows.decode(out=output_buffer(rows.stored.shape))
        x_clean = codec.to_float(rows.clean, output_buffer(rows.clean.shape)) if self.pair_clean else None
        return Batch(x=torch.from_numpy(x), x_clean=None if x_clean is None else torch.from_numpy(x_clean), **item)

    def _read_floats(self, indices: np.ndarray, variants: np.ndarray, item: dict[str, torch.Tensor]) -> Batch:
        if self.stored_form:
            raise SamplerError("stored_form needs a store's SplitReader; this dataset reads decoded images")
        if not self.pair_clean:
            return Batch(x=torch.from_numpy(self.reader.read(indices, variants)), **item)
        clean = self.reader.read(indices, 0)
        x = clean.copy()
        adversarial = variants > 0
        if adversarial.any():
            x[adversarial] = self.reader.read(indices[adversarial], variants[adversarial])
        return Batch(x=torch.from_numpy(x), x_clean=torch.from_numpy(clean), **item)


def output_buffer(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 buffer for a decoded batch: in a DataLoader worker, already in shared memory.

    A worker's batch reaches the main process through shared memory; a tensor allocated elsewhere is
    copied there when it is sent, a tensor created in it is sent as a handle. Decoding straight into
    shared memory saves that copy of every float32 batch.
    """
    if get_worker_info() is None:
        return np.empty(shape, np.float32)
    return torch.empty(shape, dtype=torch.float32).share_memory_().numpy()


class StoreLoader(EpochLoader):
    """Map-style loader: the sampler's batches of (index, variant) pairs read by DataLoader workers."""

    def __init__(self, dataset: StoreDataset, sampler: VariantBatchSampler, variant_names: list[str], *,
                 num_workers: int = 0, persistent_workers: bool = False, pin_memory: bool = False) -> None:
        super().__init__(variant_names)
        self.dataset = dataset
        self.sampler = sampler
        self.policy = sampler.policy
        # batch_size=None: the sampler's lists reach __getitem__ whole, so one fetch is one batch.
        # A private generator keeps the DataLoader from consuming the global torch RNG each epoch.
        self.dataloader = DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers,
                                     persistent_workers=persistent_workers and num_workers > 0,
                                     pin_memory=pin_memory, generator=torch.Generator().manual_seed(0))
        self.pin_memory = pin_memory and torch.cuda.is_available()  # as DataLoader does

    def __len__(self) -> int:
        return len(self.sampler)

    def layout(self) -> dict:
        return self.sampler.layout()

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch)
        self.sampler.skip(skip)
        if self.dataloader.num_workers:
            yield from self.dataloader
            return
        for pairs in self.sampler:  # in this process: the same batches without the DataLoader's per-batch work
            batch = self.dataset[pairs]
            yield batch.pin_memory() if self.pin_memory else batch

    def metrics(self) -> dict[str, float]:
        """The sampler's counts, plus the store's shard cache hits, misses and bytes fetched (all workers)."""
        source = getattr(self.dataset.reader, "source", None)  # a source split (SourceReader) has none
        return {**super().metrics(), **(source.metrics() if source is not None else {})}


def resolve_store(store: Store | str | Path, verify: Verify = "checksum",
                  storage_options: dict[str, Any] | None = None, cache: ShardCache | str | None = "auto") -> Store:
    """An open Store as given, or open the path or URL (manifest and shard sizes are checked now).

    cache='auto': a remote store's shards go through the default local shard cache (ShardCache.default).
    """
    if isinstance(store, Store):
        return store
    if cache == "auto":
        cache = ShardCache.default() if is_remote(store) else None
    return open_store(store, verify, storage_options, cache)


def build_sampler(store: Store, split: str, sampler_config: SamplerConfig, *, batch_size: int | None = None,
                  shuffle: bool = True, drop_last: bool = False, rank: int | None = None,
                  world_size: int | None = None) -> VariantBatchSampler:
    """Check the policy against the store and every shard of the split, before any epoch.

    Opening a shard verifies it as the store was opened to (verify='checksum': its sha256), so corruption
    is an error here naming the shard, never in the middle of an epoch. This hashes the whole split once
    (about a second per GB); open with verify='size' to skip it.
    """
    policy = Policy.from_config(sampler_config, store.variants, scenario_variants(store.manifest))
    reader = store.split(split)
    for shard in range(len(reader.record.shards)):
        reader.shard(shard)
    sampler = VariantBatchSampler(policy, len(reader), batch_size or sampler_config.batch_size,
                                  failed=reader.failed(), shuffle=shuffle, drop_last=drop_last, rank=rank,
                                  world_size=world_size)
    if not len(sampler):
        raise SamplerError(f"split '{split}' has {len(reader)} images: no batch of {sampler.batch_size} per rank "
                           f"(world_size {sampler.world_size}, drop_last={drop_last})")
    return sampler


def worker_reader(store: Store, split: str) -> SplitReader:
    """A reader no process has opened yet, for the dataset: forked workers then inherit no open handles.

    Its shards were already hashed by `build_sampler`, so workers check sizes only.
    """
    reader = SplitReader(store, split)
    if reader.verify == "checksum":
        reader.verify = "size"
    return reader


def make_loader(store: Store | str | Path, split: str, sampler_config: SamplerConfig, *,
                batch_size: int | None = None, num_workers: int = 0, persistent_workers: bool = False,
                pin_memory: bool = False, shuffle: bool = True, drop_last: bool = False, rank: int | None = None,
                world_size: int | None = None, pair_clean: bool | None = None,
                verify: Verify = "checksum", storage_options: dict[str, Any] | None = None,
                cache: ShardCache | str | None = "auto", stored_form: bool | None = None) -> StoreLoader:
    """A StoreLoader over one split; every config, policy and store problem is raised here.

    batch_size, pair_clean and stored_form default to the config's; rank and world_size to torch.distributed's.
    With stored_form each batch holds the stored form (`Batch.stored`) until `batch.decode()`.
    `verify` and `cache` apply when a path is given (an open Store keeps what it was opened with): a remote
    store is read through a local shard cache, `cache` or by default ShardCache.default(); None fetches
    every shard into each process's memory instead.
    """
    store = resolve_store(store, verify, storage_options, cache)
    sampler = build_sampler(store, split, sampler_config, batch_size=batch_size, shuffle=shuffle,
                            drop_last=drop_last, rank=rank, world_size=world_size)
    if backend(store.manifest.backend).streamable:
        log.info("%s is a %s store: map-style reading holds whole shards in memory per worker; "
                 "streaming reads it in order", store.path, store.manifest.backend)
    pair = sampler_config.pair_clean if pair_clean is None else pair_clean
    stored = sampler_config.stored_form if stored_form is None else stored_form
    dataset = StoreDataset(worker_reader(store, split), store.split(split).labels, pair_clean=pair, stored_form=stored)
    return StoreLoader(dataset, sampler, store.variants, num_workers=num_workers,
                       persistent_workers=persistent_workers, pin_memory=pin_memory)
