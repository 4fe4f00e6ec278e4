"""One writer per store: an exclusive lock on the store location, held for a whole generate, convert or build.

Two writers on one store would mix shards of two configurations under one manifest, so every
writer takes this lock before it touches anything in the store, and a second writer is refused
at once with a message naming the holder (host, process id, start time, command).

A local store is locked with `filelock.FileLock` on `.writer.lock` inside the store directory:
an flock(2) lock, which the kernel drops when its process ends however it ends, so a killed
writer never blocks the next run. The lock file itself stays (deleting it while another process
may have it open would let two writers hold two different files); the holder's description is
`.writer.json`, written atomically after the lock is taken and removed before it is released.
Dask workers write shards but take no lock: the client holds it for them.

`store_lock(location)` is the whole interface, so a lock for object-storage locations (whose
writers do not share a kernel) can be added beside the local one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from advpipe.errors import StoreError
from advpipe.io import atomic_write_json

log = logging.getLogger(__name__)

LOCK_NAME = ".writer.lock"
HOLDER_NAME = ".writer.json"
#: Files of the lock itself: never part of a store's content, never deleted by a wipe or --force.
LOCK_FILES = frozenset({LOCK_NAME, HOLDER_NAME})


def store_lock(location: str | os.PathLike) -> contextlib.AbstractContextManager[dict]:
    """Hold the exclusive writer lock of the store at `location` for a `with` block; yields the holder record.

    Raises StoreError at once, naming the holder, when another writer holds it.
    """
    text = os.fspath(location)
    if "://" in text:
        raise StoreError(f"{text}: stores are written to a local directory; write it locally, then copy it to "
                         "object storage (readers open it there)")
    return _local_lock(Path(text))


def holder_record() -> dict:
    """Who this writer is, in the words a refused second writer prints."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv) or sys.executable}


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "a process that has not yet recorded itself"
    return (f"process {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}: "
            f"{holder.get('command')}")


def read_holder(directory: Path) -> dict | None:
    """The recorded holder of a lock, or None when none is recorded (yet) or the record is unreadable."""
    try:
        holder = json.loads((directory / HOLDER_NAME).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return holder if isinstance(holder, dict) else None


@contextlib.contextmanager
def _local_lock(directory: Path) -> Iterator[dict]:
    lock = FileLock(directory / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = describe_holder(read_holder(directory))
        raise StoreError(f"{directory}: another advpipe writer is using this store ({holder}); "
                         "wait for it to finish or end it, then re-run (the lock ends with its process, however "
                         "that ends)") from None
    except OSError as exc:
        raise StoreError(f"{directory}: cannot lock the store for writing ({exc.strerror or exc}); "
                         "choose a writable store path on a local file system") from None
    try:
        holder = holder_record()
        atomic_write_json(directory / HOLDER_NAME, holder)
        log.debug("%s: writer lock taken (%s)", directory, describe_holder(holder))
        yield holder
    finally:
        with contextlib.suppress(FileNotFoundError):
            (directory / HOLDER_NAME).unlink()
        lock.release()
