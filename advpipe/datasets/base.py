"""What every reader returns, and the checks applied to it whatever the format.

Readers only parse their format. Everything they return goes through the same
checks here, so that a bad label or an empty folder gets the same clear message
(naming the file and what to do) for MNIST, CIFAR, a folder of PNGs or an npz.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from advpipe.config import SourceConfig
from advpipe.errors import DataError, shown

#: the most bytes one array of a format loaded whole (IDX, CIFAR, npz) may take once decoded: CIFAR-100's training
#: images take 150 MB, MNIST's 47 MB; a header claiming more is refused before anything is allocated. Sources read
#: lazily (image folders, WebDataset) have no such cap: only the images asked for are ever decoded.
MAX_SOURCE_BYTES = 4 << 30
#: the most classes a source may name (ImageNet-21k has 21,841)
MAX_CLASSES = 100_000


def check_size(nbytes: int, origin: str | Path, what: str) -> None:
    """Refuse, before allocating, an array of `nbytes` bytes beyond MAX_SOURCE_BYTES; `what` says whose."""
    if nbytes > MAX_SOURCE_BYTES:
        raise DataError(f"{origin}: {what}, {nbytes / 2**30:.3g} GiB once decoded, more than the "
                        f"{MAX_SOURCE_BYTES >> 30} GiB a source array may take; is this the right file?")


class Source(ABC):
    """One split of a source as a random-access collection: every consumer reads images through `read`.

    Labels and class names are small and held in memory; pixels are whatever the format makes cheap:
    small formats hold the decoded split (`SourceSplit`), image folders and WebDataset shards decode
    only the images asked for (`advpipe.datasets.lazy.LazySource`). Both give the same bytes for the
    same images, and both are picklable, so a Dask worker or a DataLoader worker can be handed one.
    """

    kind: str
    split: str
    labels: np.ndarray  # int64 (N,), read-only
    class_names: tuple[str, ...]
    fingerprint: str
    #: how `fingerprint` was computed: "whole-v1" (every decoded byte, in one process) or "chunked-v1"
    #: (per-chunk digests of the encoded bytes and the decode settings; docs/FORMAT.md section 2.6)
    fingerprint_scheme: str

    @property
    @abstractmethod
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image `read` returns."""

    @abstractmethod
    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """The images at `indices` (positions in the split) as uint8 (n, H, W, C), in that order."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Part:
    """Images and labels from one place, with that place kept for error messages."""

    images: np.ndarray  # uint8 (N, H, W, C), C in {1, 3}
    labels: np.ndarray  # int64 (N,)
    origin: str  # the file or folder that error messages name


@dataclass(frozen=True)
class RawSource:
    """A source as read from disk: either a predefined train/test split or one pool to split."""

    class_names: tuple[str, ...]
    origin: str
    train: Part | None = None
    test: Part | None = None
    pool: Part | None = None

    def __post_init__(self) -> None:
        split = self.train is not None and self.test is not None
        if split == (self.pool is not None) or (self.train is None) != (self.test is None):
            raise ValueError("RawSource needs either train and test, or a pool")

    def parts(self) -> list[Part]:
        return [part for part in (self.train, self.test, self.pool) if part is not None]

    def validate(self) -> None:
        check_class_names(self.class_names, self.origin)
        for part in self.parts():
            check_part(part, len(self.class_names))


def check_class_names(names: Sequence[str], origin: str) -> None:
    if not names:
        raise DataError(f"{origin}: no class names; the source must define at least one class")
    if len(names) > MAX_CLASSES:
        raise DataError(f"{origin}: {len(names)} class names, more than the {MAX_CLASSES} a source may have; "
                        "is this the right file?")
    if not all(isinstance(name, str) for name in names):
        raise DataError(f"{origin}: class names must be strings, got {shown(list(names))}")
    if len(set(names)) != len(names):
        dupes = sorted(name for name, count in Counter(names).items() if count > 1)
        raise DataError(f"{origin}: duplicate class names {shown(dupes)}; each class needs its own name")


def check_part(part: Part, num_classes: int) -> None:
    """Raise DataError unless `part` holds N >= 1 uint8 NHWC images with N labels in [0, classes)."""
    images, labels, origin = part.images, part.labels, part.origin
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        found = getattr(images, "dtype", type(images).__name__)
        raise DataError(f"{origin}: images must be uint8 0..255, got {found}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or 0 in images.shape[1:]:
        raise DataError(
            f"{origin}: images must have shape (N, H, W, C) with C 1 or 3 (channels last), "
            f"got {images.shape}"
        )
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.ndim != 1:
        raise DataError(f"{origin}: labels must be a 1-d int64 array, got {_describe(labels)}")
    if len(images) != len(labels):
        raise DataError(
            f"{origin}: {len(images)} images but {len(labels)} labels; "
            "images and labels must come in pairs"
        )
    if len(images) == 0:
        raise DataError(f"{origin}: no images; the source is empty")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        first = int(bad[0])
        raise DataError(
            f"{origin}: label {int(labels[first])} (at index {first}, {bad.size} bad in all) "
            f"is outside [0, {num_classes}) for the {num_classes} classes; fix the labels or "
            "the class names"
        )


def as_labels(values: Any, origin: str) -> np.ndarray:
    """Labels as int64 (N,); (N, 1) columns are flattened, non-integers refused."""
    array = np.asarray(values)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise DataError(
            f"{origin}: labels must be a 1-d array of integer class indices, got {_describe(array)}"
        )
    return array.astype(np.int64)


def concat_parts(parts: Sequence[Part], origin: str) -> Part:
    """Join parts (e.g. the five CIFAR-10 training batches) into one."""
    shapes = {part.images.shape[1:] for part in parts}
    if len(shapes) > 1:
        raise DataError(f"{origin}: batches have different image shapes {sorted(shapes)}")
    images = np.concatenate([part.images for part in parts])
    labels = np.concatenate([part.labels for part in parts])
    return Part(images, labels, origin)


def source_path(config: SourceConfig, want: str) -> Path:
    """config.path, checked to exist and to be a 'dir', a 'file', or 'any' of the two."""
    if config.path is None:
        raise DataError(f"source.kind '{config.kind}' needs source.path")
    path = Path(config.path)
    if not path.exists():
        raise DataError(f"{path}: not found; set source.path to the {config.kind} data")
    if want == "dir" and not path.is_dir():
        raise DataError(f"{path}: is not a directory; source.kind '{config.kind}' reads a folder")
    if want == "file" and not path.is_file():
        raise DataError(f"{path}: is not a file; source.kind '{config.kind}' reads one file")
    return path


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {value.shape}"
    return type(value).__name__
