"""HDF5 shards: one file per shard, one dataset per array (docs/FORMAT.md, "HDF5 shards").

Uncompressed datasets are written contiguous so that a reader can map them straight
from the file's bytes: one sample of one variant is then a plain slice of the page cache
(or of the downloaded bytes, for a store behind a URL), not a trip through HDF5's chunk
machinery. Compressed shards are chunked by samples and read whole chunks at a time
through a small cache.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np

from advpipe.errors import IntegrityError
from advpipe.faults import fault_point
from advpipe.stores.shard import Layout, ShardData, ShardReader, StoredArray

CHUNK_SAMPLES = 64


def write_shard(path: Path, shard: ShardData, layout: Layout, compression: str | None = None) -> None:
    """Write one shard file at `path` (the caller makes it atomic).

    The file is built in memory and written with plain file I/O: the HDF5 library
    crashes the process when it hits a full disk while closing a file, whereas a
    plain write raises ENOSPC, which the caller turns into a clear error.
    """
    buffer = io.BytesIO()
    _build(buffer, shard, layout, compression)
    data = buffer.getbuffer()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        fault_point("shard-write")  # a kill here leaves half a file, which must never carry the shard's name
        handle.write(data[len(data) // 2 :])


def _build(target: io.BytesIO, shard: ShardData, layout: Layout, compression: str | None) -> None:
    options = {"track_times": False}
    if compression:
        options.update(compression=compression, shuffle=True)
    with h5py.File(target, "w", libver="v108", track_order=True) as handle:
        handle.attrs["format"] = "advpipe-shard"
        handle.attrs["split"] = shard.split
        handle.attrs["start"] = shard.start
        handle.attrs["variants"] = np.array(list(shard.stored), dtype=h5py.string_dtype())
        handle.create_dataset("ids", data=shard.ids, track_times=False)
        handle.create_dataset("labels", data=shard.labels, track_times=False)
        _array(handle, "clean", shard.clean, options)
        for array in layout.arrays:
            _array(handle, array.name, shard.stacked(array, layout), options)
        if shard.stored:
            handle.create_dataset("failed", data=shard.failed_matrix().astype(np.uint8), track_times=False)


def _array(group: h5py.Group, name: str, data: np.ndarray, options: dict) -> None:
    chunks = (min(CHUNK_SAMPLES, len(data)), *data.shape[1:]) if "compression" in options else None
    group.create_dataset(name, data=data, chunks=chunks, **options)


class HDF5Shard(ShardReader):
    """Read-only access to one HDF5 shard, fetched and opened on first use in the process that reads it."""

    _arrays: dict[str, object] | None = None
    _handle: h5py.File | None = None

    def load(self) -> None:
        if self._arrays is None:
            self._chunk_cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
            self._arrays = self._open(self.source.fetch(self.record, self.verify))

    def _open(self, data) -> dict[str, object]:
        local = self.source.local_path(self.record)
        try:
            handle = h5py.File(local if local is not None else io.BytesIO(data), "r", locking=False)
        except OSError as exc:
            raise IntegrityError(f"shard {self.name}: cannot be opened as HDF5 ({exc}); run `advpipe verify`") from None
        small = ["ids", "labels", "failed"] if self.layout.names else ["ids", "labels"]
        arrays: dict[str, object] = {key: self._dataset(handle, key)[()] for key in small}
        arrays["clean"] = self._mapped(handle, "clean", data, np.uint8, self.image_shape)
        for array in self.layout.arrays:
            arrays[array.name] = self._mapped(handle, array.name, data, array.dtype,
                                              (len(array.variants), *self.image_shape))
        if any(isinstance(a, h5py.Dataset) for a in arrays.values()):
            self._handle = handle  # chunked data is read through the open file
        else:
            handle.close()
        return arrays

    def _dataset(self, handle: h5py.File, key: str) -> h5py.Dataset:
        if key not in handle:
            raise IntegrityError(f"shard {self.name}: dataset '{key}' is missing; run `advpipe verify`")
        dataset = handle[key]
        if dataset.shape[:1] != (self.count,):
            raise IntegrityError(
                f"shard {self.name}: dataset '{key}' holds {dataset.shape[0]} samples, manifest says {self.count}"
            )
        return dataset

    def _mapped(self, handle: h5py.File, key: str, data, dtype: np.dtype, shape: tuple[int, ...]) -> object:
        """A read-only view of the shard's bytes for contiguous data; the h5py dataset itself for chunked data."""
        dataset = self._dataset(handle, key)
        if (dataset.dtype, dataset.shape[1:]) != (np.dtype(dtype), tuple(shape)):
            raise IntegrityError(f"shard {self.name}: dataset '{key}' is {dataset.dtype} {dataset.shape[1:]}, the "
                                 f"manifest says {np.dtype(dtype)} {tuple(shape)}; run `advpipe verify`")
        offset = dataset.id.get_offset()
        if dataset.chunks is None and offset is not None:
            return np.frombuffer(data, dtype=dataset.dtype, count=int(np.prod(dataset.shape)),
                                 offset=offset).reshape(dataset.shape)
        return dataset

    @property
    def arrays(self) -> dict[str, object]:
        self.load()
        return self._arrays

    @property
    def labels(self) -> np.ndarray:
        return self.arrays["labels"]

    @property
    def ids(self) -> np.ndarray:
        return self.arrays["ids"]

    def failed(self) -> np.ndarray:
        if not self.layout.names:
            return np.zeros((self.count, 0), dtype=bool)
        return self.arrays["failed"].astype(bool)

    def clean(self, rows: np.ndarray) -> np.ndarray:
        return self._take("clean", rows)

    def gather(self, array: StoredArray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        return self._take(array.name, rows, columns)

    def _take(self, key: str, rows: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        source = self.arrays[key]
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
