"""Copying whole stores to and from object storage: `publish` (upload) and `fetch` (download), both resumable.

A copy is a store exactly when its manifest is there, as for a store being generated, so
both copy the shards first, then the card (README.md), and the manifest last. Every object
is verified against the manifest's size and sha256 after it is written (an upload is read
back), so a copy with a manifest is a sound store. Re-running an interrupted transfer keeps
every object already in place that verifies and copies the rest.

Neither ever writes to its source. A target that holds a different store is refused unless
`force`; then its manifest is removed first, so no reader sees a half-replaced store.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from advpipe import urls
from advpipe.errors import IntegrityError, StoreError
from advpipe.io import (
    PROBE_NAME,
    atomic_path,
    atomic_write_bytes,
    check_path_lengths,
    check_writable,
    copy_hashing,
    sha256_file,
    temp_name,
)
from advpipe.stores.card import CARD_NAME, render_card
from advpipe.stores.manifest import MANIFEST_NAME, Manifest, ShardRecord, parse_manifest
from advpipe.stores.source import ShardSource

log = logging.getLogger(__name__)

BLOCK = 8 << 20


@dataclass
class TransferReport:
    """What a publish or fetch did: objects copied, objects already in place (verified), bytes copied."""

    source: str
    target: str
    copied: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    bytes: int = 0

    def summary(self, verb: str) -> str:
        return (f"{self.source} -> {self.target}: {verb} {len(self.copied)} object(s) ({self.bytes / 2**20:.1f} MiB), "
                f"{len(self.kept)} already in place; every object verified")


# publishing ----------------------------------------------------------------------------------------


def publish(store: str | os.PathLike, url: str, *, storage_options: dict[str, Any] | None = None,
            target_options: dict[str, Any] | None = None, force: bool = False, workers: int = 4,
            progress: bool = False) -> TransferReport:
    """Upload the finished store at `store` (a directory or URL) to `url`; returns what was copied.

    Each shard is checked against the manifest before it is sent and read back after; the card
    (the store's README.md, or one rendered from the manifest) follows, then the manifest.
    """
    with _storage_errors("publish to", urls.redact(url)):
        return _publish(store, url, storage_options, target_options, force, workers, progress)


def _publish(store: str | os.PathLike, url: str, storage_options: dict[str, Any] | None,
             target_options: dict[str, Any] | None, force: bool, workers: int, progress: bool) -> TransferReport:
    if urls.is_read_only(url):
        raise StoreError(f"{urls.redact(url)}: cannot publish to an {urls.protocol(url)}:// location (read-only); "
                         "publish to object storage (s3://, gs://, az://) or a directory")
    source = ShardSource(store, storage_options, verify="checksum")
    manifest_bytes, manifest = _read_manifest(source)
    fs, root = urls.filesystem(url, target_options)
    report = TransferReport(str(source.display), urls.redact(url))
    _claim_target(_remote_manifest(fs, root), manifest_bytes, manifest, urls.redact(url), force,
                  lambda: fs.rm_file(f"{root}/{MANIFEST_NAME}"))

    def one(record: ShardRecord) -> bool:
        """Put one shard in place; False when a verified copy was already there."""
        target = f"{root}/{record.name}"
        if _remote_matches(fs, target, record.bytes, record.sha256):
            return False
        local = source.local_path(record)
        if local is not None:
            _check_local(local, record, source.shown)
            fs.put_file(str(local), target)
        else:
            fs.pipe_file(target, bytes(source.fetch(record, "checksum")))
        if not _remote_matches(fs, target, record.bytes, record.sha256):
            raise IntegrityError(f"shard {record.name}: the object written to {report.target} does not match the "
                                 "manifest when read back; re-run publish to retry it")
        return True

    _each(one, _records(manifest), workers, progress, "publish", report)
    card = _source_card(source, manifest)
    for name, data in ((CARD_NAME, card), (MANIFEST_NAME, manifest_bytes)):  # the manifest last
        target = f"{root}/{name}"
        digest = hashlib.sha256(data).hexdigest()
        if _remote_matches(fs, target, len(data), digest):
            report.kept.append(name)
            continue
        fs.pipe_file(target, data)
        if not _remote_matches(fs, target, len(data), digest):
            raise IntegrityError(f"{name}: the object written to {report.target} does not match when read back; "
                                 "re-run publish to retry it")
        report.copied.append(name)
        report.bytes += len(data)
    log.info("%s", report.summary("published"))
    return report


def _check_local(path: Path, record: ShardRecord, shown: str) -> None:
    try:
        digest = sha256_file(path)
    except FileNotFoundError:
        raise IntegrityError(f"shard {record.name}: missing from {shown}") from None
    if digest != record.sha256:
        raise IntegrityError(f"shard {record.name}: sha256 does not match the manifest (the file in {shown} is "
                             "corrupt); nothing corrupt is published: restore it, or regenerate the store")


def _source_card(source: ShardSource, manifest: Manifest) -> bytes:
    """The store's own card if it has one (it may have been edited), else one rendered from the manifest."""
    fs, root = source.filesystem()
    with contextlib.suppress(FileNotFoundError):
        return fs.cat_file(f"{root}/{CARD_NAME}")
    return render_card(manifest).encode()


def _remote_manifest(fs, root: str) -> bytes | None:
    with contextlib.suppress(FileNotFoundError):
        _invalidate(fs, f"{root}/{MANIFEST_NAME}")
        return fs.cat_file(f"{root}/{MANIFEST_NAME}")
    return None


def _remote_matches(fs, path: str, size: int, sha256: str) -> bool:
    """True when the object at `path` exists with this size and sha256 (read back in full)."""
    _invalidate(fs, path)
    try:
        if fs.size(path) != size:
            return False
        with fs.open(path, "rb") as handle:
            return copy_hashing(handle, block=BLOCK)[0] == sha256
    except FileNotFoundError:
        return False


def _invalidate(fs, path: str) -> None:
    with contextlib.suppress(Exception):  # listings cached by s3fs and friends would hide what was just written
        fs.invalidate_cache(path)


# fetching ------------------------------------------------------------------------------------------


def fetch(url: str | os.PathLike, directory: str | os.PathLike, *, storage_options: dict[str, Any] | None = None,
          force: bool = False, workers: int = 4, progress: bool = False) -> TransferReport:
    """Download the store at `url` into `directory`, verifying every shard as it arrives; returns what was copied."""
    with _storage_errors("fetch", urls.redact(url)):
        return _fetch(url, directory, storage_options, force, workers, progress)


def _fetch(url: str | os.PathLike, directory: str | os.PathLike, storage_options: dict[str, Any] | None, force: bool,
           workers: int, progress: bool) -> TransferReport:
    source = ShardSource(url, storage_options, verify="checksum")
    manifest_bytes, manifest = _read_manifest(source)
    directory = Path(directory)
    names = [PROBE_NAME, *(n for r in _records(manifest) for n in (r.name, temp_name(r.name))),
             *(n for name in (CARD_NAME, MANIFEST_NAME) for n in (name, temp_name(name)))]
    check_path_lengths(directory, names, StoreError, "the fetched store", "choose a shorter directory")
    check_writable(directory, StoreError, "a fetched store", "choose a writable directory")
    report = TransferReport(source.shown, str(directory))
    existing = (directory / MANIFEST_NAME).read_bytes() if (directory / MANIFEST_NAME).is_file() else None
    _claim_target(existing, manifest_bytes, manifest, str(directory), force,
                  lambda: (directory / MANIFEST_NAME).unlink())
    fs, root = source.filesystem()

    def one(record: ShardRecord) -> bool:
        """Put one shard in place; False when a verified copy was already there."""
        path = directory / record.name
        if path.is_file() and path.stat().st_size == record.bytes and sha256_file(path) == record.sha256:
            return False
        with atomic_path(path) as tmp, _opened(fs, f"{root}/{record.name}", record, source.shown) as remote:
            digest, size = _copy(remote, tmp)
            if size != record.bytes or digest != record.sha256:
                raise IntegrityError(f"shard {record.name}: the object in {source.shown} does not match the manifest "
                                     f"({size} bytes, manifest says {record.bytes}; sha256 "
                                     f"{'matches' if digest == record.sha256 else 'differs'}): it is corrupt there")
        return True

    _each(one, _records(manifest), workers, progress, "fetch", report)
    card = _source_card(source, manifest)
    for name, data in ((CARD_NAME, card), (MANIFEST_NAME, manifest_bytes)):  # the manifest last
        path = directory / name
        if path.is_file() and path.read_bytes() == data:
            report.kept.append(name)
            continue
        atomic_write_bytes(path, data)
        report.copied.append(name)
        report.bytes += len(data)
    log.info("%s", report.summary("fetched"))
    return report


@contextlib.contextmanager
def _opened(fs, path: str, record: ShardRecord, shown: str):
    try:
        handle = fs.open(path, "rb")
    except FileNotFoundError:
        raise IntegrityError(f"shard {record.name}: missing from {shown}") from None
    except OSError as exc:
        raise StoreError(f"shard {record.name}: cannot be read from {shown} ({urls.redact(exc)})") from None
    with handle:
        yield handle


def _copy(remote: IO[bytes], target: Path) -> tuple[str, int]:
    with open(target, "wb") as out:
        return copy_hashing(remote, out, BLOCK)


# shared ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _storage_errors(verb: str, shown: str):
    """Storage failures (access denied, a lost connection, a full disk) as a StoreError saying what failed."""
    try:
        yield
    except OSError as exc:
        denied = isinstance(exc, PermissionError)
        raise StoreError(f"cannot {verb} {shown}: {urls.redact(exc) or type(exc).__name__}"
                         + ("; the credentials in use may not do this (check the provider's environment variables, "
                            "config files or profile)" if denied else "; re-run the same command to resume")) from None


def _read_manifest(source: ShardSource) -> tuple[bytes, Manifest]:
    """The manifest's exact bytes (copies are byte-identical) and its validated form."""
    source.manifest()  # a clear error when there is no finished store
    fs, root = source.filesystem()
    data = fs.cat_file(f"{root}/{MANIFEST_NAME}")
    return data, parse_manifest(data, f"{source.shown}/{MANIFEST_NAME}")


def _claim_target(existing: bytes | None, manifest_bytes: bytes, manifest: Manifest, shown: str, force: bool,
                  take_offline: Callable[[], None]) -> None:
    """Refuse a target holding another store unless `force`; then take its manifest away before any copying."""
    if existing is None or existing == manifest_bytes:
        return
    try:
        fingerprint = parse_manifest(existing, f"{shown}/{MANIFEST_NAME}").fingerprint
    except StoreError:
        fingerprint = "unreadable"
    if not force:
        raise StoreError(f"{shown}: already holds a different store (fingerprint {fingerprint[:16]}, this one "
                         f"{manifest.fingerprint[:16]}); pass --force to replace it, or choose another location")
    log.warning("%s: replacing the store there (fingerprint %s)", shown, fingerprint[:16])
    take_offline()


def _records(manifest: Manifest) -> list[ShardRecord]:
    return [record for split in manifest.splits.values() for record in split.shards]


def _each(function: Callable[[ShardRecord], bool], records: list[ShardRecord], workers: int, progress: bool,
          what: str, report: TransferReport) -> None:
    """Run `function` on every shard, `workers` at a time, into `report`; the first error is raised once all stop."""
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix=f"advpipe-{what}") as pool:
        futures = [pool.submit(function, record) for record in records]
        for future in tqdm(futures, desc=what, unit="shard", disable=not progress):
            future.exception()
    for record, future in zip(records, futures, strict=True):
        if future.result():
            report.copied.append(record.name)
            report.bytes += record.bytes
        else:
            report.kept.append(record.name)
