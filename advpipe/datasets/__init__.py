"""Source datasets: clean images (uint8, NHWC) with labels, class names and a content fingerprint.

load_source(config, split) returns a `Source`: one split as a random-access collection
(`read(indices)`, `labels`, `class_names`, `image_shape`, `fingerprint`), whatever the format:

1. read: one module per format. Small formats (`digits`, `idx` for MNIST/Fashion-MNIST,
   `cifar`, `npz`) are loaded whole into a `SourceSplit`; `imagefolder` and `webdataset`
   are indexed (advpipe.datasets.lazy: where each image's bytes are, their sha256, label
   and header) and decoded only when read (`LazySource`), so a source may be far larger
   than memory. Either comes with a predefined train/test split or as one pool;
2. validate: dtype, shape, image/label counts, labels within [0, classes);
3. split: a pool is split deterministically and stratified by class
   (np.random.default_rng(source.split_seed), source.test_fraction; see
   transforms.stratified_split); with source.test_from_train the predefined
   training split is split the same way and the predefined test set is unused;
4. limit: keep the first source.limit images of the split (done before the
   per-image steps below, which gives the same result for less work);
5. channels (1 -> 3 repeat, 3 -> 1 luminance), then image_size (bilinear, PIL);
6. freeze (read-only, C-contiguous) and fingerprint: "whole-v1" over every decoded byte
   for the formats loaded whole, "chunked-v1" over per-chunk digests of the encoded bytes
   and the decode settings for lazy ones (docs/FORMAT.md section 2.6).

Every step is deterministic, so the fingerprint identifies the exact bytes a store
was generated from, and a lazy source reads the same bytes as the whole-loading path
would. Bad input raises DataError naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from advpipe import urls
from advpipe.config import SPLITS, SourceConfig
from advpipe.datasets import cifar, digits, idx, imagefolder, npz, webdataset
from advpipe.datasets.base import Part, RawSource, Source, check_class_names, check_part
from advpipe.datasets.lazy import Index, LazySource, Runner, part_decode, run_inline
from advpipe.datasets.transforms import (
    convert_channels,
    frozen,
    resize_images,
    split_pool,
    split_rows,
    take_first,
)
from advpipe.errors import DataError
from advpipe.io import canonical_json

__all__ = ["LAZY_READERS", "READERS", "RawSource", "Source", "SourceSplit", "fingerprint", "load_source"]

log = logging.getLogger(__name__)

WHOLE_SCHEME = "whole-v1"

#: formats loaded whole (small: their decoded splits take at most MAX_SOURCE_BYTES)
READERS: dict[str, Callable[[SourceConfig], RawSource]] = {
    "digits": digits.read,
    "mnist": idx.read,
    "fashion_mnist": idx.read,
    "cifar10": cifar.read,
    "cifar100": cifar.read,
    "npz": npz.read,
}
#: formats read lazily: (config, runner) -> (class names, {"train"/"test" or "pool": index})
LAZY_READERS: dict[str, Callable[[SourceConfig, Runner], tuple[tuple[str, ...], dict[str, Index]]]] = {
    "imagefolder": imagefolder.parts,
    "webdataset": webdataset.parts,
}


@dataclass(frozen=True, eq=False)
class SourceSplit(Source):
    """One split of a small source, decoded whole: arrays are read-only and may be shared."""

    kind: str
    split: str
    images: np.ndarray  # uint8 (N, H, W, C), C in {1, 3}, C-contiguous, read-only
    labels: np.ndarray  # int64 (N,), read-only
    class_names: tuple[str, ...]
    fingerprint: str
    fingerprint_scheme: str = WHOLE_SCHEME

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
    def image_shape(self) -> tuple[int, int, int]:
        height, width, channels = self.images.shape[1:]
        return (height, width, channels)

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        return self.images[np.asarray(indices, dtype=np.int64)]


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


def load_source(config: SourceConfig, split: str, runner: Runner | None = None) -> Source:
    """The `split` ("train" or "test") of the source `config` describes.

    `runner` runs a lazy format's index tasks (on Dask workers during `generate`); without one
    they run here. Loaded or indexed once per process: later calls are cheap.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}")
    if config.kind in LAZY_READERS:
        return _lazy_source(config, split, runner or run_inline)
    return _whole_source(config, split)


_WHOLE: dict[tuple[str, str], SourceSplit] = {}
_WHOLE_KEPT = 16


def _whole_source(config: SourceConfig, split: str) -> SourceSplit:
    """A small source's split, loaded once per process (the last _WHOLE_KEPT splits are kept)."""
    key = (config.cache_key(), split)
    if key not in _WHOLE:
        if len(_WHOLE) >= _WHOLE_KEPT:
            _WHOLE.pop(next(iter(_WHOLE)))
        _WHOLE[key] = _load_whole(config, split)
    return _WHOLE[key]


def _load_whole(config: SourceConfig, split: str) -> SourceSplit:
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
    _log_loaded(result, raw.origin)
    return result


_LAZY_PARTS: dict[str, tuple[tuple[str, ...], dict[str, Index]]] = {}


def _lazy_source(config: SourceConfig, split: str, runner: Runner) -> LazySource:
    key = config.cache_key()
    if key not in _LAZY_PARTS:
        _LAZY_PARTS.clear()  # one source's index per process is enough; a new config replaces it
        _LAZY_PARTS[key] = LAZY_READERS[config.kind](config, runner)
    class_names, parts = _LAZY_PARTS[key]
    pool = parts.get("pool") or (parts["train"] if config.test_from_train else None)
    if pool is not None:
        decode = part_decode(pool, config.image_size, config.channels)
        index = pool.take(split_rows(pool.labels, split, config.test_fraction, config.split_seed, pool.location))
    else:
        index = parts[split]
        decode = part_decode(index, config.image_size, config.channels)
    if config.limit is not None and config.limit < len(index):
        index = index.take(np.arange(config.limit))
    options = {}
    if config.kind == "webdataset":
        options = urls.storage_options(str(config.path), config.storage_options, config.endpoint_url)
    result = LazySource.create(config.kind, split, index, class_names, decode, options)
    _log_loaded(result, urls.redact(index.location))
    return result


def _clear_caches() -> None:
    """Forget every source this process loaded or indexed (the disk's index cache stays)."""
    _WHOLE.clear()
    _LAZY_PARTS.clear()


load_source.cache_clear = _clear_caches  # type: ignore[attr-defined]  # as functools.lru_cache offers


def _log_loaded(source: Source, origin: str) -> None:
    log.info("source %s/%s: %d images %s, %d classes, from %s (fingerprint %s, %s)", source.kind, source.split,
             len(source), source.image_shape, source.num_classes, origin, source.fingerprint[:12],
             source.fingerprint_scheme)
