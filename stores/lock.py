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

An object-storage store (s3://, gs://, az://) is written from machines that share no kernel,
so its lock is the object `.writer.lock` under the store prefix, created exclusively (a
conditional put: a second create fails) and holding the holder's description. The holder
rewrites it every `heartbeat_seconds()` from a daemon thread and deletes it when done. A lock
nobody can release (its holder was killed) is stale, and the next writer takes it over with a
warning: when its holder ran on this host and that process is gone, or when its heartbeat is
older than `ADVPIPE_LOCK_TTL` seconds (default 300, far above any heartbeat gap or clock skew).

A holder paused longer than that (a long GC pause, a suspended laptop, a network partition) is
taken over while still alive, so every remote holder gets a fencing token (`Fence`): a number,
`fence` in the lock object, that grows by one with every takeover (a lock created afresh starts
at 1), together with the holder's random `token`, which tells two holders of one number apart.
The writer puts it into every object it writes and checks, before each write, that the lock
object still names its token (`check_fence`): a writer that finds another token there stops with
`LockLostError`, and the new holder assembles its manifest only from records bearing its own
token (stores/writer.py, docs/FORMAT.md section 9). A local lock is kernel-held and cannot be
taken over, so local stores need no fence.

`store_lock(location)` is the whole interface; `Fence` and `check_fence` serve the remote writer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from advpipe import urls
from advpipe.errors import LockLostError, StoreError
from advpipe.io import atomic_write_json

log = logging.getLogger(__name__)

LOCK_NAME = ".writer.lock"
HOLDER_NAME = ".writer.json"
#: Files of the lock itself: never part of a store's content, never deleted by a wipe or --force.
LOCK_FILES = frozenset({LOCK_NAME, HOLDER_NAME})
#: how often the holder of an object-storage lock rewrites it
HEARTBEAT_SECONDS = 30.0
#: a remote lock whose heartbeat is older than this (seconds) is stale; ADVPIPE_LOCK_TTL overrides it
LOCK_TTL_SECONDS = 300.0
#: holder token -> set by that holder's heartbeat once the lock object no longer names it (this process only)
_LOST: dict[str, threading.Event] = {}


@dataclass(frozen=True)
class Fence:
    """The fencing token of a remote lock's holder: `number` grows with every takeover; `holder` is the holder's
    random token, unique to one holder. Sent to workers with the job; written into every object as `token()`."""

    number: int
    holder: str

    def token(self) -> dict:
        return {"number": self.number, "holder": self.holder}

    def owns(self, value: Any) -> bool:
        """Whether a `token()` found in an object is this holder's."""
        return isinstance(value, dict) and value.get("holder") == self.holder and value.get("number") == self.number

    def noticed_lost(self) -> bool:
        """Whether this process's heartbeat has already seen the lock object name another holder (no request)."""
        event = _LOST.get(self.holder)
        return event is not None and event.is_set()

    def __str__(self) -> str:
        return f"fence {self.number}"


def describe_fence(value: Any) -> str:
    """A `Fence.token()` found in an object, in words: 'fence 3, holder 1a2b3c4d' (or what is wrong with it)."""
    if not isinstance(value, dict):
        return "no fencing token" if value is None else "an unreadable fencing token"
    return f"fence {value.get('number')}, holder {str(value.get('holder'))[:8]}"


def holder_fence(holder: dict) -> Fence | None:
    """The fence of a holder record that `store_lock` yielded (None for a local lock, which needs none)."""
    if isinstance(holder.get("fence"), int) and isinstance(holder.get("token"), str):
        return Fence(holder["fence"], holder["token"])
    return None


def store_lock(location: str | os.PathLike,
               storage_options: dict[str, Any] | None = None) -> contextlib.AbstractContextManager[dict]:
    """Hold the exclusive writer lock of the store at `location` for a `with` block; yields the holder record.

    Raises StoreError at once, naming the holder, when another writer holds it.
    """
    text = os.fspath(location)
    if urls.is_read_only(text):
        raise StoreError(f"{urls.redact(text)}: '{urls.protocol(text)}://' is read-only for advpipe; write the "
                         "store to a local directory or to object storage (s3://, gs://, az://)")
    if urls.is_remote(text):
        return _remote_lock(text, storage_options)
    return _local_lock(Path(text.removeprefix("file://")))


def holder_record() -> dict:
    """Who this writer is, in the words a refused second writer prints."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": urls.redact(" ".join(sys.argv) or sys.executable)}


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


# object storage ---------------------------------------------------------------------------------


def heartbeat_seconds() -> float:
    """How often a remote lock's holder rewrites it: every HEARTBEAT_SECONDS, or four times per TTL when a short
    ADVPIPE_LOCK_TTL asks for it (a live holder must never look stale)."""
    return min(HEARTBEAT_SECONDS, lock_ttl() / 4)


def lock_ttl() -> float:
    """Seconds after its last heartbeat that a remote lock is stale (ADVPIPE_LOCK_TTL, default 300)."""
    text = os.environ.get("ADVPIPE_LOCK_TTL")
    try:
        ttl = float(text) if text else LOCK_TTL_SECONDS
    except ValueError:
        ttl = -1.0
    if not ttl > 0:
        raise StoreError(f"ADVPIPE_LOCK_TTL={text!r}: must be a positive number of seconds (default "
                         f"{LOCK_TTL_SECONDS:.0f})")
    return ttl


def writer_filesystem(location: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fs, root) for writing at a remote location: a private instance without listing caches, so that
    what other processes wrote (or deleted) is always seen."""
    options = {**(storage_options or {}), "skip_instance_cache": True, "use_listings_cache": False}
    fs, root = urls.filesystem(location, options)
    return fs, root.rstrip("/")


@contextlib.contextmanager
def _remote_lock(location: str, storage_options: dict[str, Any] | None) -> Iterator[dict]:
    lock_ttl()  # a bad ADVPIPE_LOCK_TTL is refused before the lock is taken
    fs, root = writer_filesystem(location, storage_options)
    key = f"{root}/{LOCK_NAME}"
    shown = urls.redact(location)
    holder = {**holder_record(), "token": uuid.uuid4().hex, "fence": 1}
    _take(fs, key, holder, shown)
    stop = threading.Event()
    _LOST[holder["token"]] = lost = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(fs, key, holder, stop, lost, shown), daemon=True,
                            name="advpipe-lock-heartbeat")
    beat.start()
    log.debug("%s: writer lock taken (%s, fence %d)", shown, describe_holder(holder), holder["fence"])
    try:
        yield holder
    finally:
        stop.set()
        beat.join()
        _LOST.pop(holder["token"], None)
        if _token(fs, key) == holder["token"]:  # a lock taken over is the new holder's to delete
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(key)


