"""Writing a store directory: claim it, put shards and progress records in place, publish the manifest last.

Every file is written to a `.tmp-*` name beside its target, flushed and renamed, so a file
with a final name is always complete; the manifest is renamed into place last, so a
directory is a store exactly when its manifest exists (docs/FORMAT.md section 9). Killing a
writer at any point leaves either a finished store or a directory the next run resumes.
Generation (advpipe.pipeline) decides what to compute and calls this module for every write.

A writer holds the store's lock (stores/lock.py) for its whole run, and deletes only what
advpipe wrote: `--force` replaces a store or an interrupted generation, never another
directory, the working or home directory, or the source of a conversion (`check_target`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from advpipe.errors import AdvpipeError, StoreError
from advpipe.faults import fault_point
from advpipe.io import atomic_path, atomic_write_json, check_writable, sha256_file
from advpipe.provenance import library_versions
from advpipe.stores.backends import backend
from advpipe.stores.card import write_card
from advpipe.stores.lock import LOCK_FILES, store_lock
from advpipe.stores.manifest import FORMAT, MANIFEST_NAME, Manifest, ShardRecord, read_manifest
from advpipe.stores.shard import Layout, ShardData
from advpipe.stores.source import ShardSource

log = logging.getLogger(__name__)

MARKER = ".generation.json"
PREVIOUS = ".previous-manifest.json"
PROGRESS_DIR = ".progress"


class StoreWriter:
    """The one writer of a store directory (a local path: stores are written locally, read from anywhere)."""

    def __init__(self, path: str | os.PathLike, backend_name: str, compression: str | None = None,
                 layout: Layout | None = None, protect: Sequence[str | os.PathLike] = ()) -> None:
        self.path = Path(path)
        self.backend = backend(backend_name)
        self.compression = compression if self.backend.compressible else None
        self.layout = layout
        self.protect = tuple(protect)  # directories this writer must not be at, around or inside

    # the directory ------------------------------------------------------------------------------

    def check_writable(self) -> None:
        check_target(self.path, self.protect)
        refuse_foreign(self.path)
        check_writable(self.path, StoreError, "the store", "choose a writable store.path")

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict]:
        """Hold the store's writer lock for the block (one writer per store); yields the holder record.

        The target is checked first, so nothing is created in a directory advpipe may not write.
        """
        check_target(self.path, self.protect)
        refuse_foreign(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot write a store here ({exc.strerror or exc}); "
                             "choose a writable path") from None
        with store_lock(self.path) as holder:
            yield holder

    def existing(self, force: bool) -> Manifest | None:
        """The finished store here, if any; with `force` an unreadable one (old format, damaged) is discarded."""
        if not (self.path / MANIFEST_NAME).exists():
            return None
        try:
            return read_manifest(self.path)
        except StoreError:
            if not force:
                raise
            log.warning("--force: discarding the unreadable store at %s", self.path)
            self.wipe()
            return None

    def prepare(self, overwrite: bool, writer: str) -> None:
        """For a store written in one go (under `locked`): refuse to write over a store or an interrupted
        run unless asked, then mark the directory as being written by `writer`."""
        if not overwrite:
            if (self.path / MANIFEST_NAME).exists():
                raise StoreError(f"{self.path}: a store already exists here; choose another path, or --force to "
                                 "replace it (overwrite=True in Python)")
            if (self.path / MARKER).exists():
                raise StoreError(f"{self.path}: an interrupted generation or conversion left files here; choose "
                                 "another path, or --force to discard them (overwrite=True in Python)")
        self.wipe()
        atomic_write_json(self.path / MARKER, {"fingerprint": None, "writer": writer,
                                               "versions": library_versions()})

    def claim(self, fingerprint: str, force: bool, previous: dict | None) -> dict | None:
        """Mark the directory as being generated with this fingerprint; refuse to mix two runs' shards.

        Returns the store being extended, or None once `force` has discarded it.
        """
        marker = self.path / MARKER
        if marker.exists():
            try:
                claimed = json.loads(marker.read_text()).get("fingerprint")
            except (OSError, ValueError, AttributeError, RecursionError):  # not UTF-8 or JSON, not an object
                claimed = None  # a damaged marker vouches for no configuration: treated as another one's
            if claimed != fingerprint:
                if not force:
                    raise StoreError(f"{self.path}: an interrupted generation with a different configuration "
                                     "left shards here; re-run it with its config, or --force to discard them")
                self.wipe()
                previous = None
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(marker, {"fingerprint": fingerprint, "versions": library_versions()})
        return previous

    def take_offline(self, manifest: Manifest) -> None:
        """Before extending a store: save its manifest aside, then remove it (the store is offline until the
        extended manifest is published)."""
        atomic_write_json(self.path / PREVIOUS, {"manifest": manifest.model_dump(mode="json")})
        (self.path / MANIFEST_NAME).unlink()

    def saved_previous(self) -> Manifest | None:
        """The manifest `take_offline` saved, when an interrupted extension is resumed."""
        saved = self.path / PREVIOUS
        return Manifest.model_validate(json.loads(saved.read_text())["manifest"]) if saved.exists() else None

    def wipe(self) -> None:
        """Empty a store or an interrupted generation, keeping the lock; refuses anything advpipe did not write."""
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

    def progress_path(self, split: str, index: int) -> Path:
        return self.path / PROGRESS_DIR / f"{split}-{index:05d}.json"

    def record_progress(self, split: str, index: int, progress: dict) -> None:
        """Mark a shard finished: `progress` holds the run's fingerprint, the shard record and its tallies."""
        atomic_write_json(self.progress_path(split, index), progress)

    def read_progress(self, split: str, index: int) -> dict:
        return json.loads(self.progress_path(split, index).read_text())

    def is_done(self, split: str, index: int, name: str, fingerprint: str) -> bool:
        """A shard is finished when its progress record belongs to this run and the file matches its checksum."""
        if not self.progress_path(split, index).exists():
            return False
        try:
            progress = self.read_progress(split, index)
            record = ShardRecord.model_validate(progress["record"])
            done = progress["fingerprint"] == fingerprint and record.name == name
            if done:
                ShardSource(self.path).fetch(record, "checksum")
        except (ValueError, KeyError, OSError, AdvpipeError):
            done = False
        if not done:
            log.warning("shard %s: unfinished or changed; it will be recomputed", name)
        return done

    # publishing -------------------------------------------------------------------------------

    def publish(self, manifest: Manifest) -> None:
        """Write the card (README.md) and then the manifest, the last file of a store; then remove the run's state."""
        write_card(self.path, manifest)
        write_manifest(self.path, manifest)
        fault_point("after-manifest")
        self.cleanup()

    def cleanup(self) -> None:
        """Remove run state once the manifest is published (and stale temp files of killed writers)."""
        shutil.rmtree(self.path / PROGRESS_DIR, ignore_errors=True)
        for name in (MARKER, PREVIOUS):
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
        for stale in self.path.rglob(".tmp-*"):
            with contextlib.suppress(OSError):
                stale.unlink()


