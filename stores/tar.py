"""The one tar parser of advpipe: member by member, or in bulk over records laid out at a fixed stride.

Only what docs/FORMAT.md section 6 allows is accepted: regular files (type `0` or NUL) with
safe names, USTAR headers, an end-of-archive block. Member-by-member parsing (`iter_members`)
reads any such tar. The bulk helpers decode one header field of many members at once, from
a (count, 512) view of their header blocks, and return None when any member is written in
another way, so a caller can fall back to `iter_members`.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np

from advpipe.errors import IntegrityError, shown

BLOCK = 512
REGULAR = (b"0", b"\0")
REGULAR_TYPES = (ord("0"), 0)  # the same type flags as byte values, for the bulk checks
NAME, SIZE, TYPE, PREFIX = slice(0, 100), slice(124, 136), 156, slice(345, 500)  # USTAR header fields


def blocks(size: int) -> int:
    """Tar blocks a payload of `size` bytes occupies."""
    return (size + BLOCK - 1) // BLOCK


def iter_members(data: memoryview | bytes, shard: str) -> Iterator[tuple[str, memoryview]]:
    """Yield (name, payload) for each member; refuse links, devices, absolute or '..' names."""
    view = memoryview(data)
    for name, start, size in iter_spans(view, shard):
        yield name, view[start : start + size]


def iter_spans(data: memoryview | bytes, shard: str) -> Iterator[tuple[str, int, int]]:
    """Yield (name, payload offset, payload size) for each member, with iter_members' checks."""
    view = memoryview(data)
    position, end = 0, len(view)
    while position + BLOCK <= end:
        header = bytes(view[position : position + BLOCK])
        if header == bytes(BLOCK):
            return
        name = header[NAME].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = header[PREFIX].split(b"\0", 1)[0].decode("utf-8", "replace")
        name = f"{prefix}/{name}" if prefix else name
        size = octal_size(header[SIZE], shard, position)
        check_member(shard, name, header[TYPE : TYPE + 1])
        start = position + BLOCK
        if start + size > end:
            raise IntegrityError(f"shard {shard}: truncated (member {name} runs past the end of the file)")
        yield name, start, size
        position = start + blocks(size) * BLOCK
    raise IntegrityError(f"shard {shard}: truncated tar (no end-of-archive marker)")


def octal_size(field: bytes, shard: str, position: int) -> int:
    """A size field: octal digits only, NUL/space padded (int() would also take '-1', '+7', '0o7', '1_0')."""
    digits = field.strip(b"\0 ")
    if digits.strip(b"01234567"):  # anything but octal digits between the padding
        raise IntegrityError(f"shard {shard}: corrupt tar header at byte {position} (size field "
                             f"{shown(field)} is not an octal number)")
    return int(digits or b"0", 8)


def check_member(shard: str, name: str, kind: bytes) -> None:
    if kind not in REGULAR:
        raise IntegrityError(f"shard {shard}: member '{name}' is not a regular file (links and devices are refused)")
    if name.startswith("/") or ".." in name.split("/"):  # PurePosixPath's test, without its ~2 us per member
        raise IntegrityError(f"shard {shard}: member name '{name}' points outside the archive; refused")


# Bulk decoding: records at a fixed stride ----------------------------------------------------------


def strided(data: Any, count: int, stride: int, offset: int, shape: tuple[int, ...],
            dtype: Any = np.uint8) -> np.ndarray:
    """(count, *shape) read-only view of the bytes at `offset` within each of `count` records of `stride` bytes."""
    dtype = np.dtype(dtype)
    inner = np.empty(shape, dtype).strides
    return np.ndarray((count, *shape), dtype, buffer=data, offset=offset, strides=(stride, *inner))


def member_keys(headers: np.ndarray, suffix: str, digits: int) -> np.ndarray | None:
    """Keys from names '<`digits` decimal digits>.<suffix>' (NUL-padded, no prefix, regular files), or None."""
    tail = np.zeros(100 - digits, np.uint8)
    tail[:len(suffix) + 1] = np.frombuffer(f".{suffix}".encode(), np.uint8)
    values = headers[:, :digits].astype(np.int64) - ord("0")
    if not (((values >= 0) & (values <= 9)).all() and (headers[:, digits:100] == tail).all()
            and np.isin(headers[:, TYPE], REGULAR_TYPES).all() and not headers[:, PREFIX].any()):
        return None
    return values @ 10 ** np.arange(digits - 1, -1, -1)


def octal_sizes(headers: np.ndarray) -> np.ndarray | None:
    """Size fields of 11 octal digits and a NUL or space, or None if any is written otherwise."""
    fields = headers[:, SIZE]
    digits = fields[:, :11].astype(np.int64) - ord("0")
    if not (((digits >= 0) & (digits <= 7)).all() and np.isin(fields[:, 11], (0, ord(" "))).all()):
        return None
    return digits @ 8 ** np.arange(10, -1, -1)


def decimals(payloads: np.ndarray, sizes: np.ndarray) -> np.ndarray | None:
    """Non-negative ASCII decimals of the given lengths (payloads of one block at most), or None."""
    width = int(sizes.max())
    if width > 18:
        return None
    digits = payloads[:, :width].astype(np.int64) - ord("0")
    inside = np.arange(width) < sizes[:, None]
    if not (((digits >= 0) & (digits <= 9)) | ~inside).all():
        return None
    powers = 10 ** np.maximum(sizes[:, None] - 1 - np.arange(width), 0)
    return (np.where(inside, digits, 0) * powers).sum(axis=1)


def npy_header(shape: tuple[int, ...], dtype: Any) -> bytes:
    """The .npy (version 1.0) header numpy writes for a C-ordered array of this shape and dtype."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()