def _take(fs: Any, key: str, holder: dict, shown: str) -> None:
    """Create the lock object exclusively; take over a stale one once; refuse a live holder."""
    for attempt in range(2):
        try:
            with fs.open(key, "xb") as handle:
                handle.write(_lock_bytes(holder))
            return
        except FileExistsError:
            found, current = _read_lock(fs, key)
            if not found:  # released between the create and the read
                continue
            reason = _stale(current)
            if reason is None or attempt:
                raise StoreError(f"{shown}: another advpipe writer is using this store ({describe_holder(current)}); "
                                 "wait for it to finish or end it, then re-run (a killed writer's lock is taken "
                                 f"over once its process is gone, or {lock_ttl():.0f} s after its last heartbeat)"
                                 ) from None
            fence = current.get("fence") if current else None
            holder["fence"] = (fence if _is_count(fence) else 0) + 1
            log.warning("%s: taking over the writer lock of %s: %s (fence %d; that writer's later writes are "
                        "refused and ignored)", shown, describe_holder(current), reason, holder["fence"])
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(key)
        except OSError as exc:
            raise StoreError(f"{shown}: cannot lock the store for writing ({urls.redact(exc)}); check the location "
                             "and that your credentials may write there") from None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_fence(fs: Any, root: str, fence: Fence, shown: str) -> None:
    """Raise LockLostError unless the lock object under `root` still names `fence`'s holder: one small read, made
    before every write of a fenced writer (client or worker)."""
    key = f"{root}/{LOCK_NAME}"
    try:
        current = _lock_json(fs, key)
    except OSError as exc:
        raise StoreError(f"{shown}: cannot read the writer lock {LOCK_NAME} ({urls.redact(exc)}); check the location "
                         "and your credentials, then re-run (finished shards are kept)") from None
    if isinstance(current, dict) and current.get("token") == fence.holder:
        return
    raise LockLostError(lost_message(shown, fence, current))


