"""Small file-system helpers shared by every writer: atomic writes and checksums."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    with open(path, "rb") as handle:
        return copy_hashing(handle)[0]


def copy_hashing(source: IO[bytes], out: IO[bytes] | None = None, block: int = CHUNK) -> tuple[str, int]:
    """(hex sha256, size) of a stream read to its end, copied into `out` on the way when given.

    One pass over the bytes: a download is checked as it arrives, never read twice.
    """
    digest, size = hashlib.sha256(), 0
    while chunk := source.read(block):
        digest.update(chunk)
        if out is not None:
            out.write(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def sha256_json(value: Any) -> str:
    """Hex sha256 of a value's canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds.

    The temp name starts with '.tmp-' so that no reader mistakes it for a finished file,
    and it lives in the same directory so that the rename is atomic.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp's 0600 would keep a shared store private
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(target: str | os.PathLike, value: Any) -> None:
    atomic_write_bytes(target, (json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_writable(directory: str | os.PathLike, error: type[Exception], what: str, advice: str,
                   subject: str | os.PathLike | None = None) -> None:
    """Fail before any work, not after it, when `directory` cannot take a new file.

    Creates the directory if needed and writes and removes a probe file; the error names
    `subject` (default: the directory), what was to be written there and what to do.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".tmp-write-probe-", dir=directory):
            pass
    except OSError as exc:
        raise error(f"{subject or directory}: cannot write {what} here ({exc.strerror or exc}); {advice}") from None
