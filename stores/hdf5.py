"""HDF5 shards: one file per shard, one dataset per array (docs/FORMAT.md, "HDF5 shards").

Uncompressed datasets are written contiguous so that a reader can memory-map
them straight from the file: one sample of one variant is then a plain slice of
the page cache, not a trip through HDF5's chunk machinery. Compressed shards are
chunked by samples and read whole chunks at a time through a small cache.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np

from advpipe.errors import IntegrityError
from advpipe.stores.shard import ShardData

CHUNK_SAMPLES = 64


def write_shard(path: Path, shard: ShardData, compression: str | None) -> None:
    """Write one shard file at `path` (the caller makes it atomic).

    The file is built in memory and written with plain file I/O: the HDF5 library
    crashes the process when it hits a full disk while closing a file, whereas a
    plain write raises ENOSPC, which the caller turns into a clear error.
    """
    buffer = io.BytesIO()
    _build(buffer, shard, compression)
    with open(path, "wb") as handle:
        handle.write(buffer.getbuffer())


def _build(target: io.BytesIO, shard: ShardData, compression: str | None) -> None:
    options = {"track_times": False}
    if compression:
        options.update(compression=compression, shuffle=True)
    names = list(shard.stored)
    with h5py.File(target, "w", libver="v108", track_order=True) as handle:
        handle.attrs["format"] = "advpipe-shard"
        handle.attrs["split"] = shard.split
        handle.attrs["start"] = shard.start
        handle.attrs["variants"] = np.array(names, dtype=h5py.string_dtype())
        handle.create_dataset("ids", data=shard.ids, track_times=False)
        handle.create_dataset("labels", data=shard.labels, track_times=False)
        _array(handle, "clean", shard.clean, options)
        if names:
            _array(handle, "variants", np.stack([shard.stored[n] for n in names], axis=1), options)
            failed = np.stack([shard.failed[n] for n in names], axis=1).astype(np.uint8)
            handle.create_dataset("failed", data=failed, track_times=False)


def _array(group: h5py.Group, name: str, data: np.ndarray, options: dict) -> None:
    chunks = (min(CHUNK_SAMPLES, len(data)), *data.shape[1:]) if "compression" in options else None
    group.create_dataset(name, data=data, chunks=chunks, **options)


class HDF5Shard:
    """Read-only access to one shard; opened lazily so it can be pickled into DataLoader workers."""

    def __init__(self, path: Path, variant_names: list[str], count: int) -> None:
        self.path = path
        self.variant_names = variant_names
        self.count = count
        self._arrays: dict[str, object] | None = None
        self._chunk_cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None, "_chunk_cache": OrderedDict()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def _open(self) -> dict[str, object]:
        if self._arrays is None:
            self._arrays = self._load()
        return self._arrays

    def _load(self) -> dict[str, object]:
        try:
            handle = h5py.File(self.path, "r", locking=False)
        except OSError as exc:
            raise IntegrityError(
                f"shard {self.path.name}: cannot be opened as HDF5 ({exc}); run `advpipe verify`"
            ) from None
        stacked = ["clean", "variants"] if self.variant_names else ["clean"]
        small = ["ids", "labels", "failed"] if self.variant_names else ["ids", "labels"]
        arrays: dict[str, object] = {key: self._dataset(handle, key)[()] for key in small}
        arrays.update({key: self._mapped(handle, key) for key in stacked})
        if self.variant_names and arrays["variants"].shape[1] != len(self.variant_names):
            raise IntegrityError(f"shard {self.path.name}: holds {arrays['variants'].shape[1]} variants, "
                                 f"manifest says {len(self.variant_names)}; run `advpipe verify`")
        if not any(isinstance(a, h5py.Dataset) for a in arrays.values()):
            handle.close()
        return arrays

    def _dataset(self, handle: h5py.File, key: str) -> h5py.Dataset:
        if key not in handle:
            raise IntegrityError(f"shard {self.path.name}: dataset '{key}' is missing; run `advpipe verify`")
        dataset = handle[key]
        if dataset.shape[:1] != (self.count,):
            raise IntegrityError(
                f"shard {self.path.name}: dataset '{key}' holds {dataset.shape[0]} samples, manifest says {self.count}"
            )
        return dataset

    def _mapped(self, handle: h5py.File, key: str) -> object:
        """A read-only memmap for contiguous data; the h5py dataset itself for chunked data."""
        dataset = self._dataset(handle, key)
        offset = dataset.id.get_offset()
        if dataset.chunks is None and offset is not None:
            return np.memmap(self.path, mode="r", dtype=dataset.dtype, offset=offset, shape=dataset.shape)
        return dataset

    @property
    def labels(self) -> np.ndarray:
        return self._open()["labels"]

    @property
    def ids(self) -> np.ndarray:
        return self._open()["ids"]

    def failed(self, variant_index: int) -> np.ndarray:
        return self._open()["failed"][:, variant_index].astype(bool)

    def clean(self, rows: np.ndarray) -> np.ndarray:
        return self._take("clean", rows)

    def stored(self, variant_index: int, rows: np.ndarray) -> np.ndarray:
        return self.stored_pairs(rows, np.full(len(rows), variant_index))

    def stored_pairs(self, rows: np.ndarray, variant_indices: np.ndarray) -> np.ndarray:
        """Row i of variant variant_indices[i] for every i: one gather, whatever the mix of variants."""
        return self._take("variants", rows, variant_indices)

    def _take(self, key: str, rows: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        source = self._open()[key]
        if isinstance(source, np.ndarray):
            return np.asarray(source[rows] if columns is None else source[rows, columns])
        return self._take_chunked(key, source, rows, columns)

    def _take_chunked(self, key: str, dataset: h5py.Dataset, rows: np.ndarray,
                      columns: np.ndarray | None) -> np.ndarray:
        """Decode each needed chunk once (sorted), then gather: h5py fancy indexing is ~20x slower."""
        size = dataset.chunks[0]
        tail = dataset.shape[1:] if columns is None else dataset.shape[2:]
        out = np.empty((len(rows), *tail), dtype=dataset.dtype)
        chunk_ids = rows // size
        for chunk in np.unique(chunk_ids):
            block = self._chunk(key, dataset, int(chunk), size)
            mask = chunk_ids == chunk
            local = rows[mask] - chunk * size
            out[mask] = block[local] if columns is None else block[local, columns[mask]]
        return out

    def _chunk(self, key: str, dataset: h5py.Dataset, chunk: int, size: int) -> np.ndarray:
        cache_key = (key, chunk)
        if cache_key in self._chunk_cache:
            self._chunk_cache.move_to_end(cache_key)
            return self._chunk_cache[cache_key]
        block = dataset[chunk * size : (chunk + 1) * size]
        self._chunk_cache[cache_key] = block
        if len(self._chunk_cache) > 8:
            self._chunk_cache.popitem(last=False)
        return block
