"""Map-style reading of a store: which (image, variant) pairs to read, and reading them a batch at a time.

    loader = make_loader("runs/digits/store", "train", config.sampler, num_workers=4)
    for epoch in range(epochs):
        for batch in loader:              # one epoch: dict of x, y, variant, is_adv, index (, x_clean)
            ...
        loader.update({"fgsm": 0.4, "pgd": 0.7})    # adaptive mode: applied at the next epoch
        metrics.update(loader.metrics())

Three pieces, so that every random choice happens in the main process and reading in the workers:
- `VariantBatchSampler` decides, per epoch, the order of the images and the variant of each, as a pure
  function of (seed, epoch, batch): the sequence cannot depend on num_workers or on prefetching.
- `StoreDataset.__getitem__` receives a whole batch of (index, variant) pairs and does one batched
  `SplitReader.read` (grouped by shard and variant, rows sorted); shards open lazily in each worker.
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
from torch.utils.data import DataLoader, Dataset, Sampler

from advpipe.batch import Batch
from advpipe.config import SamplerConfig
from advpipe.errors import SamplerError
from advpipe.sampler.loader import EpochLoader
from advpipe.sampler.policy import Policy, scenario_variants, uniforms
from advpipe.stores.backends import backend
from advpipe.stores.store import SplitReader, Store, Verify, open_store

log = logging.getLogger(__name__)

SHUFFLE = 1002  # stream tag of the per-epoch permutation (policy.py uses 1000 and 1001)
Pairs = list[tuple[int, int]]  # one batch as (sample index, variant id) pairs


def distributed_layout(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): given values, else torch.distributed's when initialised, else (0, 1)."""
    active = torch.distributed.is_available() and torch.distributed.is_initialized()
    world_size = world_size if world_size is not None else (torch.distributed.get_world_size() if active else 1)
    rank = rank if rank is not None else (torch.distributed.get_rank() if active else 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise SamplerError(f"rank {rank} is not valid for world_size {world_size}")
    return rank, world_size


class VariantBatchSampler(Sampler[Pairs]):
    """Yields each batch as a list of (sample index, variant id) pairs; variant 0 is clean.

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

    def choose(self, epoch: int, batch: int, positions: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """Variant ids for one batch: a pure function of (seed, epoch, batch, positions)."""
        failed = None if self.failed is None else self.failed[indices]
        return self.policy.choose(epoch, positions, batch=batch, failed=failed)

    def __iter__(self) -> Iterator[Pairs]:
        """The current epoch from the skip point; the skip is cleared only when the epoch runs to its end.

        (A DataLoader may call iter() twice and use the second iterator, so starting one must not
        consume the skip.)
        """
        epoch, start = self.epoch, self._start
        positions, indices = self.epoch_order(epoch)
        for batch in range(start, len(self)):
            window = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
            variants = self.choose(epoch, batch, positions[window], indices[window])
            yield list(zip(indices[window].tolist(), variants.tolist(), strict=True))
        self._start = 0

    # resumption --------------------------------------------------------------------------------

    def layout(self) -> dict:
        """What must match for a saved position to mean the same batches."""
        return {"seed": self.seed, "num_samples": self.num_samples, "batch_size": self.batch_size,
                "world_size": self.world_size, "shuffle": self.shuffle, "drop_last": self.drop_last}


class StoreDataset(Dataset):
    """One item is one batch: `dataset[[(index, variant), ...]]` -> a `Batch`, read in one gather.

    With pair_clean the batch also holds x_clean (the same images' clean twins, for paired methods).
    """

    def __init__(self, reader: SplitReader, labels: np.ndarray, pair_clean: bool = False) -> None:
        self.reader = reader
        self.labels = np.asarray(labels, dtype=np.int64)
        self.pair_clean = pair_clean

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, batch: Sequence[tuple[int, int]]) -> Batch:
        pairs = np.asarray(batch, dtype=np.int64).reshape(-1, 2)
        indices, variants = pairs[:, 0], pairs[:, 1]
        item = {"y": torch.from_numpy(self.labels[indices]), "variant": torch.from_numpy(variants),
                "index": torch.from_numpy(indices)}
        if not self.pair_clean:
            return Batch(x=torch.from_numpy(self.reader.read(indices, variants)), **item)
        clean = self.reader.read(indices, 0)
        x = clean.copy()
        adversarial = variants > 0
        if adversarial.any():
            x[adversarial] = self.reader.read(indices[adversarial], variants[adversarial])
        return Batch(x=torch.from_numpy(x), x_clean=torch.from_numpy(clean), **item)


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

    def __len__(self) -> int:
        return len(self.sampler)

    def layout(self) -> dict:
        return self.sampler.layout()

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch)
        self.sampler.skip(skip)
        yield from self.dataloader


def resolve_store(store: Store | str | Path, verify: Verify = "checksum",
                  storage_options: dict[str, Any] | None = None) -> Store:
    """An open Store as given, or open the path or URL (manifest and shard sizes are checked now)."""
    return store if isinstance(store, Store) else open_store(store, verify, storage_options)


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
                verify: Verify = "checksum", storage_options: dict[str, Any] | None = None) -> StoreLoader:
    """A StoreLoader over one split; every config, policy and store problem is raised here.

    batch_size and pair_clean default to the config's; rank and world_size to torch.distributed's.
    `verify` applies when a path is given (an open Store keeps the verification it was opened with).
    """
    store = resolve_store(store, verify, storage_options)
    sampler = build_sampler(store, split, sampler_config, batch_size=batch_size, shuffle=shuffle,
                            drop_last=drop_last, rank=rank, world_size=world_size)
    if backend(store.manifest.backend).streamable:
        log.info("%s is a %s store: map-style reading holds whole shards in memory per worker; "
                 "streaming reads it in order", store.path, store.manifest.backend)
    pair = sampler_config.pair_clean if pair_clean is None else pair_clean
    dataset = StoreDataset(worker_reader(store, split), store.split(split).labels, pair_clean=pair)
    return StoreLoader(dataset, sampler, store.variants, num_workers=num_workers,
                       persistent_workers=persistent_workers, pin_memory=pin_memory)
