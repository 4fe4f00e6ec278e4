"""Rank splits where the image count does not divide by the number of ranks (70 images over 3 and 4 ranks).

Map-style (VariantBatchSampler's docstring): each epoch's permutation is dealt to the ranks
round-robin; without drop_last it is padded by wrapping (its first images again) so every rank
reads ceil(70 / ranks) images, with drop_last it is cut to floor(70 / ranks) and each rank's
last partial batch is dropped. Streaming (streaming.py's docstring): every image goes to exactly
one reader, padded to ceil(70 / readers) per reader, or cut to whole batches with drop_last.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_test_store

from advpipe.config import SamplerConfig
from advpipe.sampler import make_loader
from advpipe.sampler.streaming import make_stream_loader

COUNT = 70
BATCH = 8
CONFIG = SamplerConfig(ratio=0.5, batch_size=BATCH, seed=5)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ranks")
    write_test_store(root / "hdf5", count=COUNT)
    write_test_store(root / "wds", backend="webdataset", shard_size=8, count=COUNT)
    return {"hdf5": root / "hdf5", "wds": root / "wds"}


def rank_epochs(store: Path, world_size: int, drop_last: bool) -> list[list[np.ndarray]]:
    """Per rank, the index array of each batch of epoch 0."""
    epochs = []
    for rank in range(world_size):
        loader = make_loader(store, "train", CONFIG, rank=rank, world_size=world_size, drop_last=drop_last)
        batches = [batch.index.numpy() for batch in loader]
        assert len(batches) == len(loader)
        epochs.append(batches)
    return epochs


def interleave(epochs: list[list[np.ndarray]]) -> np.ndarray:
    """The epoch's permutation as the ranks saw it: rank r holds positions r, r + W, r + 2W, ..."""
    per_rank = [np.concatenate(batches) for batches in epochs]
    assert len({len(seen) for seen in per_rank}) == 1, "ranks read different numbers of images"
    return np.stack(per_rank, axis=1).reshape(-1)


@pytest.mark.parametrize("world_size", [3, 4])
def test_map_style_ranks_cover_each_image_once_plus_wrapped_padding(stores, world_size):
    epochs = rank_epochs(stores["hdf5"], world_size, drop_last=False)
    per_rank = -(-COUNT // world_size)  # 24 for 3 ranks, 18 for 4
    batches = -(-per_rank // BATCH)
    assert [len(batches_of_rank) for batches_of_rank in epochs] == [batches] * world_size
    assert all(len(epoch[-1]) == per_rank - (batches - 1) * BATCH for epoch in epochs)
    order = interleave(epochs)
    padding = per_rank * world_size - COUNT  # 2 for both 3 and 4 ranks
    assert len(order) == COUNT + padding and padding > 0
    assert sorted(order[:COUNT].tolist()) == list(range(COUNT))  # every image exactly once...
    np.testing.assert_array_equal(order[COUNT:], order[:padding])  # ...then the permutation's first images


@pytest.mark.parametrize("world_size", [3, 4])
def test_map_style_drop_last_cuts_the_tail_and_never_repeats(stores, world_size):
    epochs = rank_epochs(stores["hdf5"], world_size, drop_last=True)
    per_rank = (COUNT // world_size) // BATCH * BATCH  # 16: 23 or 17 images, whole batches only
    assert all(len(batch) == BATCH for epoch in epochs for batch in epoch)
    order = interleave(epochs)
    assert len(order) == per_rank * world_size
    assert len(set(order.tolist())) == len(order)  # no image twice
    full = rank_epochs(stores["hdf5"], world_size, drop_last=False)
    np.testing.assert_array_equal(order, interleave(full)[: len(order)])  # the same permutation, cut


@pytest.mark.parametrize("world_size", [3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_streaming_ranks_split_uneven_counts(stores, world_size, drop_last):
    seen: list[int] = []
    for rank in range(world_size):
        loader = make_stream_loader(stores["wds"], sampler_config=CONFIG, batch_size=BATCH, shuffle_buffer=16,
                                    rank=rank, world_size=world_size, drop_last=drop_last)
        batches = [batch.index.tolist() for batch in loader]
        assert len(batches) == len(loader)
        if drop_last:
            assert all(len(batch) == BATCH for batch in batches)
        seen += [index for batch in batches for index in batch]
    if drop_last:
        assert len(seen) == len(set(seen)) == world_size * ((COUNT // world_size) // BATCH * BATCH)
    else:
        padded = world_size * -(-COUNT // world_size)
        assert sorted(set(seen)) == list(range(COUNT)) and len(seen) == padded
