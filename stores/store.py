"""Opening and reading finished stores, local or behind any fsspec URL; the format is in docs/FORMAT.md.

Readers never write: they fetch shards read-only (`ShardSource`) and keep nothing in the
store directory, so any number of processes and teams may share one store. Writing is
`advpipe.stores.writer`'s job.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from advpipe.errors import IntegrityError, StoreError
from advpipe.stores import codec
from advpipe.stores.backends import backend
from advpipe.stores.cache import ShardCache
from advpipe.stores.manifest import Manifest, ShardRecord
from advpipe.stores.shard import MappedArrays, ShardData, ShardReader
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
             storage_options: dict[str, Any] | None = None, cache: ShardCache | None = None) -> Store:
        """Open a store (a directory or an fsspec URL); every shard must exist with its recorded size.

        With verify='checksum' (default) each shard's sha256 is also checked the
        first time this process reads it, so corruption is an error naming the
        shard, never garbage pixels. With `cache`, a remote store's shards are read through that local
        shard cache (advpipe.stores.cache).
        """
        source = ShardSource(location, storage_options, verify, cache)
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
        self.num_classes = store.manifest.num_classes
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
            labels = shard.labels  # a label past the classes would reach the loss as an index: refuse it here
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise IntegrityError(f"shard {shard.name}: labels outside [0, {self.num_classes}); "
                                     "run `advpipe verify`")
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
        """Gather samples -> float32 (k, C, H, W) in [0, 1]: `read_stored` decoded in one fused pass."""
        return self.read_stored(indices, variant_ids).decode()

    def read_stored(self, indices: np.ndarray, variant_ids: np.ndarray | int = 0, clean: bool = False) -> StoredRows:
        """Gather samples in their stored form (uint8 clean, the chosen variant as stored): the sampler's hot path.

        A few array operations per batch and two or three gathers per shard it touches, whatever the mix
        of variants: the pairs are sorted clean picks first, then the rest, each by index, which makes each
        shard's clean picks and its other rows two contiguous runs that `ShardReader.clean_into` /
        `stored_into` fill straight from the shard's bytes; the caller's order is restored on the stored
        form (a quarter to three quarters of float32's bytes).
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        variant_ids = np.broadcast_to(np.asarray(variant_ids, dtype=np.int64), indices.shape)
        if len(variant_ids) and (variant_ids.min() < 0 or variant_ids.max() > len(self.variant_names)):
            raise IndexError(f"variant id out of range [0, {len(self.variant_names)}] in split '{self.split}'")
        key = np.where(variant_ids > 0, indices + len(self), indices)
        order = None if (key[1:] >= key[:-1]).all() else np.argsort(key, kind="stable")
        if order is not None:
            indices, variant_ids = indices[order], variant_ids[order]
        rows = self._gather(indices, variant_ids, clean)
        if order is not None:
            restore = np.empty_like(order)
            restore[order] = np.arange(len(order))
            rows = StoredRows(rows.stored[restore], None if rows.clean is None else rows.clean[restore], rows.precision)
        return rows

    def _gather(self, indices: np.ndarray, variant_ids: np.ndarray, clean: bool) -> StoredRows:
        """`read_stored` for pairs already in (clean picks, then the rest; each by index) order."""
        count, delta = len(indices), self.precision != "uint8"
        stored = np.empty((count, *self.image_shape), self.layout.dtype)
        pixels = np.empty((count, *self.image_shape), np.uint8) if clean or delta else None
        picked = count - np.count_nonzero(variant_ids)  # the clean picks are stored[:picked]
        shard_ids, rows = self.locate(indices)
        edges = np.arange(len(self.starts) + 1)
        clean_runs = np.searchsorted(shard_ids[:picked], edges)
        other_runs = np.searchsorted(shard_ids[picked:], edges) + picked
        columns = variant_ids - 1
        width = len(self.layout.arrays[0].variants) if len(self.layout.arrays) == 1 else 0
        flat_rows = rows * width + columns  # rows of the (n * k, C, H, W) view of a single stacked array
        touched = np.flatnonzero((np.diff(clean_runs) > 0) | (np.diff(other_runs) > 0)).tolist()
        clean_runs, other_runs = clean_runs.tolist(), other_runs.tolist()
        first = pixels if delta else stored  # where a clean pick's pixels go
        for index in touched:
            shard = self._shards[index] or self.shard(index)
            views = shard.mapped()
            start, stop = clean_runs[index], clean_runs[index + 1]
            if stop > start:
                if views is None:
                    shard.clean_into(rows[start:stop], first[start:stop])
                else:  # rows are bounds-checked by locate(): 'clip' lets numpy write straight into `out`
                    views.clean.take(rows[start:stop], 0, first[start:stop], "clip")
            start, stop = other_runs[index], other_runs[index + 1]
            if stop > start:
                self._stored_run(shard, views, slice(start, stop), rows, columns, flat_rows, stored, pixels)
        if delta:
            stored[:picked] = 0  # a clean pick's delta: decoding it gives clean / 255 exactly
        elif pixels is not None:
            pixels[:picked] = stored[:picked]
        return StoredRows(stored, pixels, self.precision)

    @staticmethod
    def _stored_run(shard: ShardReader, views: MappedArrays | None, run: slice, rows: np.ndarray,
                    columns: np.ndarray, flat_rows: np.ndarray, stored: np.ndarray, pixels: np.ndarray | None) -> None:
        """One shard's variant picks: their stored values (and clean images, when wanted) into the run's slots."""
        if views is None:
            shard.stored_into(rows[run], columns[run], stored[run])
            if pixels is not None:
                shard.clean_into(rows[run], pixels[run])
            return
        if views.flat is not None and views.variants.dtype == stored.dtype:  # as bytes: see MappedArrays
            views.flat.take(flat_rows[run], 0, stored.reshape(len(stored), -1).view(np.uint8)[run], "clip")
        else:  # a strided WebDataset shard
            stored[run] = views.variants[rows[run], columns[run]]
        if pixels is not None:
            views.clean.take(rows[run], 0, pixels[run], "clip")

    def shard_data(self, index: int) -> ShardData:
        """A whole shard in its stored form (for verification and conversion)."""
        return self.shard(index).shard_data(self.split)


@dataclass
class StoredRows:
    """Samples as the store keeps them: what `decode` turns into float32 pixels (advpipe.stores.codec).

    `stored` is the chosen variant's stored form (uint8 pixels in a uint8 store, else the float
    delta, 0 for a clean pick); `clean` the uint8 clean images (always there for delta stores,
    on request for uint8 stores).
    """

    stored: np.ndarray
    clean: np.ndarray | None
    precision: str

    def decode(self, out: np.ndarray | None = None) -> np.ndarray:
        return codec.decode(self.clean, self.stored, self.precision, out)


def open_store(location: str | os.PathLike, verify: Verify = "checksum",
               storage_options: dict[str, Any] | None = None, cache: ShardCache | None = None) -> Store:
    """Open a finished store read-only, from a directory or an fsspec URL (see Store.open)."""
    return Store.open(location, verify, storage_options, cache)
