"""Opening, reading and writing stores; the format itself is in docs/FORMAT.md.

Readers never write: they open shards read-only and keep nothing in the store
directory, so any number of processes and teams may share one store. Writers put
each shard in place by rename and write the manifest last, so a reader sees
either a finished store or none.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np

from advpipe.errors import IntegrityError, StoreError
from advpipe.faults import fault_point
from advpipe.io import atomic_path, sha256_file
from advpipe.stores import codec, hdf5, wds
from advpipe.stores.manifest import MANIFEST_NAME, Manifest, ShardRecord, read_manifest
from advpipe.stores.shard import ShardData

log = logging.getLogger(__name__)

Verify = Literal["none", "size", "checksum"]
EXTENSIONS = {"hdf5": "h5", "webdataset": "tar"}
CLEAN = "clean"


def shard_name(split: str, index: int, backend: str) -> str:
    return f"{split}/{split}-{index:05d}.{EXTENSIONS[backend]}"


def write_shard(store_dir: Path, name: str, shard: ShardData, backend: str,
                compression: str | None = None) -> ShardRecord:
    """Write one shard atomically and return its manifest record."""
    target = Path(store_dir) / name
    try:
        with atomic_path(target) as tmp:
            if backend == "hdf5":
                hdf5.write_shard(tmp, shard, compression)
            else:
                wds.write_shard(tmp, shard)
    except OSError as exc:
        free = shutil.disk_usage(target.parent).free if target.parent.exists() else 0
        raise StoreError(f"shard {name}: could not be written to {store_dir} ({exc}); {free} bytes free on that "
                         "file system: free space (or choose another store.path) and re-run to resume") from None
    return ShardRecord(name=name, start=shard.start, stop=shard.stop, bytes=target.stat().st_size,
                       sha256=sha256_file(target))


def write_manifest(store_dir: Path, manifest: Manifest) -> None:
    """Publish a store: the manifest is the last file written."""
    text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True, allow_nan=False) + "\n"
    with atomic_path(Path(store_dir) / MANIFEST_NAME) as tmp:
        tmp.write_text(text)
        fault_point("manifest-write")


class Store:
    """A finished store, opened read-only."""

    def __init__(self, path: Path, manifest: Manifest, verify: Verify = "checksum") -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.verify = verify
        self._splits: dict[str, SplitReader] = {}

    @classmethod
    def open(cls, path: str | Path, verify: Verify = "checksum") -> Store:
        """Open a store; every shard must exist with its recorded size.

        With verify='checksum' (default) each shard's sha256 is also checked the
        first time this process reads it, so corruption is an error naming the
        shard, never garbage pixels.
        """
        path = Path(path)
        manifest = read_manifest(path)
        store = cls(path, manifest, verify)
        if verify != "none":
            for record in store.shard_records():
                check_shard(path, record, checksum=False)
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


def check_shard(store_dir: Path, record: ShardRecord, checksum: bool = True) -> None:
    """Raise IntegrityError naming the shard if it is missing, resized or (optionally) altered."""
    path = Path(store_dir) / record.name
    if not path.is_file():
        raise IntegrityError(f"shard {record.name}: missing from {store_dir}")
    size = path.stat().st_size
    if size != record.bytes:
        raise IntegrityError(
            f"shard {record.name}: {size} bytes on disk, manifest says {record.bytes} (truncated or replaced)"
        )
    if checksum and sha256_file(path) != record.sha256:
        raise IntegrityError(f"shard {record.name}: sha256 does not match the manifest (the file is corrupt)")


class SplitReader:
    """Batched random access to one split: `read(indices, variant_ids)` -> float32 (k, C, H, W).

    Shard handles open lazily in whichever process reads, so a SplitReader can be
    handed to DataLoader workers; each worker opens its own read-only handles.
    """

    def __init__(self, store: Store, split: str) -> None:
        self.store_path = store.path
        self.split = split
        self.record = store.manifest.splits[split]
        self.precision = store.manifest.precision
        self.image_shape = tuple(store.manifest.image_shape)
        self.variant_names = store.manifest.variant_names
        self.verify = store.verify
        self.starts = np.array([s.start for s in self.record.shards], dtype=np.int64)
        self._shards: list[hdf5.HDF5Shard | wds.WdsShard | None] = [None] * len(self.record.shards)
        self._opener: Callable = hdf5.HDF5Shard if store.manifest.backend == "hdf5" else wds.WdsShard

    def __len__(self) -> int:
        return self.record.count

    def shard(self, index: int) -> hdf5.HDF5Shard | wds.WdsShard:
        shard = self._shards[index]
        if shard is None:
            record = self.record.shards[index]
            if self.verify != "none":
                check_shard(self.store_path, record, checksum=self.verify == "checksum")
            shard = self._opener(self.store_path / record.name, self.variant_names, record.count)
            self._shards[index] = shard
        return shard

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
        columns = [np.zeros(len(self), dtype=bool)]
        for v in range(len(self.variant_names)):
            columns.append(np.concatenate([self.shard(i).failed(v) for i in range(len(self._shards))]))
        return np.stack(columns, axis=1)

    def read(self, indices: np.ndarray, variant_ids: np.ndarray | int = 0) -> np.ndarray:
        """Gather samples -> float32 (k, C, H, W) in [0, 1]: the sampler's hot path.

        Per shard: two gathers in row order (the clean rows, then every adversarial row at
        once, whatever its variant, from the stacked variants array), decoded in place.
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

    def _read_rows(self, shard, rows: np.ndarray, variant_ids: np.ndarray) -> np.ndarray:
        clean = shard.clean(rows)
        adversarial = variant_ids > 0
        if not adversarial.any():
            return codec.to_float(clean)
        stored = shard.stored_pairs(rows[adversarial], variant_ids[adversarial] - 1)
        return codec.decode_mixed(clean, stored, adversarial, self.precision)

    def shard_data(self, index: int) -> ShardData:
        """A whole shard in its stored form (for conversion and re-encoding)."""
        shard, record = self.shard(index), self.record.shards[index]
        rows = np.arange(record.count)
        return ShardData(
            split=self.split, start=record.start, ids=shard.ids, labels=shard.labels, clean=shard.clean(rows),
            stored={n: shard.stored(v, rows) for v, n in enumerate(self.variant_names)},
            failed={n: shard.failed(v) for v, n in enumerate(self.variant_names)},
        )


def open_store(path: str | Path, verify: Verify = "checksum") -> Store:
    """Open a finished store read-only (see Store.open)."""
    return Store.open(path, verify)
