"""Writing a store directory: claim it, put shards and progress records in place, publish the manifest last.

Every file is written to a `.tmp-*` name beside its target, flushed and renamed, so a file
with a final name is always complete; the manifest is renamed into place last, so a
directory is a store exactly when its manifest exists (docs/FORMAT.md section 9). Killing a
writer at any point leaves either a finished store or a directory the next run resumes.
Generation (advpipe.pipeline) decides what to compute and calls this module for every write.

A store in object storage (s3://, gs://, az://) is written object by object, with the same
meaning: object stores have no rename, but an object appears whole or not at all, so a shard
is built in a local temporary file, hashed, uploaded with one put and its size checked; the
marker, progress records, card and manifest are small objects, the manifest last. Every Dask
worker writes its own shards this way, so no shared file system is needed (docs/CLUSTER.md).

A remote writer is fenced (stores/lock.py): it carries its lock holder's `Fence`, checks before every
put or delete that the lock object still names it (a writer taken over stops with LockLostError),
and stamps the fencing token into every JSON object it writes (marker, progress records, saved
manifest). A progress record also names the shard object as the service stored it (ETag, version
id), so a resume checks a finished shard with one HEAD instead of reading it back, and the manifest
is assembled only from records bearing the current token whose objects are still those recorded
(`accepted_progress`); a stale writer's records are ignored and logged with their token.

A writer holds the store's lock (stores/lock.py) for its whole run, and deletes only what
advpipe wrote: `--force` replaces a store or an interrupted generation, never another
directory or prefix, the working or home directory, or the source of a conversion (`check_target`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from advpipe import urls
from advpipe.errors import AdvpipeError, IntegrityError, LockLostError, StoreError
from advpipe.faults import fault_point
from advpipe.io import (
    PROBE_NAME,
    atomic_path,
    atomic_write_json,
    check_path_lengths,
    check_writable,
    sha256_file,
    temp_name,
)
from advpipe.provenance import library_versions
from advpipe.stores.backends import backend, shard_name
from advpipe.stores.card import CARD_NAME, render_card, write_card
from advpipe.stores.lock import (
    HOLDER_NAME,
    LOCK_FILES,
    LOCK_NAME,
    Fence,
    check_fence,
    describe_fence,
    holder_fence,
    store_lock,
    writer_filesystem,
)
from advpipe.stores.manifest import FORMAT, MANIFEST_NAME, Manifest, ShardRecord, read_manifest
from advpipe.stores.shard import Layout, ShardData
from advpipe.stores.source import ShardSource

log = logging.getLogger(__name__)

MARKER = ".generation.json"
PREVIOUS = ".previous-manifest.json"
PROGRESS_DIR = ".progress"
#: the splits a store is written with when its writer is not told (generation's: train and test), each with
#: fewer than 100000 shards (names with a 5-digit index)
DEFAULT_SPLITS: Mapping[str, int] = {"train": 1, "test": 1}


class RemoteDir:
    """A store prefix in object storage, as whole objects named relative to it (no directories, no renames)."""

    def __init__(self, location: str, storage_options: dict[str, Any] | None = None) -> None:
        if urls.is_read_only(location):
            raise StoreError(f"{urls.redact(location)}: '{urls.protocol(location)}://' is read-only for advpipe; "
                             "write the store to a local directory or to object storage (s3://, gs://, az://), "
                             "then serve that")
        self.location = location
        self.storage_options = dict(storage_options or {})
        self.shown = urls.redact(location)
        self._fs: tuple[Any, str] | None = None
        #: the lock holder's fencing token this writer writes under (None: unfenced, e.g. before the lock is taken)
        self.fence: Fence | None = None

    def __str__(self) -> str:
        return self.shown

    def check_fence(self, quick: bool = False) -> None:
        """Raise LockLostError unless the lock object still names this writer's fence (nothing to check when
        unfenced). With `quick`, only ask this process's heartbeat (no request): whether it already saw another
        holder."""
        if self.fence is None or (quick and not self.fence.noticed_lost()):
            return
        check_fence(self.fs, self.root, self.fence, self.shown)

    def _opened(self) -> tuple[Any, str]:
        if self._fs is None:
            self._fs = writer_filesystem(self.location, self.storage_options)
        return self._fs

    @property
    def fs(self) -> Any:
        return self._opened()[0]

    @property
    def root(self) -> str:
        return self._opened()[1]

    def key(self, name: str) -> str:
        return f"{self.root}/{name}"

    @contextlib.contextmanager
    def errors(self, what: str, missing: bool = False) -> Iterator[None]:
        """Turn a storage error into a StoreError naming the location (credentials redacted); with `missing`,
        FileNotFoundError passes through (a read of an object that may not exist)."""
        try:
            yield
        except FileNotFoundError as exc:
            if missing:
                raise
            raise StoreError(f"{self.shown}: cannot {what} ({urls.redact(exc)}); check the URL (does the bucket "
                             "exist?)") from None
        except OSError as exc:
            raise StoreError(f"{self.shown}: cannot {what} ({urls.redact(exc)}); check the location and that your "
                             "credentials may write there, then re-run (finished shards are kept)") from None

    def exists(self, name: str) -> bool:
        with self.errors(f"read {name}"):
            return self.fs.isfile(self.key(name))

    def read(self, name: str) -> bytes:
        with self.errors(f"read {name}", missing=True):
            return self.fs.cat_file(self.key(name))

    def write(self, name: str, data: bytes) -> None:
        self.check_fence()
        with self.errors(f"write {name}"):
            self.fs.pipe_file(self.key(name), data)

    def put(self, local: Path, name: str) -> tuple[int, dict]:
        """Upload a local file as one object; returns the object's size and identity (`stat`) as stored."""
        self.check_fence()
        with self.errors(f"upload {name}"):
            self.fs.put_file(str(local), self.key(name))
        return self.stat(name)

    def stat(self, name: str) -> tuple[int, dict]:
        """(size, identity) of an object, from one HEAD request: the identity holds the service's `etag` and
        `version_id` where it gives them (S3: ETag, VersionId; GCS: etag, generation; Azure: etag, version_id)."""
        with self.errors(f"read {name}", missing=True):
            info = self.fs.info(self.key(name))
        return int(info["size"]), object_identity(info)

    def names(self) -> list[str]:
        """Every object under the prefix, relative to it."""
        prefix = f"{self.root}/"
        with self.errors("list the store"):
            found = self.fs.find(self.root)
        return sorted(path[len(prefix):] for path in found if path.startswith(prefix))

    def delete(self, names: Sequence[str]) -> None:
        if names:
            self.check_fence()
            with self.errors("delete old store objects", missing=True), contextlib.suppress(FileNotFoundError):
                self.fs.rm([self.key(name) for name in names])


