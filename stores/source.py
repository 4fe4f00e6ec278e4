"""Where a store's files are (a local directory or any fsspec URL: http://, s3://, ...) and the one way a
shard is fetched and checked against the manifest.

Teams share stores, so shards may live on another machine. Every reader gets a shard's
bytes from `ShardSource.fetch`: a read-only memory map for a local file, one request for
a remote one, its size and (as `verify` says) sha256 checked before any byte is used, so
corruption is an error naming the shard, never wrong pixels. Readers never write.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem

from advpipe import urls
from advpipe.errors import IntegrityError, StoreError
from advpipe.stores.cache import FetchCounters, ShardCache
from advpipe.stores.manifest import MANIFEST_NAME, Manifest, ShardRecord, parse_manifest, read_manifest
from advpipe.stores.shard import local_shard_stat

Verify = Literal["none", "size", "checksum"]
VERIFY_MODES = ("none", "size", "checksum")


class ShardSource:
    """A store's location, and verified access to its manifest and shards.

    Holds only the location and options, so it pickles into DataLoader workers; each
    process makes its own fsspec filesystem (and HTTP session) on first use. A local
    shard hashed in this process (or before a fork) is trusted while its size, mtime and
    inode are unchanged; a remote shard is hashed every time it is fetched.
    """

    def __init__(self, location: str | os.PathLike, storage_options: dict[str, Any] | None = None,
                 verify: Verify = "checksum", cache: ShardCache | None = None) -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
        self.location = str(location)
        self.shown = urls.redact(self.location)  # the location as messages and logs show it: no credentials
        self.storage_options = urls.storage_options(self.location, storage_options)
        self.verify = verify
        self.cache = cache if urls.is_remote(self.location) else None  # a remote store's shards, on local disk
        self.counters = FetchCounters(shared=urls.is_remote(self.location))
        self._verified: dict[str, tuple[int, ...]] = {}  # local shard path -> stat signature it was hashed at
        self._maps: dict[str, tuple[tuple[int, ...], Any]] = {}  # local shard path -> (signature, memory map)
        self._fs: tuple[int, fsspec.AbstractFileSystem, str] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None, "_maps": {}}

    def __repr__(self) -> str:
        return f"ShardSource({self.shown!r})"

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        if self._fs is None or self._fs[0] != os.getpid():
            fs, root = urls.filesystem(self.location, self.storage_options)
            self._fs = (os.getpid(), fs, root.rstrip("/") or "/")
        return self._fs[1], self._fs[2]

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem()[0], LocalFileSystem)

    @property
    def display(self) -> Path | str:
        """The location as a user names it: a Path for a local store, the URL otherwise."""
        if not self.is_local:
            return self.shown
        return Path(self.location) if "://" not in self.location else Path(self.filesystem()[1])

    def local_path(self, record: ShardRecord) -> Path | None:
        """The shard's file when the store is local (HDF5 opens it by name), else None."""
        return Path(self.filesystem()[1], record.name) if self.is_local else None

    def manifest(self) -> Manifest:
        """The validated manifest; refused with the reason when the location holds no finished store."""
        if self.is_local:
            return read_manifest(self.filesystem()[1])
        fs, root = self.filesystem()
        try:
            text = fs.cat_file(f"{root}/{MANIFEST_NAME}")
        except FileNotFoundError:
            raise StoreError(f"{self.shown}: not a finished store (no {MANIFEST_NAME}); it may still be being "
                             "generated, or the location is wrong") from None
        except OSError as exc:
            raise StoreError(f"{self.shown}: cannot read {MANIFEST_NAME} ({urls.redact(exc)})") from None
        return parse_manifest(text, f"{self.shown}/{MANIFEST_NAME}")

    def has_manifest(self) -> bool:
        fs, root = self.filesystem()
        try:
            return fs.isfile(f"{root}/{MANIFEST_NAME}")
        except OSError:
            return False

    # shards ---------------------------------------------------------------------------------------

    def check_size(self, record: ShardRecord) -> None:
        """Raise IntegrityError naming the shard if it is missing or has another size (reads no data)."""
        fs, root = self.filesystem()
        try:
            local = isinstance(fs, LocalFileSystem)  # a local shard must be a regular file inside the store
            size = local_shard_stat(root, record.name).st_size if local else fs.size(f"{root}/{record.name}")
        except FileNotFoundError:
            raise IntegrityError(f"shard {record.name}: missing from {self.shown}") from None
        except OSError as exc:
            raise StoreError(f"shard {record.name}: cannot be read from {self.shown} ({urls.redact(exc)})") from None
        self._check_length(record, size)

    def fetch(self, record: ShardRecord, verify: Verify | None = None) -> Any:
        """The shard's whole bytes (a read-only mmap for local files), checked as `verify` (default: the source's) says.

        'size' compares the size with the manifest's, 'checksum' also the sha256, 'none' nothing.
        """
        verify = verify or self.verify
        fs, root = self.filesystem()
        path = f"{root}/{record.name}"
        if isinstance(fs, LocalFileSystem):
            data, signature = self._local(record, path)
        elif self.cache is not None:
            data, signature, path = self._cached(fs, record, path)
        else:
            data, signature = self._remote(fs, record, path), None
        if verify == "none":
            return data
        self._check_length(record, len(data))
        if verify == "checksum" and (signature is None or self._verified.get(path) != signature):
            if hashlib.sha256(data).hexdigest() != record.sha256:
                raise IntegrityError(f"shard {record.name}: sha256 does not match the manifest (the file is corrupt)")
            if signature is not None:
                self._verified[path] = signature
        return data

    def verify_local(self, records: Iterable[ShardRecord]) -> None:
        """Hash every shard of a local store now (verify='checksum'), so corruption is an error at once.

        Later fetches, in this process or in DataLoader workers started from it, trust a
        file whose size, mtime and inode are unchanged since. Threads share the hashing
        (hashlib releases the GIL). Remote shards are hashed at every fetch instead.
        """
        if self.verify != "checksum" or not self.is_local:
            return
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for _ in pool.map(self.fetch, records):
                pass

    def fetch_all(self, records: list[ShardRecord], ahead: int) -> Iterator[Any]:
        """Each shard's verified bytes in order, fetching up to `ahead` shards in the background."""
        if not ahead:
            yield from map(self.fetch, records)
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="advpipe-shard-fetch")
        pending: deque[Future] = deque()
        try:
            for record in records:
                pending.append(pool.submit(self.fetch, record))
                if len(pending) > ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _check_length(self, record: ShardRecord, size: int) -> None:
        if size != record.bytes:
            raise IntegrityError(f"shard {record.name}: {size} bytes, manifest says {record.bytes} "
                                 "(truncated or replaced)")

    def _local(self, record: ShardRecord, path: str) -> tuple[Any, tuple[int, ...]]:
        """A read-only memory map of the file, kept for the next use while the file is unchanged.

        It costs address space, not memory: the pages are the page cache's. Keeping it saves
        re-mapping every page of the store each epoch.
        """
        try:
            stat = local_shard_stat(self.filesystem()[1], record.name)  # refuses links out, FIFOs, devices
            signature = (stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev)
            if self._maps.get(path, (None,))[0] != signature:
                with open(path, "rb") as handle:
                    data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if stat.st_size else b""
                self._maps[path] = (signature, data)
        except FileNotFoundError:
            raise IntegrityError(f"shard {record.name}: missing from {self.shown}") from None
        except OSError as exc:
            raise IntegrityError(f"shard {record.name}: cannot be read ({exc})") from None
        return self._maps[path][1], signature

    def _cached(self, fs: fsspec.AbstractFileSystem, record: ShardRecord, path: str) -> tuple[Any, tuple, str]:
        """The shard through the local cache: verified as it arrives, then trusted like a local file."""
        entry = self.cache.get(record, lambda: fs.open(path, "rb"), self.shown)
        self.counters.add(hits=int(entry.hit), misses=int(not entry.hit), fetched=entry.fetched)
        if not entry.hit:
            self._verified[str(entry.path)] = entry.signature  # hashed on arrival
        return entry.data, entry.signature, str(entry.path)

    def metrics(self) -> dict[str, int]:
        """`store/cache_hits`, `store/cache_misses`, `store/bytes_fetched`: over this reader and its workers."""
        return {f"store/{name}": value for name, value in self.counters.snapshot().items()}

    def _remote(self, fs: fsspec.AbstractFileSystem, record: ShardRecord, path: str) -> bytes:
        try:
            data = fs.cat_file(path)
            self.counters.add(fetched=len(data))
            return data
        except FileNotFoundError:
            raise IntegrityError(f"shard {record.name}: missing from {self.shown}") from None
        except OSError as exc:
            raise StoreError(f"shard {record.name}: cannot be read from {self.shown} ({urls.redact(exc)})") from None
