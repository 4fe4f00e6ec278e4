"""CIFAR-10 and CIFAR-100, python version, from the extracted folder or the .tar.gz itself.

The batches are pickles, so they are read with the restricted unpickler of
`safe_pickle` (never pickle.load). The archive is read member by member in one
pass without extracting anything, and refused outright if any member is a link,
a special file, or has a path that could escape a folder (absolute or '..').
"""

from __future__ import annotations

import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from advpipe.config import SourceConfig
from advpipe.datasets.base import Part, RawSource, as_labels, check_part, concat_parts, source_path
from advpipe.datasets.safe_pickle import safe_loads
from advpipe.errors import DataError, shorten, shown

SIDE = 32
ROW = 3 * SIDE * SIDE  # one image, channel-first: 1024 red, 1024 green, 1024 blue
#: the largest batch file read (CIFAR-100's `train` is 155 MB, a CIFAR-10 batch 31 MB)
MAX_BATCH_BYTES = 512 << 20
#: members an archive may list (the official ones have 8); tarfile keeps every member's header in memory
MAX_MEMBERS = 1000
#: bytes all members of an archive may declare together (the official ones unpack to 178 MB): skipping a
#: member still decompresses it, so a small .tar.gz of huge members would take minutes to scan
MAX_ARCHIVE_BYTES = 2 << 30


@dataclass(frozen=True)
class Layout:
    """Where one CIFAR variant keeps its batches and which keys it uses."""

    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    labels_key: str
    names_key: str

    def members(self) -> tuple[str, ...]:
        return (*self.train, *self.test, self.meta)


LAYOUTS = {
    "cifar10": Layout(
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        meta="batches.meta",
        labels_key="labels",
        names_key="label_names",
    ),
    "cifar100": Layout(
        folder="cifar-100-python",
        train=("train",),
        test=("test",),
        meta="meta",
        labels_key="fine_labels",
        names_key="fine_label_names",
    ),
}

Blobs = dict[str, tuple[str, bytes]]  # member name -> (origin for messages, bytes)


def read(config: SourceConfig) -> RawSource:
    """The predefined train and test splits; CIFAR-100 uses its 100 fine labels."""
    layout = LAYOUTS[config.kind]
    path = source_path(config, "any")
    blobs = read_archive(path, layout) if path.is_file() else read_folder(path, layout)
    class_names = _class_names(*blobs[layout.meta], layout.names_key)

    def split(members: tuple[str, ...]) -> Part:
        batches = [_batch(*blobs[name], layout.labels_key, len(class_names)) for name in members]
        return concat_parts(batches, str(path))

    return RawSource(class_names, str(path), train=split(layout.train), test=split(layout.test))


def read_folder(path: Path, layout: Layout) -> Blobs:
    """The batch files from `path` or from its `cifar-10-batches-py`-style subfolder."""
    folder = path / layout.folder if (path / layout.folder).is_dir() else path
    blobs = {}
    for name in layout.members():
        file = folder / name
        if not file.is_file():
            raise DataError(
                f"{file}: not found; source.path must be the python-version {layout.folder} "
                "folder (or its parent, or the downloaded .tar.gz)"
            )
        check_batch_size(file.stat().st_size, str(file))
        blobs[name] = (str(file), file.read_bytes())
    return blobs


def check_batch_size(size: int, origin: str) -> None:
    """Refuse, before reading it, a batch larger than any CIFAR batch is."""
    if size > MAX_BATCH_BYTES:
        raise DataError(f"{origin}: {size / 2**20:.0f} MiB, larger than the {MAX_BATCH_BYTES >> 20} MiB any "
                        "CIFAR batch takes; is this the python-version CIFAR?")


def read_archive(archive: Path, layout: Layout) -> Blobs:
    """The batch files from a tar archive, read in one pass; nothing is written to disk."""
    blobs: Blobs = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            declared = 0
            for count, info in enumerate(tar, 1):
                check_member(archive, info)
                declared += info.size
                if count > MAX_MEMBERS or declared > MAX_ARCHIVE_BYTES:
                    raise DataError(f"{archive}: more than {MAX_MEMBERS} members or {MAX_ARCHIVE_BYTES >> 30} GiB "
                                    "unpacked; a CIFAR archive holds 8 members and 178 MB, is this the right file?")
                name = _wanted(info.name, layout)
                if name is not None and info.isfile():
                    check_batch_size(info.size, f"{archive}:{info.name}")
                    handle = tar.extractfile(info)
                    assert handle is not None  # regular files always have one
                    blobs[name] = (f"{archive}:{info.name}", handle.read())
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{archive}: cannot read it as a tar archive ({exc}); download it again") from exc
    missing = [name for name in layout.members() if name not in blobs]
    if missing:
        raise DataError(
            f"{archive}: no {', '.join(f'{layout.folder}/{name}' for name in missing)} in the "
            "archive; is it the python version of this CIFAR?"
        )
    return blobs


def check_member(archive: Path, info: tarfile.TarInfo) -> None:
    """Refuse links, special files, and paths that are absolute or climb out with '..'."""
    path = PurePosixPath(info.name)
    if path.is_absolute() or info.name.startswith("\\") or ".." in path.parts:
        problem = "has an absolute or '..' path"
    elif info.issym() or info.islnk():
        problem = "is a link"
    elif not (info.isfile() or info.isdir()):
        problem = "is not a regular file or folder"
    else:
        return
    raise DataError(f"{archive}: member '{shorten(info.name)}' {problem}; refusing the archive")


def _wanted(member: str, layout: Layout) -> str | None:
    """The layout name of a member stored as `<folder>/<name>` or plain `<name>`, else None."""
    parts = [part for part in PurePosixPath(member).parts if part != "."]
    if (len(parts) == 2 and parts[0] == layout.folder) or len(parts) == 1:
        return parts[-1] if parts[-1] in layout.members() else None
    return None


def _batch(origin: str, data: bytes, labels_key: str, num_classes: int) -> Part:
    """One batch: rows of 3072 channel-first bytes become (N, 32, 32, 3) images."""
    batch = safe_loads(data, origin)
    pixels = _field(batch, "data", origin)
    if not (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 2
            and pixels.shape[1] == ROW):  # fmt: skip
        found = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise DataError(f"{origin}: 'data' must be a uint8 array of shape (N, {ROW}), got {found}")
    images = np.ascontiguousarray(pixels.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1))
    part = Part(images, as_labels(_field(batch, labels_key, origin), origin), origin)
    check_part(part, num_classes)
    return part


def _class_names(origin: str, data: bytes, key: str) -> tuple[str, ...]:
    names = _field(safe_loads(data, origin), key, origin)
    if not isinstance(names, list):
        raise DataError(f"{origin}: '{key}' must be a list of names, got {type(names).__name__}")
    return tuple(_text(name, origin) for name in names)


def _field(batch: Any, key: str, origin: str) -> Any:
    """batch[key], accepting the bytes keys of the official files and str keys alike."""
    if not isinstance(batch, dict):
        raise DataError(f"{origin}: expected a pickled dict, got {type(batch).__name__}")
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in batch)
    raise DataError(f"{origin}: no '{key}' entry (keys: {shown(keys)}); is this the python-version CIFAR?")


def _text(value: Any, origin: str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    raise DataError(f"{origin}: class names must be strings, got {type(value).__name__}")
