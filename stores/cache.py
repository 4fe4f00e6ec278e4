"""A local cache of whole shards fetched from object storage, so map-style reading of a remote store is disk-fast.

Map-style reading jumps between shards, so every shard of a remote store would be fetched
again by every process and epoch. The cache keeps whole shards on local disk instead:

- keyed by the manifest's sha256, so identical shards of two stores (or a store and its
  converted or re-published copy) are fetched once, and a stale entry cannot exist;
- verified on arrival: bytes are hashed while they stream in, and an object that does not
  match the manifest is an error naming the shard, never a cache entry;
- bounded: after each arrival the least recently used entries are removed until the cache
  holds at most `max_bytes` (a hit marks an entry used); the entry just fetched always stays;
- safe for several processes on one machine (DataLoader workers, ranks, jobs): an entry
  appears by atomic rename of a fully verified temporary file, a per-entry lock keeps
  processes from fetching the same shard twice at once, and an entry removed while another
  process reads it stays readable to that process (POSIX unlink semantics).

Readers only ever read the remote store; the cache directory is the only thing they write.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import multiprocessing
import multiprocessing.context
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import filelock

from advpipe.errors import IntegrityError, StoreError
from advpipe.io import copy_hashing
from advpipe.stores.manifest import ShardRecord

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 20 * 2**30
BLOCK = 8 << 20  # bytes copied per read while fetching
CACHE_DIR_ENV, CACHE_BYTES_ENV = "ADVPIPE_CACHE_DIR", "ADVPIPE_CACHE_BYTES"


@dataclass(frozen=True)
class CacheEntry:
    """One shard as the cache holds it: its file, a read-only map of it, and whether it was already there."""

    path: Path
    data: Any  # mmap (bytes for an empty shard)
    signature: tuple[int, ...]  # (size, mtime_ns, inode, device) of the file when it was opened
    hit: bool
    fetched: int  # bytes downloaded to produce it (0 on a hit)


class ShardCache:
    """Whole shards on local disk under `root`, keyed by sha256, at most `max_bytes` (least recently used out)."""

    def __init__(self, root: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if int(max_bytes) < 1:
            raise StoreError(f"shard cache size must be at least 1 byte, got {max_bytes}")
        self.root = Path(root).expanduser()
        self.max_bytes = int(max_bytes)

    def __repr__(self) -> str:
        return f"ShardCache({str(self.root)!r}, max_bytes={self.max_bytes})"

    @classmethod
    def default(cls) -> ShardCache:
        """$ADVPIPE_CACHE_DIR (default ~/.cache/advpipe/shards), at most $ADVPIPE_CACHE_BYTES (default 20 GiB)."""
        root = os.environ.get(CACHE_DIR_ENV) or Path(
            os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "advpipe", "shards")
        size = os.environ.get(CACHE_BYTES_ENV, str(DEFAULT_MAX_BYTES))
        try:
            return cls(root, int(float(size)))
        except ValueError:
            raise StoreError(f"{CACHE_BYTES_ENV}={size!r}: not a number of bytes") from None

    def entry_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256[:2] / sha256

    def get(self, record: ShardRecord, open_remote: Callable[[], IO[bytes]], origin: str = "") -> CacheEntry:
        """The shard's cached file, fetched through `open_remote` and verified first if it is not cached yet.

        `origin` names where the shard comes from in errors (a redacted location).
        """
        path = self.entry_path(record.sha256)
        entry = self._open(path, record, hit=True)
        if entry is not None:
            return entry
        self._prepare()
        with filelock.FileLock(self.root / "locks" / f"{record.sha256}.lock"):
            entry = self._open(path, record, hit=True)  # another process may have fetched it meanwhile
            if entry is not None:
                return entry
            fetched = self._download(record, open_remote, path, origin)
            entry = self._open(path, record, hit=False, fetched=fetched)
        if entry is None:
            raise StoreError(f"shard {record.name}: its cache entry {path} vanished as it was written")
        self.evict(keep=path)
        return entry

    def _prepare(self) -> None:
        try:
            for sub in ("objects", "tmp", "locks"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"shard cache {self.root}: cannot be created ({exc.strerror or exc}); set "
                             f"{CACHE_DIR_ENV} to a writable directory") from None

    def _open(self, path: Path, record: ShardRecord, hit: bool, fetched: int = 0) -> CacheEntry | None:
        """A map of the entry, or None when it is absent (or was cut short: then it is removed)."""
        try:
            with open(path, "rb") as handle:
                stat = os.fstat(handle.fileno())
                if stat.st_size != record.bytes:
                    log.warning("shard cache: %s has %d bytes, expected %d; fetching it again", path, stat.st_size,
                                record.bytes)
                    with contextlib.suppress(OSError):
                        path.unlink()
                    return None
                data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if stat.st_size else b""
        except FileNotFoundError:
            return None
        if hit:  # mark it used: eviction removes the least recently used first (atime, set explicitly)
            with contextlib.suppress(OSError):
                os.utime(path, ns=(time.time_ns(), stat.st_mtime_ns))
        signature = (stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev)
        return CacheEntry(path, data, signature, hit, fetched)

    def _download(self, record: ShardRecord, open_remote: Callable[[], IO[bytes]], path: Path, origin: str) -> int:
        """Stream the object into a temporary file, hashing as it arrives; rename it into place if it matches."""
        fd, tmp = tempfile.mkstemp(prefix=f"{record.sha256}.", dir=self.root / "tmp")
        try:
            with os.fdopen(fd, "wb") as out, _remote(record, open_remote, origin) as remote:
                digest, size = copy_hashing(remote, out, BLOCK)
            if size != record.bytes:
                raise IntegrityError(f"shard {record.name}: {size} bytes, manifest says {record.bytes} "
                                     f"(truncated or replaced in {origin})")
            if digest != record.sha256:
                raise IntegrityError(f"shard {record.name}: sha256 does not match the manifest (the object in "
                                     f"{origin} is corrupt)")
            os.chmod(tmp, 0o644)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        log.debug("shard cache: fetched %s (%d bytes) into %s", record.name, size, path)
        return size

    def evict(self, keep: Path | None = None) -> int:
        """Remove least recently used entries until at most `max_bytes` remain; returns the bytes removed."""
        self._prepare()
        with filelock.FileLock(self.root / "locks" / "evict.lock"):
            entries = sorted(self._entries(), key=lambda e: e[0])
            total = sum(size for _, size, _ in entries)
            removed = 0
            for _, size, path in entries:
                if total <= self.max_bytes:
                    break
                if path == keep:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    total -= size
                    removed += size
        if removed:
            log.debug("shard cache %s: removed %d bytes of least recently used shards", self.root, removed)
        return removed

    def _entries(self) -> list[tuple[int, int, Path]]:
        """(last use in ns, size, path) of every entry."""
        found = []
        for folder in (self.root / "objects").glob("??"):
            for path in folder.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    stat = path.stat()
                    found.append((max(stat.st_atime_ns, stat.st_mtime_ns), stat.st_size, path))
        return found

    def size(self) -> int:
        """Bytes the cache holds now."""
        return sum(size for _, size, _ in self._entries()) if (self.root / "objects").is_dir() else 0


@contextlib.contextmanager
def _remote(record: ShardRecord, open_remote: Callable[[], IO[bytes]], origin: str):
    try:
        with open_remote() as handle:
            yield handle
    except FileNotFoundError:
        raise IntegrityError(f"shard {record.name}: missing from {origin}") from None
    except OSError as exc:
        raise StoreError(f"shard {record.name}: cannot be read from {origin} ({exc})") from None


class FetchCounters:
    """Cache hits, misses and bytes fetched by a store reader, summed over the processes that read for it.

    For a remote store the counts live in shared memory, inherited by DataLoader workers
    (fork) or handed to them as they start (spawn), so a loader's `metrics()` in the main
    process includes its workers' reads. Pickled any other way it becomes an independent copy.
    """

    FIELDS = ("cache_hits", "cache_misses", "bytes_fetched")

    def __init__(self, shared: bool) -> None:
        # spawn context: a fork-context lock cannot go to spawned workers; inheriting (fork) works either way
        self._values: Any = (multiprocessing.get_context("spawn").Array("q", len(self.FIELDS)) if shared
                             else [0] * len(self.FIELDS))

    def __getstate__(self) -> dict:
        sharing = multiprocessing.context.get_spawning_popen() is not None
        if sharing or isinstance(self._values, list):
            return {"_values": self._values}
        return {"_values": list(self._values[:])}

    def add(self, hits: int = 0, misses: int = 0, fetched: int = 0) -> None:
        lock = getattr(self._values, "get_lock", contextlib.nullcontext)()
        with lock:
            for index, value in enumerate((hits, misses, fetched)):
                self._values[index] += value

    def snapshot(self) -> dict[str, int]:
        return dict(zip(self.FIELDS, (int(v) for v in self._values[:]), strict=True))
