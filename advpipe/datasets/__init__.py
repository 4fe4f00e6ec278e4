"""Source datasets: clean images (uint8, NHWC) with labels, class names and a content fingerprint.

load_source(config, split) runs one pipeline whatever the format:

1. read: one module per format (`digits`, `idx` for MNIST/Fashion-MNIST, `cifar`,
   `imagefolder`, `npz`) returns a RawSource, either with a predefined train/test
   split or as one pool;
2. validate: dtype, shape, image/label counts, labels within [0, classes);
3. split: a pool is split deterministically and stratified by class
   (np.random.default_rng(source.split_seed), source.test_fraction; see
   transforms.stratified_split); with source.test_from_train the predefined
   training split is split the same way and the predefined test set is unused;
4. limit: keep the first source.limit images of the split (done before the
   per-image steps below, which gives the same result for less work);
5. channels (1 -> 3 repeat, 3 -> 1 luminance), then image_size (bilinear, PIL);
6. freeze (read-only, C-contiguous) and fingerprint.

Every step is deterministic, so the fingerprint identifies the exact bytes a store
was generated from. Bad input raises DataError naming the file and the problem.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from advpipe.config import SPLITS, SourceConfig
from advpipe.datasets import cifar, digits, idx, imagefolder, npz
from advpipe.datasets.base import Part, RawSource, check_class_names, check_part
from advpipe.datasets.transforms import (
    convert_channels,
    frozen,
    resize_images,
    split_pool,
    take_first,
)
from advpipe.errors import DataError
from advpipe.io import canonical_json

__all__ = ["READERS", "RawSource", "SourceSplit", "fingerprint", "load_source"]

log = logging.getLogger(__name__)

READERS: dict[str, Callable[[SourceConfig], RawSource]] = {
    "digits": digits.read,
    "mnist": idx.read,
    "fashion_mnist": idx.read,
    "cifar10": cifar.read,
    "cifar100": cifar.read,
    "imagefolder": imagefolder.read,
    "npz": npz.read,
}


@dataclass(frozen=True, eq=False)
class SourceSplit:
    """One split of a source, ready to use: arrays are read-only and may be shared."""

    kind: str
    split: str
    images: np.ndarray  # uint8 (N, H, W, C), C in {1, 3}, C-contiguous, read-only
    labels: np.ndarray  # int64 (N,), read-only
    class_names: tuple[str, ...]
    fingerprint: str

    @classmethod
    def create(
        cls,
        kind: str,
        split: str,
        images: np.ndarray,
        labels: np.ndarray,
        class_names: Sequence[str],
        copy: bool = True,
    ) -> SourceSplit:
        """Check, freeze and fingerprint arrays (e.g. in tests of code that consumes sources).

        The arrays are copied unless copy=False, which freezes them in place.
        """
        origin = f"{kind}/{split}"
        names = tuple(class_names)
        check_class_names(names, origin)
        part = Part(frozen(images, np.uint8, copy), frozen(labels, np.int64, copy), origin)
        check_part(part, len(names))
        digest = fingerprint(kind, split, part.images, part.labels, names)
        return cls(kind, split, part.images, part.labels, names, digest)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        height, width, channels = self.images.shape[1:]
        return (height, width, channels)

    def __len__(self) -> int:
        return len(self.labels)


def fingerprint(
    kind: str, split: str, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
) -> str:
    """sha256 hex of a canonical JSON header (kind, split, shape, dtype, class names) and the bytes."""
    header = {
        "kind": kind,
        "split": split,
        "shape": list(images.shape),
        "dtype": str(images.dtype),
        "class_names": list(class_names),
    }
    digest = hashlib.sha256(canonical_json(header).encode())
    digest.update(b"\0")
    digest.update(memoryview(np.ascontiguousarray(images)).cast("B"))
    digest.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=16)
def load_source(config: SourceConfig, split: str) -> SourceSplit:
    """The `split` ("train" or "test") of the source `config` describes; cached per process."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}")
    raw = READERS[config.kind](config)
    raw.validate()
    pool = raw.pool if raw.pool is not None else (raw.train if config.test_from_train else None)
    if pool is not None:
        part = split_pool(pool, split, config.test_fraction, config.split_seed)
    else:
        part = raw.train if split == "train" else raw.test
        assert part is not None  # RawSource guarantees train and test without a pool
    part = take_first(part, config.limit)
    images = resize_images(convert_channels(part.images, config.channels), config.image_size)
    result = SourceSplit.create(config.kind, split, images, part.labels, raw.class_names, copy=False)
    log.info(
        "source %s/%s: %d images %s, %d classes, from %s (fingerprint %s)",
        config.kind, split, len(result), result.image_shape, result.num_classes,
        raw.origin, result.fingerprint[:12],
    )  # fmt: skip
    return result
