"""The plain source-data loader: clean images of a source split, as the same Batches and epochs as a store.

Training the source model (and any method on clean data without a store) goes through the same
loader base as the store loaders, so it shuffles per epoch by (seed, epoch), splits across
ranks, and resumes mid-epoch exactly.
"""

from __future__ import annotations

import numpy as np

from advpipe.config import SamplerConfig
from advpipe.datasets import Source
from advpipe.sampler.mapstyle import StoreDataset, StoreLoader, VariantBatchSampler
from advpipe.sampler.policy import Policy


class SourceReader:
    """`read(indices, 0)` over a source split, as a store's SplitReader reads its clean variant.

    The source reads only the images asked for (a lazy one decodes them then), so a DataLoader
    worker holding this reader holds the split's index, never its pixels.
    """

    def __init__(self, split: Source) -> None:
        self.split = split  # not `source`: a store reader's `source` is its shard source, with metrics

    def __len__(self) -> int:
        return len(self.split)

    def read(self, indices: np.ndarray, variant_ids: np.ndarray | int = 0) -> np.ndarray:
        if np.any(np.asarray(variant_ids) != 0):
            raise ValueError("a source split holds clean images only (variant 0)")
        images = self.split.read(np.asarray(indices, dtype=np.int64))
        out = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)  # widen and lay out: one pass
        return np.divide(out, np.float32(255), out=out)


def source_loader(split: Source, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                  num_workers: int = 0, drop_last: bool = False, rank: int | None = None,
                  world_size: int | None = None) -> StoreLoader:
    """Clean Batches (variant 0) of a source split; shuffled per epoch by (seed, epoch)."""
    policy = Policy.from_config(SamplerConfig(ratio=(0.0, 0.0), seed=seed), ["clean"])
    sampler = VariantBatchSampler(policy, len(split), batch_size, shuffle=shuffle, drop_last=drop_last, rank=rank,
                                  world_size=world_size)
    dataset = StoreDataset(SourceReader(split), np.asarray(split.labels))
    return StoreLoader(dataset, sampler, ["clean"], num_workers=num_workers)
