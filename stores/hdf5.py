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

from advpipe.errors import IntegrityError, shorten, shown
from advpipe.faults import fault_point
from advpipe.stores.shard import Layout, MappedArrays, ShardData, ShardReader, StoredArray

CHUNK_SAMPLES = 64
#: filters the format allows (docs/FORMAT.md section 5.3): deflate (gzip), shuffle, and h5py's LZF
ALLOWED_FILTERS = frozenset({h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE, 32000})
#: soft links followed from one dataset name before it is refused (loops)
MAX_SOFT_LINKS = 8


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
    _views: MappedArrays | None = None

    def load(self) -> None:
        if self._arrays is None:
            self._chunk_cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
            self._arrays = self._open(self.source.fetch(self.record, self.verify))

    def _open(self, data) -> dict[str, object]:
        local = self.source.local_path(self.record)
        try:
            handle = h5py.File(local if local is not None else io.BytesIO(data), "r", locking=False)
        except (OSError, RuntimeError, ValueError) as exc:
            raise IntegrityError(f"shard {self.name}: cannot be opened as HDF5 ({shown(exc)}); "
                                 "run `advpipe verify`") from None
        try:
            arrays = self._arrays_of(handle, data)
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:  # h5py on malformed metadata
            handle.close()
            raise IntegrityError(f"shard {self.name}: malformed HDF5 ({shown(exc)}); run `advpipe verify`") from None
        except IntegrityError:
            handle.close()
            raise
        if any(isinstance(a, h5py.Dataset) for a in arrays.values()):
            self._handle = handle  # chunked data is read through the open file
        else:
            handle.close()
        return arrays

    def _arrays_of(self, handle: h5py.File, data) -> dict[str, object]:
        """Every dataset the format names, checked (docs/FORMAT.md, "What a reader refuses") before any is read."""
        small = {"ids": ((), np.int64), "labels": ((), np.int64)}
        if self.layout.names:
            small["failed"] = ((len(self.layout.names),), np.uint8)
        arrays: dict[str, object] = {key: self._dataset(handle, key, dtype, tail)[()]
                                     for key, (tail, dtype) in small.items()}
        arrays["clean"] = self._mapped(self._dataset(handle, "clean", np.uint8, self.image_shape), data)
        for array in self.layout.arrays:
            dataset = self._dataset(handle, array.name, array.dtype, (len(array.variants), *self.image_shape))
            arrays[array.name] = self._mapped(dataset, data)
        return arrays

    def _dataset(self, handle: h5py.File, key: str, dtype: np.dtype, tail: tuple[int, ...]) -> h5py.Dataset:
        """Dataset `key`, refused unless its data lies in this file, with the format's dtype, shape and filters."""
        dataset = self._resolve(handle, key)
        where = f"shard {self.name}: dataset '{key}'"
        if not isinstance(dataset, h5py.Dataset):
            raise IntegrityError(f"{where} is not a dataset; run `advpipe verify`")
        if dataset.is_virtual or dataset.external:
            kind = "a virtual dataset" if dataset.is_virtual else "stored in external files"
            raise IntegrityError(f"{where} is {kind}: its data would come from outside the shard; refused")
        plist = dataset.id.get_create_plist()
        filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
        if not filters <= ALLOWED_FILTERS:
            raise IntegrityError(f"{where} uses HDF5 filters {sorted(filters - ALLOWED_FILTERS)}; the format allows "
                                 "only gzip, lzf and shuffle; refused")
        expected = (self.count, *tail)
        if dataset.shape is None or dataset.shape[:1] != (self.count,):
            held = "no samples" if not dataset.shape else f"{dataset.shape[0]} samples"
            raise IntegrityError(f"{where} holds {held}, manifest says {self.count}; run `advpipe verify`")
        if (dataset.dtype, dataset.shape) != (np.dtype(dtype), expected):
            raise IntegrityError(f"{where} is {shorten(str(dataset.dtype))} {dataset.shape[1:]}, the format and "
                                 f"manifest say {np.dtype(dtype)} {tuple(tail)}; run `advpipe verify`")
        return dataset

    def _resolve(self, handle: h5py.File, key: str) -> object:
        """The object at `key`, following soft links inside the file; external and user-defined links are refused.

        Walks the path a component at a time, so no link is followed before its kind is known:
        HDF5 would open an external link's file while resolving the path.
        """
        parts, node, hops = [key], handle, 0
        while parts:
            part = parts.pop(0)
            if part in ("", "."):
                continue
            name = part.encode("utf-8", "surrogateescape")
            if not isinstance(node, h5py.Group) or not node.id.links.exists(name):  # H5Lexists follows no link
                raise IntegrityError(f"shard {self.name}: dataset '{key}' is missing; run `advpipe verify`")
            kind = node.id.links.get_info(name).type
            if kind == h5py.h5l.TYPE_SOFT:
                hops += 1
                if hops > MAX_SOFT_LINKS:
                    raise IntegrityError(f"shard {self.name}: dataset '{key}' is behind more than {MAX_SOFT_LINKS} "
                                         "soft links (a loop?); refused")
                target = node.id.links.get_val(name).decode("utf-8", "surrogateescape")
                parts[:0] = target.split("/")
                node = handle if target.startswith("/") else node
            elif kind == h5py.h5l.TYPE_HARD:
                node = node[part]
            else:
                raise IntegrityError(f"shard {self.name}: dataset '{key}' is reached through an external or "
                                     "user-defined link, which would open another file; refused")
        return node

    def _mapped(self, dataset: h5py.Dataset, data) -> object:
        """A read-only view of the shard's bytes for contiguous data; the h5py dataset itself for chunked data."""
        offset = dataset.id.get_offset()
        if dataset.chunks is None and offset is not None:
            size = int(np.prod(dataset.shape)) * dataset.dtype.itemsize
            if offset + size > len(data):
                raise IntegrityError(f"shard {self.name}: dataset '{dataset.name}' lies past the end of the file "
                                     f"({offset + size} > {len(data)} bytes); run `advpipe verify`")
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

    def mapped(self) -> MappedArrays | None:
        if self._views is None and len(self.layout.arrays) == 1:
            self._views = MappedArrays.of(self.arrays["clean"], self.arrays[self.layout.arrays[0].name])
        return self._views

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
        try:
            block = dataset[chunk * size : (chunk + 1) * size]
        except (OSError, RuntimeError, ValueError) as exc:  # a chunk that does not decompress
            raise IntegrityError(f"shard {self.name}: dataset '{key}' cannot be read ({shown(exc)}); "
                                 "run `advpipe verify`") from None
        self._chunk_cache[cache_key] = block
        if len(self._chunk_cache) > 8:
            self._chunk_cache.popitem(last=False)
        return block