def check_target(path: str | os.PathLike, protect: Sequence[str | os.PathLike] = ()) -> None:
    """Refuse a store path whose writing or replacing could destroy what is not a store.

    The working directory, the home directory, the root and any directory holding one of them
    are never a store; nor are the protected paths (what the store is made from: a conversion's
    source store, generation's source data), nor anything around or inside them.
    """
    where = Path(path).expanduser().resolve()
    for name, place in _precious():
        if where == place or where in place.parents:
            raise StoreError(f"{path}: is {name}{'' if where == place else ' or a directory holding it'}; a store "
                             "needs a directory of its own (a new or empty one, e.g. a 'store' folder inside it)")
    for source in protect:
        source_dir = Path(source).expanduser().resolve()
        relation = ("is" if where == source_dir else "holds" if where in source_dir.parents else
                    "is inside" if source_dir in where.parents else None)
        if relation:
            raise StoreError(f"{path}: {relation} the source {source}; write the store to a directory outside "
                             "it (replacing the store must never delete its source)")


def refuse_foreign(path: Path) -> None:
    """Refuse a path that is not a directory advpipe may write: one that is empty, absent, a store, or an
    interrupted generation."""
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


def write_manifest(store_dir: Path, manifest: Manifest) -> None:
    """Publish a store: the manifest is the last file written."""
    text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True, allow_nan=False) + "\n"
    with atomic_path(Path(store_dir) / MANIFEST_NAME) as tmp:
        tmp.write_text(text)
        fault_point("manifest-write")
