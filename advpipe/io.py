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


#: what every temporary file's name begins with (atomic_path, check_writable's probe)
TEMP_PREFIX = ".tmp-"
#: the random characters mkstemp and NamedTemporaryFile add to a temporary name
TEMP_RANDOM = 8
#: NAME_MAX and PATH_MAX where the file system does not say (Linux's values)
NAME_MAX, PATH_MAX = 255, 4096


def temp_name(name: str) -> str:
    """The name atomic_path gives the temporary file of `name` (a path relative to some directory)."""
    folder, _, base = name.rpartition("/")
    return f"{folder}/" * bool(folder) + f"{TEMP_PREFIX}{base}.{'x' * TEMP_RANDOM}"


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds.

    The temp name starts with '.tmp-' so that no reader mistakes it for a finished file,
    and it lives in the same directory so that the rename is atomic.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{target.name}.", suffix=suffix, dir=target.parent)
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
        with tempfile.NamedTemporaryFile(prefix=PROBE_PREFIX, dir=directory):
            pass
    except OSError as exc:
        raise error(f"{subject or directory}: cannot write {what} here ({exc.strerror or exc}); {advice}") from None


PROBE_PREFIX = f"{TEMP_PREFIX}write-probe-"
#: the name of check_writable's probe file, at its longest
PROBE_NAME = PROBE_PREFIX + "x" * TEMP_RANDOM


def path_limits(directory: str | os.PathLike) -> tuple[int, int]:
    """(NAME_MAX, PATH_MAX) in bytes of the file system that holds `directory`, or would once it is created
    (asked of its nearest existing ancestor); Linux's 255 and 4096 where the system does not say."""
    place = Path(os.path.abspath(directory))
    existing = next((p for p in (place, *place.parents) if os.path.isdir(p)), Path(place.anchor or "/"))
    limits = []
    for key, default in (("PC_NAME_MAX", NAME_MAX), ("PC_PATH_MAX", PATH_MAX)):
        try:
            value = os.pathconf(existing, key)
        except (OSError, ValueError, AttributeError):  # no pathconf (Windows), or no such limit here
            value = -1
        limits.append(value if value > 0 else default)
    return limits[0], limits[1]


def check_path_lengths(directory: str | os.PathLike, names: list[str], error: type[Exception], what: str,
                       advice: str) -> None:
    """Fail before anything is created when `directory`, or a file to be written in it (`names`, relative
    paths, temporary names included), has a name longer than its file system allows (NAME_MAX bytes) or a
    path longer than PATH_MAX: the system would refuse it only once some directories exist, or mid-run.

    The path is measured as written and as resolved (symbolic links followed), the longer counting.
    """
    text = os.fspath(directory)
    absolute = os.path.abspath(os.path.expanduser(text))
    name_max, path_max = path_limits(absolute)
    shown = _shown_path(text)
    for part in Path(absolute).parts[1:]:
        if len(os.fsencode(part)) > name_max:
            raise error(f"{shown}: the name '{_shown_path(part, 40)}' is {len(os.fsencode(part))} bytes, more than "
                        f"the {name_max} one name may have on this file system; {advice}")
    for name in names:
        for part in name.split("/"):
            if len(os.fsencode(part)) > name_max:
                raise error(f"{shown}: {what} would hold a file named '{_shown_path(part, 40)}', "
                            f"{len(os.fsencode(part))} bytes, more than the {name_max} one name may have on this "
                            f"file system; {advice}")
    resolved = os.path.realpath(absolute)
    base = max(len(os.fsencode(absolute)), len(os.fsencode(resolved)))
    longest = max(names, key=lambda name: len(os.fsencode(name)), default="")
    total = base + 1 + len(os.fsencode(longest))
    if total >= path_max:  # PATH_MAX counts the terminating NUL
        room = path_max - 2 - len(os.fsencode(longest))
        raise error(f"{shown}: {what} would hold paths of {total} bytes ({longest} in it), more than the "
                    f"{path_max - 1} this system allows; {advice}: at most {room} bytes as an absolute path, this "
                    f"one is {base}")


def _shown_path(text: str, limit: int = 120) -> str:
    """A path for a message: whole when short, else its beginning and its end (where the difference often is)."""
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]}...{text[-half:]} ({len(text)} characters)"