def lost_message(shown: str, fence: Fence, current: Any) -> str:
    """What a writer whose lock was taken over says (one line): who holds the lock now, and what to do."""
    if current is None:
        return (f"{shown}: this writer's lock ({fence}) was taken over by another writer, which has since released "
                "it; this writer stops without writing more: check the store with `advpipe verify`, or re-run this "
                "command to resume it")
    if not isinstance(current, dict) or not current:
        return (f"{shown}: this writer's lock ({fence}) was replaced by an unreadable {LOCK_NAME}; this writer "
                "stops without writing more: make sure no other writer runs, then re-run this command to resume")
    return (f"{shown}: this writer's lock ({fence}) was taken over by another writer (fence {current.get('fence')}: "
            f"{describe_holder(current)}), most likely because this one was paused for more than ADVPIPE_LOCK_TTL; "
            "this writer stops without writing more: let that writer finish the store (re-run this command only if "
            "it fails)")


def _lock_bytes(holder: dict) -> bytes:
    return (json.dumps({**holder, "heartbeat": time.time()}, sort_keys=True) + "\n").encode()


def _lock_json(fs: Any, key: str) -> Any:
    """The lock object's JSON value: None when there is none, {} when it is not JSON; other OSErrors propagate."""
    try:
        return json.loads(fs.cat_file(key))
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError):
        return {}


def _read_lock(fs: Any, key: str) -> tuple[bool, dict | None]:
    """(whether the lock object exists, its holder: None when unreadable)."""
    try:
        value = _lock_json(fs, key)
    except OSError:
        return True, None
    if value is None:
        return False, None
    return True, value if isinstance(value, dict) and value else None


def _token(fs: Any, key: str) -> str | None:
    """The token of the lock object's holder (None: no lock, or an unreadable one)."""
    holder = _read_lock(fs, key)[1]
    return holder.get("token") if holder else None


def _stale(holder: dict | None) -> str | None:
    """Why a remote lock can be taken over, or None while its holder may still be alive."""
    if holder is None:
        return "its lock object is unreadable"
    heartbeat = holder.get("heartbeat")
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
            and not _alive(holder["pid"]):
        return "that process no longer exists on this host"
    if not isinstance(heartbeat, int | float) or time.time() - heartbeat > lock_ttl():
        return f"no heartbeat for more than {lock_ttl():.0f} s (ADVPIPE_LOCK_TTL)"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _heartbeat(fs: Any, key: str, holder: dict, stop: threading.Event, lost: threading.Event, shown: str) -> None:
    """Rewrite the lock object every `heartbeat_seconds()` while it is still ours. Once it names another holder
    (or is gone) the heartbeat stops for good and sets `lost`: the writer's next fenced step raises LockLostError
    (a heartbeat never writes over another holder's lock)."""
    while not stop.wait(heartbeat_seconds()):
        try:
            current = _lock_json(fs, key)
            if not isinstance(current, dict) or current.get("token") != holder["token"]:
                lost.set()
                log.debug("%s: the writer lock (fence %d) is no longer this writer's; it stops at its next write",
                          shown, holder["fence"])
                return
            fs.pipe_file(key, _lock_bytes(holder))
        except OSError as exc:
            log.warning("%s: could not refresh the writer lock (%s); retrying", shown, urls.redact(exc))
