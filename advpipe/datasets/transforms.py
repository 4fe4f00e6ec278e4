"""The format-independent steps of load_source: split, limit, channels, resize, freeze.

All of them are deterministic (no global RNG, integer rounding, PIL's fixed
bilinear filter), so the same config always yields the same bytes and hence
the same fingerprint.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from advpipe.datasets.base import Part
from advpipe.errors import DataError

# ITU-R 601-2 luma in thousandths, as PIL's convert("L") uses; integer math rounds identically
# on every machine, unlike a float dot product that BLAS may sum in any order.
LUMA = np.array([299, 587, 114], dtype=np.int32)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) of a deterministic stratified split.

    One permutation from np.random.default_rng(seed) orders all images; each class
    sends its first round(count * test_fraction) images in that order to test (half
    rounds up), the rest to train. Both index arrays keep the permutation's order, so
    classes are interleaved and a `limit` takes a random, roughly balanced subset.
    """
    n = len(labels)
    order = np.random.default_rng(seed).permutation(n)
    shuffled = labels[order]
    counts = np.bincount(shuffled)
    grouped = np.argsort(shuffled, kind="stable")  # positions in `order`, class by class
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    rank = np.empty(n, dtype=np.int64)
    rank[grouped] = np.arange(n) - starts  # rank of each position within its class
    n_test = np.floor(counts * test_fraction + 0.5).astype(np.int64)
    is_test = rank < n_test[shuffled]
    return order[~is_test], order[is_test]


def split_pool(pool: Part, split: str, test_fraction: float, seed: int) -> Part:
    """The `split` half of a source that came without a train/test split."""
    index = split_rows(pool.labels, split, test_fraction, seed, pool.origin)
    return Part(pool.images[index], pool.labels[index], pool.origin)


def split_rows(labels: np.ndarray, split: str, test_fraction: float, seed: int, origin: str) -> np.ndarray:
    """The pool positions of `split` (stratified_split); refused when either half would be empty."""
    train, test = stratified_split(labels, test_fraction, seed)
    if len(train) == 0 or len(test) == 0:
        raise DataError(
            f"{origin}: {len(labels)} images are too few to split with "
            f"test_fraction={test_fraction} ({len(train)} train, {len(test)} test); add images "
            "or change source.test_fraction"
        )
    return train if split == "train" else test


def take_first(part: Part, limit: int | None) -> Part:
    if limit is None or limit >= len(part.labels):
        return part
    return Part(part.images[:limit], part.labels[:limit], part.origin)


def convert_channels(images: np.ndarray, channels: int | None) -> np.ndarray:
    """1 -> 3 repeats the gray plane; 3 -> 1 is ITU-R 601-2 luminance rounded half up."""
    if channels is None or channels == images.shape[-1]:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=-1)
    luma = (images.astype(np.int32) @ LUMA + 500) // 1000
    return luma.astype(np.uint8)[..., None]


def resize_pil(image: Image.Image, size: int) -> Image.Image:
    """Bilinear resize to size x size; PIL widens the filter when shrinking (antialiasing)."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BILINEAR)


def resize_images(images: np.ndarray, size: int | None) -> np.ndarray:
    """Resize uint8 NHWC images to (size, size), one PIL image at a time."""
    n, height, width, channels = images.shape
    if size is None or (height, width) == (size, size):
        return images
    out = np.empty((n, size, size, channels), dtype=np.uint8)
    for i in range(n):
        plane = images[i, :, :, 0] if channels == 1 else images[i]
        out[i] = np.asarray(resize_pil(Image.fromarray(plane), size)).reshape(size, size, channels)
    return out


def frozen(array: np.ndarray, dtype: type, copy: bool = False) -> np.ndarray:
    """C-contiguous and read-only, so a cached split cannot be changed by one of its users.

    Views are always copied: freezing one would not stop writes through the array it
    views, and it would keep that whole array alive (e.g. all of MNIST for a `limit`).
    """
    array = np.ascontiguousarray(array, dtype=dtype)
    if copy or array.base is not None:
        array = array.copy()
    array.setflags(write=False)
    return array
