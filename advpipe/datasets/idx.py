"""MNIST and Fashion-MNIST from their IDX files, raw or gzipped, parsed here (no download library).

IDX layout: a big-endian magic 0x0000TTNN (TT = 0x08 for unsigned bytes, NN = the
number of dimensions), then NN big-endian uint32 sizes, then the bytes row-major.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from advpipe.config import SourceConfig
from advpipe.datasets.base import Part, RawSource, check_size, source_path
from advpipe.errors import DataError

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASS_NAMES = {
    "mnist": tuple(str(digit) for digit in range(10)),
    "fashion_mnist": (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
}  # fmt: skip


def read(config: SourceConfig) -> RawSource:
    """The predefined train (60k) and test (10k) splits from the four IDX files in source.path."""
    directory = source_path(config, "dir")
    parts = {split: _read_pair(directory, *names) for split, names in FILES.items()}
    return RawSource(class_names=CLASS_NAMES[config.kind], origin=str(directory), **parts)


def _read_pair(directory: Path, images_name: str, labels_name: str) -> Part:
    images_path = find_file(directory, images_name)
    labels_path = find_file(directory, labels_name)
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
            "labels; both files must come from the same release"
        )
    return Part(images[..., None], labels.astype(np.int64), str(labels_path))


def find_file(directory: Path, name: str) -> Path:
    """`name` or `name.gz` in `directory` (the raw file wins if both are there)."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{directory / name}: not found (nor {name}.gz); source.path must hold the four IDX "
        f"files {', '.join(n for pair in FILES.values() for n in pair)}, raw or .gz"
    )


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The array of an IDX file, raw or gzipped, reading no more than its header promises (plus one byte).

    The header is checked (magic, and the size it implies against MAX_SOURCE_BYTES) before the data is
    read, so a gzip bomb or a header claiming terabytes is refused after a few bytes, not after the
    whole file has been decompressed into memory.
    """
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as handle:
            head = _read_up_to(handle, 4 + 4 * (magic & 0xFF))
            dims = parse_header(head, path, magic)
            size = math.prod(dims)
            data = _read_up_to(handle, size + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({exc}); the file is damaged, download it again") from exc
    if len(data) != size:
        problem = "truncated" if len(data) < size else "longer than its header says"
        shown = f"{len(data)}" if len(data) <= size else f"more than {size}"
        raise DataError(f"{path}: {problem}: {shown} data bytes, the header {dims} promises {size}; "
                        "download it again")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def parse_header(head: bytes, path: Path, magic: int) -> tuple[int, ...]:
    """The dimensions an IDX header declares, after checking its magic and the size they imply."""
    ndim = magic & 0xFF
    what = "images" if magic == IMAGES_MAGIC else "labels"
    if len(head) >= 4 and (found := int.from_bytes(head[:4], "big")) != magic:
        hint = " (it looks gzipped: give it a .gz suffix)" if head[:2] == b"\x1f\x8b" else ""
        raise DataError(
            f"{path}: IDX magic is 0x{found:08x}, expected 0x{magic:08x} for {what}{hint}; "
            "is this the right file?"
        )
    if len(head) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header ({len(head)} bytes); download it again")
    dims = struct.unpack(f">{ndim}I", head[4:])
    check_size(math.prod(dims), path, f"its header declares {what} of shape {dims}")
    return dims


def _read_up_to(handle: BinaryIO, size: int) -> bytes:
    """Up to `size` bytes (fewer only at the end of the file): one read may return less for gzip."""
    chunks, left = [], size
    while left > 0:
        chunk = handle.read(min(left, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
