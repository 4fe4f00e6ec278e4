"""scikit-learn's bundled 8x8 digits: a source that needs no download, for tests and demos."""

from __future__ import annotations

import logging

import numpy as np

from advpipe.config import SourceConfig
from advpipe.datasets.base import Part, RawSource

log = logging.getLogger(__name__)

ORIGIN = "sklearn.datasets.load_digits"


def read(config: SourceConfig) -> RawSource:
    """1797 images 8x8x1 in one pool; pixels 0..16 are scaled to 0..255 (x * 255 / 16, rounded)."""
    from sklearn.datasets import load_digits  # imported here: sklearn is slow to import

    if config.path is not None:
        log.warning("source.kind 'digits' is bundled with scikit-learn; ignoring source.path")
    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    return RawSource(
        class_names=tuple(str(digit) for digit in range(10)),
        origin=ORIGIN,
        pool=Part(images, labels, ORIGIN),
    )
