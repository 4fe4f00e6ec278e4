"""The storage backends: how each shard format is named, written and read, chosen by the manifest's `backend`.

Callers look a backend up here instead of branching on its name, so a new format is one
entry: a file extension, a writer and a `ShardReader` implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from advpipe.errors import StoreError
from advpipe.stores import hdf5, wds
from advpipe.stores.shard import Layout, ShardData, ShardReader


@dataclass(frozen=True)
class Backend:
    name: str
    extension: str
    reader: type[ShardReader]
    write: Callable[[Path, ShardData, Layout, str | None], None]  # (path, shard, layout, compression)
    compressible: bool  # honours the store's `compression`
    streamable: bool  # records can be read in order, a shard at a time (advpipe.sampler.streaming)


BACKENDS: dict[str, Backend] = {
    "hdf5": Backend("hdf5", "h5", hdf5.HDF5Shard, hdf5.write_shard, compressible=True, streamable=False),
    "webdataset": Backend("webdataset", "tar", wds.WdsShard, wds.write_shard, compressible=False, streamable=True),
}


def backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise StoreError(f"unknown store backend '{name}' (known: {', '.join(BACKENDS)})")
    return BACKENDS[name]


def shard_name(split: str, index: int, backend_name: str) -> str:
    """Where writers put a shard (readers take names from the manifest instead)."""
    return f"{split}/{split}-{index:05d}.{backend(backend_name).extension}"