class StoreWriter:
    """The one writer of a store: a local directory, or a prefix in object storage (`RemoteDir`)."""

    def __init__(self, path: str | os.PathLike, backend_name: str, compression: str | None = None,
                 layout: Layout | None = None, protect: Sequence[str | os.PathLike] = (),
                 storage_options: dict[str, Any] | None = None, splits: Mapping[str, int] | None = None,
                 fence: Fence | None = None) -> None:
        """`splits` (split name -> number of shards) sizes the names the store will hold, for the path-length
        check (default: DEFAULT_SPLITS). `fence`: the lock holder's fencing token a worker writes under (the
        client's writer takes its own in `locked`); ignored for a local store."""
        text = os.fspath(path)
        self.remote = RemoteDir(text, storage_options) if urls.is_remote(text) else None
        if self.remote is not None:
            self.remote.fence = fence
        #: shard name -> the identity (`RemoteDir.stat`) of the object this writer uploaded under it
        self.uploaded: dict[str, dict] = {}
        self.path: Path | str = text if self.remote else Path(text.removeprefix("file://"))
        self.shown: Path | str = self.remote.shown if self.remote else self.path  # for messages: no credentials
        self.storage_options = dict(storage_options or {})
        self.backend = backend(backend_name)
        self.compression = compression if self.backend.compressible else None
        self.layout = layout
        self.protect = tuple(protect)  # directories this writer must not be at, around or inside
        self.splits = dict(DEFAULT_SPLITS if splits is None else splits)

    # the directory ------------------------------------------------------------------------------

    def check_writable(self) -> None:
        self.check_path_lengths()
        check_target(self.path, self.protect)
        refuse_foreign(self.remote or self.path)
        if self.remote is not None:
            probe = f".tmp-write-probe-{uuid.uuid4().hex}"
            self.remote.write(probe, b"")
            self.remote.delete([probe])
            return
        check_writable(self.path, StoreError, "the store", "choose a writable store.path")

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict]:
        """Hold the store's writer lock for the block (one writer per store); yields the holder record.

        The target is checked first, so nothing is created in a directory advpipe may not write (nor one whose
        files' names or paths would be too long).
        """
        self.check_path_lengths()
        check_target(self.path, self.protect)
        refuse_foreign(self.remote or self.path)
        if self.remote is not None:
            with store_lock(self.path, self.storage_options) as holder:
                self.remote.fence = holder_fence(holder)
                try:
                    yield holder
                finally:
                    self.remote.fence = None
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot write a store here ({exc.strerror or exc}); "
                             "choose a writable path") from None
        with store_lock(self.path) as holder:
            yield holder

    @property
    def fence(self) -> Fence | None:
        """The fencing token this writer writes under (None for a local store, or before the lock is taken)."""
        return self.remote.fence if self.remote is not None else None

    def check_fence(self, quick: bool = False) -> None:
        """Raise LockLostError when this writer's lock has been taken over (see `RemoteDir.check_fence`)."""
        if self.remote is not None:
            self.remote.check_fence(quick)

    def check_path_lengths(self) -> None:
        """Refuse a local store path that the file system could not hold every file of (NAME_MAX, PATH_MAX),
        before anything is created."""
        if self.remote is None:
            check_store_path(self.path, self.backend.name, self.splits)

    @contextlib.contextmanager
    def writing_whole(self, overwrite: bool, writer: str) -> Iterator[None]:
        """Write a store in one go (build_store, convert): hold the lock, `prepare`, run the block; when the block
        fails, remove what this run wrote, and the directories it created, so a failed conversion leaves no
        partial store behind (nothing here resumes it: a re-run starts again)."""
        created = None if self.remote else _first_missing(Path(self.path))
        with self.locked():
            self.prepare(overwrite, writer)
            try:
                yield
            except BaseException:
                self._discard(created)
                raise

    def _discard(self, created: Path | None) -> None:
        """After a failed write in one go, under the lock: empty the store (lock files kept, as `wipe`); when
        this run created the directory, remove it and the folders created for it, lock file included. Its
        lock file goes while the lock is still held, so a writer that opened it meanwhile is refused, and one
        that starts after makes a new one (the folders it needs are then not removed: rmdir leaves a folder
        that is not empty)."""
        try:
            self.wipe()
            if created is None:
                return
            folder = Path(self.path).absolute()
            for name in (HOLDER_NAME, LOCK_NAME):
                with contextlib.suppress(FileNotFoundError):
                    (folder / name).unlink()
            while True:
                folder.rmdir()
                if folder == created:
                    break
                folder = folder.parent
        except OSError as exc:  # the run's own error is the one to report
            log.warning("%s: could not remove what the failed run wrote (%s)", self.shown, exc)

    def existing(self, force: bool) -> Manifest | None:
        """The finished store here, if any; with `force` an unreadable one (old format, damaged) is discarded."""
        if not self._has(MANIFEST_NAME):
            return None
        try:
            return self._source().manifest() if self.remote else read_manifest(self.path)
        except StoreError:
            if not force:
                raise
            log.warning("--force: discarding the unreadable store at %s", self.shown)
            self.wipe()
            return None

    def prepare(self, overwrite: bool, writer: str) -> None:
        """For a store written in one go (under `locked`): refuse to write over a store or an interrupted
        run unless asked, then mark the directory as being written by `writer`."""
        if not overwrite:
            if self._has(MANIFEST_NAME):
                raise StoreError(f"{self.shown}: a store already exists here; choose another path, or --force to "
                                 "replace it (overwrite=True in Python)")
            if self._has(MARKER):
                raise StoreError(f"{self.shown}: an interrupted generation or conversion left files here; choose "
                                 "another path, or --force to discard them (overwrite=True in Python)")
        self.wipe()
        self._write_json(MARKER, {"fingerprint": None, "writer": writer, "versions": library_versions()})

    def claim(self, fingerprint: str, force: bool, previous: dict | None) -> dict | None:
        """Mark the directory as being generated with this fingerprint; refuse to mix two runs' shards.

        Returns the store being extended, or None once `force` has discarded it.
        """
        if self._has(MARKER):
            try:
                claimed = json.loads(self._read(MARKER)).get("fingerprint")
            except (OSError, ValueError, AttributeError, RecursionError):  # not UTF-8 or JSON, not an object
                claimed = None  # a damaged marker vouches for no configuration: treated as another one's
            if claimed != fingerprint:
                if not force:
                    raise StoreError(f"{self.shown}: an interrupted generation with a different configuration "
                                     "left shards here; re-run it with its config, or --force to discard them")
                self.wipe()
                previous = None
        if self.remote is None:
            self.path.mkdir(parents=True, exist_ok=True)
        self._write_json(MARKER, {"fingerprint": fingerprint, "versions": library_versions()})
        return previous

    def take_offline(self, manifest: Manifest) -> None:
        """Before extending a store: save its manifest aside, then remove it (the store is offline until the
        extended manifest is published)."""
        self._write_json(PREVIOUS, {"manifest": manifest.model_dump(mode="json")})
        self._delete(MANIFEST_NAME)

    def saved_previous(self) -> Manifest | None:
        """The manifest `take_offline` saved, when an interrupted extension is resumed."""
        if not self._has(PREVIOUS):
            return None
        return Manifest.model_validate(json.loads(self._read(PREVIOUS))["manifest"])

    def wipe(self) -> None:
        """Empty a store or an interrupted generation, keeping the lock; refuses anything advpipe did not write."""
        if self.remote is not None:
            refuse_foreign(self.remote)
            self._delete(MANIFEST_NAME)  # first: a wipe cut short never leaves a store missing shards
            self.remote.delete([n for n in self.remote.names() if n not in LOCK_FILES])
            return
        if not self.path.exists():
            return
        check_target(self.path, self.protect)
        refuse_foreign(self.path)
        with contextlib.suppress(FileNotFoundError):
            (self.path / MANIFEST_NAME).unlink()  # first: a wipe cut short never leaves a store missing shards
        for child in self.path.iterdir():
            if child.name in LOCK_FILES:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    # shards and progress ----------------------------------------------------------------------

    def write_shard(self, name: str, shard: ShardData) -> ShardRecord:
        """Write one shard atomically and return its manifest record."""
        if self.layout is None:
            raise ValueError("StoreWriter needs the store's variant layout to write shards")
        if self.remote is not None:
            return self._upload_shard(name, shard)
        target = self.path / name
        try:
            with atomic_path(target) as tmp:
                self.backend.write(tmp, shard, self.layout, self.compression)
        except OSError as exc:
            free = shutil.disk_usage(target.parent).free if target.parent.exists() else 0
            raise StoreError(f"shard {name}: could not be written to {self.path} ({exc}); {free} bytes free on "
                             "that file system: free space (or choose another store.path) and re-run to resume"
                             ) from None
        return ShardRecord(name=name, start=shard.start, stop=shard.stop, bytes=target.stat().st_size,
                           sha256=sha256_file(target))

    def _upload_shard(self, name: str, shard: ShardData) -> ShardRecord:
        """Build the shard in a local temporary file, hash it, upload it as one object (whole or absent)."""
        try:
            with tempfile.TemporaryDirectory(prefix="advpipe-shard-") as scratch:
                local = Path(scratch) / Path(name).name
                self.backend.write(local, shard, self.layout, self.compression)
                size, digest = local.stat().st_size, sha256_file(local)
                stored, identity = self.remote.put(local, name)
        except OSError as exc:
            raise StoreError(f"shard {name}: could not be built in the temporary directory {tempfile.gettempdir()} "
                             f"({exc}); free space there (or set TMPDIR) and re-run to resume") from None
        if stored != size:
            raise StoreError(f"shard {name}: stored as {stored} bytes at {self.shown}, but {size} were uploaded; "
                             "re-run to resume (the shard is computed again)")
        self.uploaded[name] = identity
        return ShardRecord(name=name, start=shard.start, stop=shard.stop, bytes=size, sha256=digest)

    def progress_path(self, split: str, index: int) -> Path:
        return Path(self.path) / self._progress_name(split, index)

    @staticmethod
    def _progress_name(split: str, index: int) -> str:
        return f"{PROGRESS_DIR}/{split}-{index:05d}.json"

    def record_progress(self, split: str, index: int, progress: dict) -> None:
        """Mark a shard finished: `progress` holds the run's fingerprint, the shard record and its tallies (and,
        for a remote shard, `object`: the identity of the object as stored, see `RemoteDir.stat`); a fenced
        writer adds its fencing token."""
        self._write_json(self._progress_name(split, index), progress)

    def read_progress(self, split: str, index: int) -> dict:
        value = json.loads(self._read(self._progress_name(split, index)))
        if not isinstance(value, dict):
            raise ValueError("a progress record is a JSON object")
        return value

    def is_done(self, split: str, index: int, name: str, fingerprint: str) -> bool:
        """A shard is finished when its progress record belongs to this run and the shard matches its record.

        A local file is hashed. A remote object is checked with one HEAD: when its version id (or, without one,
        its ETag) is the one recorded at upload, its bytes are the recorded ones (sha256 and size); otherwise, or
        when the service gives neither, it is read back and hashed. A fenced writer then stamps the record with
        its own token (the shard is this run's work from now on).
        """
        try:
            progress = self.read_progress(split, index)
        except FileNotFoundError:
            return False
        except (ValueError, OSError, RecursionError, AdvpipeError):
            progress = None
        done = False
        try:
            if progress is not None:
                record = ShardRecord.model_validate(progress["record"])
                done = progress["fingerprint"] == fingerprint and record.name == name
            if done and self.remote is not None:
                identity = self._check_object(record, progress.get("object"))
                if self.fence is not None and (not self.fence.owns(progress.get("fence"))
                                               or identity != progress.get("object")):
                    log.debug("shard %s: finished by an earlier writer (%s) and verified: kept", name,
                              describe_fence(progress.get("fence")))
                    self.record_progress(split, index, {**progress, "object": identity})
            elif done:
                self._source().fetch(record, "checksum")
        except LockLostError:
            raise
        except (ValueError, KeyError, TypeError, OSError, AdvpipeError):
            done = False
        if not done:
            log.warning("shard %s: unfinished or changed; it will be recomputed", name)
        return done

    def accepted_progress(self, split: str, index: int, name: str, fingerprint: str) -> dict | None:
        """The progress record of a finished shard, as the manifest may take it; None (logged) when it is missing
        or unreadable, another configuration's, or for another shard. For a fenced (remote) writer also when it
        bears another fencing token than this writer's (a stale writer's: ignored, never assembled), or when the
        shard object is no longer the one recorded (checked as `is_done` checks it)."""
        where = self._progress_name(split, index)
        try:
            progress = self.read_progress(split, index)
            record = ShardRecord.model_validate(progress["record"])
        except FileNotFoundError:
            log.warning("shard %s: no progress record; it is computed again", name)
            return None
        except (ValueError, KeyError, TypeError, RecursionError):
            log.warning("%s: unreadable; shard %s is computed again", where, name)
            return None
        if self.fence is not None and not self.fence.owns(progress.get("fence")):
            log.warning("%s: ignoring %s, written by a stale writer (%s; this writer holds %s); shard %s is computed "
                        "again", self.shown, where, describe_fence(progress.get("fence")), self.fence, name)
            return None
        if progress.get("fingerprint") != fingerprint or record.name != name:
            log.warning("%s: belongs to another configuration or shard; shard %s is computed again", where, name)
            return None
        if self.remote is not None:
            try:
                self._check_object(record, progress.get("object"), rehash=False)
            except (FileNotFoundError, IntegrityError) as exc:
                log.warning("shard %s: its object is no longer the one its record names (%s); it is computed again",
                            name, exc)
                return None
        return progress

    def _check_object(self, record: ShardRecord, recorded: Any, rehash: bool = True) -> dict:
        """Check the remote shard object against its record; returns its identity as stored now. One HEAD when
        the recorded identity matches (`same_object`); otherwise the object is read back and hashed. Without
        `rehash` (the manifest's check of shards this run just wrote or checked) an object whose service gives
        no identity is taken on its size, as a resume before identities were recorded took it. Raises
        IntegrityError (or FileNotFoundError) when it does not match."""
        size, identity = self.remote.stat(record.name)
        if size != record.bytes:
            raise IntegrityError(f"shard {record.name}: {size} bytes stored, {record.bytes} recorded")
        comparable = isinstance(recorded, dict) and bool(recorded) and bool(identity)
        if not same_object(recorded, identity) and (rehash or comparable):
            self._source().fetch(record, "checksum")
        return identity

    # publishing -------------------------------------------------------------------------------

    def publish(self, manifest: Manifest) -> None:
        """Write the card (README.md) and then the manifest, the last file of a store; then remove the run's state.

        A fenced writer re-reads the lock before each of these writes: one taken over publishes nothing."""
        if self.remote is not None:
            self.remote.write(CARD_NAME, render_card(manifest).encode())
            text = manifest_text(manifest).encode()
            fault_point("manifest-write")
            self.remote.write(MANIFEST_NAME, text)
        else:
            write_card(self.path, manifest)
            write_manifest(self.path, manifest)
        fault_point("after-manifest")
        self.cleanup()

    def cleanup(self) -> None:
        """Remove run state once the manifest is published (and stale temp files of killed writers)."""
        if self.remote is not None:
            self.remote.delete([n for n in self.remote.names() if n.startswith((f"{PROGRESS_DIR}/", ".tmp-"))
                                or n in (MARKER, PREVIOUS)])
            return
        shutil.rmtree(self.path / PROGRESS_DIR, ignore_errors=True)
        for name in (MARKER, PREVIOUS):
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
        for stale in self.path.rglob(".tmp-*"):
            with contextlib.suppress(OSError):
                stale.unlink()

    # small files or objects, by name relative to the store ---------------------------------------

    def _source(self) -> ShardSource:
        return ShardSource(self.path, self.storage_options)

    def _has(self, name: str) -> bool:
        return self.remote.exists(name) if self.remote else (self.path / name).exists()

    def _read(self, name: str) -> bytes:
        return self.remote.read(name) if self.remote else (self.path / name).read_bytes()

    def _write_json(self, name: str, value: Any) -> None:
        if self.remote is None:
            atomic_write_json(self.path / name, value)
            return
        if self.fence is not None and isinstance(value, dict):
            value = {**value, "fence": self.fence.token()}
        self.remote.write(name, (json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())

    def _delete(self, name: str) -> None:
        if self.remote is not None:
            self.remote.delete([name])
        else:
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()


def object_identity(info: Mapping[str, Any]) -> dict:
    """What names one stored version of an object, from an fsspec `info()`: {"etag", "version_id"}, each only
    where the service gives it (S3: ETag, VersionId; GCS: etag, generation; Azure: etag, version_id)."""
    found = {"etag": info.get("ETag") or info.get("etag"),
             "version_id": info.get("VersionId") or info.get("version_id") or info.get("generation")}
    return {key: str(value) for key, value in found.items() if value not in (None, "", "null")}


def same_object(recorded: Any, current: Mapping[str, Any]) -> bool:
    """Whether an object's identity now (`object_identity`) proves it is the version recorded at upload: the same
    version id where both have one, else the same ETag. False when neither can be compared (then re-hash)."""
    if not isinstance(recorded, dict):
        return False
    if recorded.get("version_id") and current.get("version_id"):
        return recorded["version_id"] == current["version_id"]
    return bool(recorded.get("etag")) and recorded.get("etag") == current.get("etag")


def check_target(path: str | os.PathLike, protect: Sequence[str | os.PathLike] = ()) -> None:
    """Refuse a store path whose writing or replacing could destroy what is not a store.

    The working directory, the home directory, the root and any directory holding one of them
    are never a store; nor are the protected paths (what the store is made from: a conversion's
    source store, generation's source data), nor anything around or inside them.
    """
    if urls.is_remote(path):
        _check_remote_target(os.fspath(path), protect)
        return
    where = Path(path).expanduser().resolve()
    for name, place in _precious():
        if where == place or where in place.parents:
            raise StoreError(f"{path}: is {name}{'' if where == place else ' or a directory holding it'}; a store "
                             "needs a directory of its own (a new or empty one, e.g. a 'store' folder inside it)")
    for source in protect:
        if urls.is_remote(source):
            continue  # a local directory is never at, around or inside a URL
        source_dir = Path(source).expanduser().resolve()
        relation = ("is" if where == source_dir else "holds" if where in source_dir.parents else
                    "is inside" if source_dir in where.parents else None)
        if relation:
            raise StoreError(f"{path}: {relation} the source {source}; write the store to a directory outside "
                             "it (replacing the store must never delete its source)")


def store_names(backend_name: str, splits: Mapping[str, int]) -> list[str]:
    """Every name a local store writer creates, relative to the store, temporary names at their longest
    included: the lock and its holder, the marker, the saved manifest, card and manifest, the write probe,
    and each split's last shard and progress record (the longest index)."""
    fixed = [MARKER, PREVIOUS, CARD_NAME, MANIFEST_NAME, HOLDER_NAME]
    names = [LOCK_NAME, PROBE_NAME, *fixed, *map(temp_name, fixed)]
    for split, count in splits.items():
        last = max(count - 1, 0)
        for name in (shard_name(split, last, backend_name), StoreWriter._progress_name(split, last)):
            names += [name, temp_name(name)]
    return names


def check_store_path(path: str | os.PathLike, backend_name: str,
                     splits: Mapping[str, int] = DEFAULT_SPLITS) -> None:
    """Refuse, before anything is created, a local store path with a name longer than its file system takes
    (NAME_MAX), or too long (PATH_MAX) for the store's longest file name, a shard's temporary name included."""
    check_path_lengths(path, store_names(backend_name, splits), StoreError, "the store",
                       "choose a shorter store path")


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (the first mkdir(parents=True) creates), or None."""
    missing = None
    for place in (path.absolute(), *path.absolute().parents):
        if os.path.lexists(place):
            break
        missing = place
    return missing


def _check_remote_target(location: str, protect: Sequence[str | os.PathLike]) -> None:
    """A remote store is never a whole bucket's parent of its source, nor inside or at it (by URL prefix)."""
    where = _url_key(location)
    for source in protect:
        if not urls.is_remote(source):
            continue
        other = _url_key(os.fspath(source))
        relation = ("is" if where == other else "holds" if other.startswith(where + "/") else
                    "is inside" if where.startswith(other + "/") else None)
        if relation:
            raise StoreError(f"{urls.redact(location)}: {relation} the source {urls.redact(source)}; write the store "
                             "to a prefix outside it (replacing the store must never delete its source)")


def _url_key(location: str) -> str:
    """A URL compared by protocol and path (s3a:// is s3://; trailing slashes dropped)."""
    return f"{urls.protocol(location)}://{location.split('://', 1)[1].strip('/')}"


def refuse_foreign(path: Path | RemoteDir) -> None:
    """Refuse a path that is not a directory advpipe may write: one that is empty, absent, a store, or an
    interrupted generation."""
    if isinstance(path, RemoteDir):
        _refuse_foreign_prefix(path)
        return
    if not path.exists():
        return
    if not path.is_dir():
        raise StoreError(f"{path}: is a file, not a directory; choose another store path")
    if ownership(path) is not None:
        return
    manifest = path / MANIFEST_NAME
    if manifest.exists():
        raise StoreError(f"{path}: holds a {MANIFEST_NAME} that is not an advpipe store manifest; advpipe does not "
                         "write or replace this directory (not even with --force): move it away or choose another "
                         "store path")
    leftovers = sorted(p.name for p in path.iterdir() if not _writer_state(p.name))
    raise StoreError(f"{path}: directory is not empty and is not a store ({', '.join(leftovers[:3])}); choose an "
                     "empty or new store path (--force replaces only an advpipe store, never other files)")


def _refuse_foreign_prefix(remote: RemoteDir) -> None:
    """`refuse_foreign` for a prefix in object storage: its objects decide, as a directory's files do."""
    names = remote.names()
    if remote_ownership(remote, names) is not None:
        return
    if MANIFEST_NAME in names:
        raise StoreError(f"{remote.shown}: holds a {MANIFEST_NAME} that is not an advpipe store manifest; advpipe does "
                         "not write or replace this prefix (not even with --force): move it away or choose another "
                         "store path")
    leftovers = [n for n in names if not _writer_state(n)]
    raise StoreError(f"{remote.shown}: prefix is not empty and is not a store ({', '.join(leftovers[:3])}); choose an "
                     "empty or new store path (--force replaces only an advpipe store, never other objects)")


def remote_ownership(remote: RemoteDir, names: list[str] | None = None) -> str | None:
    """`ownership` for a prefix in object storage."""
    names = remote.names() if names is None else names
    for name, kind in ((MANIFEST_NAME, "store"), (MARKER, "generation")):
        if name in names:
            value = _json_bytes(remote, name)
            if (value.get("format") == FORMAT) if kind == "store" else bool(value):
                return kind
    return "empty" if all(_writer_state(name) for name in names) else None


def _json_bytes(remote: RemoteDir, name: str) -> dict:
    try:
        value = json.loads(remote.read(name))
    except (OSError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def ownership(path: Path) -> str | None:
    """What advpipe made at `path`: 'store', 'generation' (in progress or interrupted), 'empty' (nothing but
    writer state, or no directory), or None: someone else's files, which no writer may delete."""
    if not path.exists():
        return "empty"
    if _json_object(path / MANIFEST_NAME).get("format") == FORMAT:
        return "store"
    if _json_object(path / MARKER):
        return "generation"
    if all(_writer_state(child.name) for child in path.iterdir()):
        return "empty"
    return None


def _writer_state(name: str) -> bool:
    return name in LOCK_FILES or name.startswith(".tmp-")


def _json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested past the stack
        return {}
    return value if isinstance(value, dict) else {}


def _precious() -> list[tuple[str, Path]]:
    """Directories a store may never be: where the user works and lives."""
    places = [("the working directory", Path.cwd().resolve())]
    with contextlib.suppress(RuntimeError, KeyError):
        places.append(("your home directory", Path.home().resolve()))
    return places


def manifest_text(manifest: Manifest) -> str:
    return json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_manifest(store_dir: Path, manifest: Manifest) -> None:
    """Publish a store: the manifest is the last file written."""
    text = manifest_text(manifest)
    with atomic_path(Path(store_dir) / MANIFEST_NAME) as tmp:
        tmp.write_text(text)
        fault_point("manifest-write")
