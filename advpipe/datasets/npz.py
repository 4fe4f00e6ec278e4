"""Arrays saved with numpy.savez: x and y, optionally x_test/y_test and class_names.

Loaded with allow_pickle=False, so the file cannot run code. Images may be uint8
or float in [0, 1] (scaled to 0..255 and rounded); anything else is refused
rather than guessed, since a wrong guess silently trains on garbage.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from advpipe.config import SourceConfig
from advpipe.datasets.base import Part, RawSource, as_labels, check_size, source_path
from advpipe.errors import DataError, shorten, shown

KEYS = ("x", "y", "x_test", "y_test", "class_names")


def read(config: SourceConfig) -> RawSource:
    """The x_test/y_test split if present, else one pool; class names '0'.. unless given."""
    path = source_path(config, "file")
    arrays = load_arrays(path)
    parts = {"train": _part(arrays, path, "x", "y")}
    if "x_test" in arrays or "y_test" in arrays:
        parts["test"] = _part(arrays, path, "x_test", "y_test")
    if "class_names" in arrays:
        names = class_names(arrays["class_names"], path)
    else:
        top = max([0, *(int(part.labels.max()) for part in parts.values() if part.labels.size)])
        names = tuple(str(label) for label in range(top + 1))
    if "test" in parts:
        return RawSource(names, str(path), train=parts["train"], test=parts["test"])
    return RawSource(names, str(path), pool=parts["train"])


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the .npz, each refused from its header alone when it would decode past MAX_SOURCE_BYTES.

    Members are read by their .npy header (shape and dtype), never by the sizes the zip directory declares,
    and no more bytes than the header implies are decompressed, so a zip bomb costs what its header says.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            _check_keys(path, list(members))
            arrays = {}
            for key, info in members.items():
                with archive.open(info) as handle:
                    arrays[key] = read_npy(handle, f"{path}: '{key}'")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError) as exc:
        raise DataError(
            f"{path}: cannot load it as .npz ({shorten(str(exc))}); save it with np.savez(path, x=..., y=...) "
            "and no object arrays"
        ) from exc
    return arrays


def _check_keys(path: Path, keys: list[str]) -> None:
    unknown = sorted(set(keys) - set(KEYS))
    missing = [key for key in ("x", "y") if key not in keys]
    if unknown or missing:
        raise DataError(
            f"{path}: arrays {shown(sorted(keys))}; expected x and y, optionally x_test, y_test and "
            f"class_names (missing {missing}, unexpected {shown(unknown)})"
        )


def read_npy(handle: BinaryIO, where: str) -> np.ndarray:
    """One .npy stream: header checked (no objects, size within MAX_SOURCE_BYTES), then exactly its data."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    else:
        raise DataError(f"{where}: .npy format version {version} is not supported; save it with np.savez")
    if dtype.hasobject:
        raise DataError(f"{where}: holds Python objects (dtype {dtype}); loading them could run code, save plain "
                        "numeric or string arrays")
    count = math.prod(shape)
    check_size(count * dtype.itemsize, where, f"its header declares a {dtype} array of shape {shown(shape)}")
    array = np.empty(count, dtype=dtype)
    view = memoryview(array).cast("B") if array.nbytes else memoryview(b"")
    filled = 0
    while filled < len(view):
        read = handle.readinto(view[filled:])
        if not read:
            raise DataError(f"{where}: truncated: {filled} of the {len(view)} data bytes its header promises; "
                            "save the file again")
        filled += read
    return array.reshape(shape, order="F" if fortran else "C")


def images(array: np.ndarray, where: str) -> np.ndarray:
    """uint8 (N, H, W, C) from (N, H, W) or (N, H, W, C) uint8, or float in [0, 1]."""
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise DataError(
            f"{where} has shape {array.shape}; expected (N, H, W) or (N, H, W, C) with C 1 or 3 "
            "(channels last: use np.moveaxis(x, 1, -1) for (N, C, H, W))"
        )
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{where} has dtype {array.dtype}; expected uint8 0..255 or float in [0, 1]")
    if not np.isfinite(array).all():
        raise DataError(f"{where} contains NaN or infinite values; clean the data before saving")
    if array.size and (array.min() < 0 or array.max() > 1):
        raise DataError(
            f"{where} is {array.dtype} in [{array.min()}, {array.max()}]; float images must lie "
            "in [0, 1] (or save uint8 0..255)"
        )
    return np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)


def class_names(array: np.ndarray, path: Path) -> tuple[str, ...]:
    if array.ndim != 1 or array.dtype.kind not in "US":
        raise DataError(f"{path}: 'class_names' must be a 1-d array of strings, got {array.dtype} {array.shape}")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in array.tolist())


def _part(arrays: dict[str, np.ndarray], path: Path, x_key: str, y_key: str) -> Part:
    if x_key not in arrays or y_key not in arrays:
        raise DataError(f"{path}: '{x_key}' and '{y_key}' must be given together")
    x = images(arrays[x_key], f"{path}: '{x_key}'")
    y = as_labels(arrays[y_key], f"{path}: '{y_key}'")
    return Part(x, y, f"{path}: '{x_key}'/'{y_key}'")
