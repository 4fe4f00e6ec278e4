"""Writing a store directory: claim it, put shards and progress records in place, publish the manifest last.

Every file is written to a `.tmp-*` name beside its target, flushed and renamed, so a file
with a final name is always complete; the manifest is renamed into place last, so a
directory is a store exactly when its manifest exists (docs/FORMAT.md section 9). Killing a
writer at any point leaves either a finished store or a directory the next run resumes.
Generation (advpipe.pipeline) decides what to compute and calls this module for every write.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

from advpipe.errors import AdvpipeError, StoreError
from advpipe.faults import fault_point
from advpipe.io import atomic_path, atomic_write_json, check_writable, sha256_file
from advpipe.provenance import library_versions
from advpipe.stores.backends import backend
from advpipe.stores.manifest import MANIFEST_NAME, Manifest, ShardRecord, read_manifest
from advpipe.stores.shard import Layout, ShardData
from advpipe.stores.source import ShardSource

log = logging.getLogger(__name__)

MARKER = ".generation.json"
PREVIOUS = ".previous-manifest.json"
PROGRESS_DIR = ".progress"


class StoreWriter:
    """The one writer of a store directory (a local path: stores are written locally, read from anywhere)."""

    def __init__(self, path: str | os.PathLike, backend_name: str, compression: str | None = None,
                 layout: Layout | None = None) -> None:
        self.path = Path(path)
        self.backend = backend(backend_name)
        self.compression = compression if self.backend.compressible else None
        self.layout = layout

    # the directory ------------------------------------------------------------------------------

    def check_writable(self) -> None:
        check_writable(self.path, StoreError, "the store", "choose a writable store.path")

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

    def prepare(self, overwrite: bool) -> None:
        """For a store written in one go: refuse to write over a finished store unless asked."""
        if (self.path / MANIFEST_NAME).exists():
            if not overwrite:
                raise StoreError(f"{self.path}: a store already exists here; choose another path, or --force to "
                                 "replace it (overwrite=True in Python)")
            (self.path / MANIFEST_NAME).unlink()  # never leave a stale manifest behind
        if self.path.exists() and overwrite:
            shutil.rmtree(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot write a store here ({exc.strerror or exc}); "
                             "choose a writable path") from None

    def claim(self, fingerprint: str, force: bool, previous: dict | None) -> dict | None:
        """Mark the directory as being generated with this fingerprint; refuse to mix two runs' shards.

        Returns the store being extended, or None once `force` has discarded it.
        """
        marker = self.path / MARKER
        if marker.exists():
            claimed = json.loads(marker.read_text()).get("fingerprint")
            if claimed != fingerprint:
                if not force:
                    raise StoreError(f"{self.path}: an interrupted generation with a different configuration "
                                     "left shards here; re-run it with its config, or --force to discard them")
                self.wipe()
                previous = None
        elif any(self.path.iterdir()) and previous is None:
            leftovers = [p.name for p in self.path.iterdir() if not p.name.startswith(".tmp-")]
            if leftovers and not force:
                raise StoreError(f"{self.path}: directory is not empty and is not a store "
                                 f"({', '.join(leftovers[:3])}); choose an empty store.path, or --force to clear it")
            if leftovers:
                self.wipe()
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
        for child in self.path.iterdir():
            if child.is_dir():
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
        """Write the manifest, the last file of a store, then remove the run's state."""
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


def write_manifest(store_dir: Path, manifest: Manifest) -> None:
    """Publish a store: the manifest is the last file written."""
    text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True, allow_nan=False) + "\n"
    with atomic_path(Path(store_dir) / MANIFEST_NAME) as tmp:
        tmp.write_text(text)
        fault_point("manifest-write")
