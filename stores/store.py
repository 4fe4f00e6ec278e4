"""Opening and reading finished stores, local or behind any fsspec URL; the format is in docs/FORMAT.md.

Readers never write: they fetch shards read-only (`ShardSource`) and keep nothing in the
store directory, so any number of processes and teams may share one store. Writing is
`advpipe.stores.writer`'s job.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from advpipe.errors import StoreError
from advpipe.stores import codec
from advpipe.stores.backends import backend
from advpipe.stores.manifest import Manifest, ShardRecord
from advpipe.stores.shard import ShardData, ShardReader
from advpipe.stores.source import ShardSource, Verify

log = logging.getLogger(__name__)

CLEAN = "clean"


class Store:
    """A finished store, opened read-only."""

    def __init__(self, source: ShardSource, manifest: Manifest, verify: Verify = "checksum") -> None:
        self.source = source
        self.manifest = manifest
        self.verify = verify
        self.layout = manifest.layout
        self._splits: dict[str, SplitReader] = {}

    @property
    def path(self) -> Path | str:
        """Where the store is: a Path for a local store, the URL for a remote one."""
        return self.source.display

    @classmethod
    def open(cls, location: str | os.PathLike, verify: Verify = "checksum",
             storage_options: dict[str, Any] | None = None) -> Store:
        """Open a store (a directory or an fsspec URL); every shard must exist with its recorded size.

        With verify='checksum' (default) each shard's sha256 is also checked the
        first time this process reads it, so corruption is an error naming the
        shard, never garbage pixels.
        """
        source = ShardSource(location, storage_options, verify)
        store = cls(source, source.manifest(), verify)
        if verify != "none":
            for record in store.shard_records():
                source.check_size(record)
        return store

    def shard_records(self) -> Iterator[ShardRecord]:
        for split in self.manifest.splits.values():
            yield from split.shards

    @property
    def variants(self) -> list[str]:
        """Variant names with 'clean' first: a variant's id is its position here."""
        return [CLEAN, *self.manifest.variant_names]

    def variant_id(self, name: str) -> int:
        if name not in self.variants:
            raise StoreError(f"{self.path}: store has no variant '{name}' (it has: {', '.join(self.variants)})")
        return self.variants.index(name)

    def split(self, name: str) -> SplitReader:
        if name not in self.manifest.splits:
            raise StoreError(f"{self.path}: store has no split '{name}' (it has: {', '.join(self.manifest.splits)})")
        if name not in self._splits:
            self._splits[name] = SplitReader(self, name)
        return self._splits[name]


class SplitReader:
    """Batched random access to one split: `read(indices, variant_ids)` -> float32 (k, C, H, W).

    Shards are fetched and opened lazily in whichever process reads, so a SplitReader can be
    handed to DataLoader workers; each worker fetches its own read-only copies.
    """

    def __init__(self, store: Store, split: str) -> None:
        self.source = store.source
        self.split = split
        self.record = store.manifest.splits[split]
        self.precision = store.manifest.precision
        self.image_shape = tuple(store.manifest.image_shape)
        self.variant_names = store.manifest.variant_names
        self.layout = store.layout
        self.verify = store.verify
        self.starts = np.array([s.start for s in self.record.shards], dtype=np.int64)
        self._backend = backend(store.manifest.backend)
        self._shards: list[ShardReader | None] = [None] * len(self.record.shards)

    def __len__(self) -> int:
        return self.record.count

    def shard(self, index: int) -> ShardReader:
        """Shard `index`, fetched and checked (as `verify` says) on first use in this process."""
        shard = self._shards[index]
        if shard is None:
            shard = self._backend.reader(self.source, self.record.shards[index], self.layout, self.image_shape,
                                         self.verify)
            shard.load()
            self._shards[index] = shard
        return shard

    def release(self, index: int) -> None:
        """Drop shard `index`'s bytes; the next read fetches (and checks) it again."""
        self._shards[index] = None

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, row within shard) for each sample index."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)}) in split '{self.split}'")
        shard_ids = np.searchsorted(self.starts, indices, side="right") - 1
        return shard_ids, indices - self.starts[shard_ids]

    @property
    def labels(self) -> np.ndarray:
        if not hasattr(self, "_labels"):
            self._labels = np.concatenate([self.shard(i).labels for i in range(len(self._shards))]) \
                if self._shards else np.zeros(0, dtype=np.int64)
        return self._labels

    def failed(self) -> np.ndarray:
        """Bool (N, V+1): True where a variant failed for an image (column 0, clean, never fails)."""
        flags = [self.shard(i).failed() for i in range(len(self._shards))]
        variants = np.concatenate(flags) if flags else np.zeros((0, len(self.variant_names)), dtype=bool)
        return np.concatenate([np.zeros((len(self), 1), dtype=bool), variants], axis=1)

    def read(self, indices: np.ndarray, variant_ids: np.ndarray | int = 0) -> np.ndarray:
        """Gather samples -> float32 (k, C, H, W) in [0, 1]: the sampler's hot path.

        Per shard, in row order: one gather of the clean rows, then one gather per stacked
        array of every adversarial row it holds, whatever the mix of variants; decoded in place.
        """
        indices = np.asarray(indices, dtype=np.int64)
        variant_ids = np.broadcast_to(np.asarray(variant_ids, dtype=np.int64), indices.shape)
        out = np.empty((len(indices), *self.image_shape), dtype=np.float32)
        shard_ids, rows = self.locate(indices)
        for shard_id in np.unique(shard_ids):
            members = np.flatnonzero(shard_ids == shard_id)
            members = members[np.argsort(rows[members], kind="stable")]
            out[members] = self._read_rows(self.shard(int(shard_id)), rows[members], variant_ids[members])
        return out

    def _read_rows(self, shard: ShardReader, rows: np.ndarray, variant_ids: np.ndarray) -> np.ndarray:
        clean = shard.clean(rows)
        adversarial = np.flatnonzero(variant_ids > 0)
        if not len(adversarial):
            return codec.to_float(clean)
        groups = shard.stored_pairs(rows[adversarial], variant_ids[adversarial] - 1)
        return codec.decode_mixed(clean, adversarial, groups, self.precision)

    def shard_data(self, index: int) -> ShardData:
        """A whole shard in its stored form (for verification and conversion)."""
        return self.shard(index).shard_data(self.split)


def open_store(location: str | os.PathLike, verify: Verify = "checksum",
               storage_options: dict[str, Any] | None = None) -> Store:
    """Open a finished store read-only, from a directory or an fsspec URL (see Store.open)."""
    return Store.open(location, verify, storage_options)
