"""What one shard holds, independent of the file format it is written in."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ShardData:
    """A fixed range [start, start + n) of one split, with every variant in its stored form.

    `clean` is uint8 (n, C, H, W); `stored[name]` is the variant as the precision
    mode keeps it (advpipe.stores.codec); `failed[name]` flags images whose generator failed.
    Dict order is the manifest's variant order.
    """

    split: str
    start: int
    ids: np.ndarray
    labels: np.ndarray
    clean: np.ndarray
    stored: dict[str, np.ndarray] = field(default_factory=dict)
    failed: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ids = np.ascontiguousarray(self.ids, dtype=np.int64)
        self.labels = np.ascontiguousarray(self.labels, dtype=np.int64)
        self.clean = np.ascontiguousarray(self.clean, dtype=np.uint8)
        n = len(self.ids)
        if len(self.labels) != n or len(self.clean) != n:
            raise ValueError("ids, labels and clean images must have the same length")
        for name, stored in self.stored.items():
            if stored.shape != self.clean.shape:
                raise ValueError(f"variant '{name}' has shape {stored.shape}, clean has {self.clean.shape}")
            self.stored[name] = np.ascontiguousarray(stored)
            self.failed.setdefault(name, np.zeros(n, dtype=bool))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def stop(self) -> int:
        return self.start + len(self)
