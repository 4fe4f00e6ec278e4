"""The batched read path (issue 11): stored-form batches, device-side decoding and whole-epoch draws.

References are computed here from the stored arrays with plain numpy (x / 255, + delta as float32,
clip), never by the code under test, and compared bit for bit.
"""

from __future__ import annotations

import gc
import pickle

import numpy as np
import pytest
import torch
from conftest import CLASSES, make_arrays, write_test_store

from advpipe.batch import Batch
from advpipe.config import SamplerConfig
from advpipe.sampler.mapstyle import build_sampler, make_loader
from advpipe.sampler.policy import Policy
from advpipe.sampler.streaming import make_stream_loader
from advpipe.stores import build_store, codec, open_store

CONFIG = SamplerConfig(ratio=0.75, seed=3, batch_size=16, redraw="batch")


def reference_decode(clean: np.ndarray, stored: np.ndarray, precision: str) -> np.ndarray:
    """The codec's table, written out independently of advpipe.stores.codec."""
    if precision == "uint8":
        return stored.astype(np.float32) / np.float32(255)
    return np.clip(clean.astype(np.float32) / np.float32(255) + stored.astype(np.float32), 0, 1)


def reference_rows(store_path, indices: np.ndarray, variants: np.ndarray) -> np.ndarray:
    """Each (index, variant) decoded from its shard's whole stored data (ShardData), one sample at a time."""
    store = open_store(store_path)
    reader = store.split("train")
    names = store.variants
    out = []
    for index, variant in zip(indices.tolist(), variants.tolist(), strict=True):
        shard = int(np.searchsorted(reader.starts, index, side="right") - 1)
        data = reader.shard_data(shard)
        row = index - data.start
        if variant == 0:
            out.append(data.clean[row].astype(np.float32) / np.float32(255))
        else:
            out.append(reference_decode(data.clean[row], data.stored[names[variant]][row], store.manifest.precision))
    return np.stack(out)


@pytest.mark.parametrize("precision", ["float16", "float32", "uint8"])
def test_device_decode_is_bit_identical_to_the_cpu_decode(precision):
    rng = np.random.default_rng(0)
    clean = np.tile(np.arange(256, dtype=np.uint8), 40).reshape(-1, 1, 16, 16)  # every pixel value
    if precision == "uint8":
        stored = rng.integers(0, 256, clean.shape, dtype=np.uint8)
    else:  # deltas of every size, many pushing a pixel past 0 or 1 (clipped)
        stored = (rng.uniform(-0.2, 0.2, clean.shape) * rng.choice([1e-4, 1e-2, 1], clean.shape)).astype(
            codec.STORED_DTYPE[precision])
    expected = reference_decode(clean, stored, precision)
    cpu = codec.decode(clean, stored.copy(), precision)
    tensors = torch.from_numpy(clean), torch.from_numpy(stored)
    device = codec.decode_torch(*tensors, precision)  # the GPU's operations, run on the CPU
    assert device.dtype == codec.decode_tensor(*tensors, precision).dtype == torch.float32
    np.testing.assert_array_equal(cpu, expected)
    np.testing.assert_array_equal(device.numpy(), expected)
    np.testing.assert_array_equal(codec.decode_tensor(*tensors, precision).numpy(), expected)


@pytest.mark.parametrize(("backend", "precision", "compression"), [
    ("hdf5", "float16", None), ("hdf5", "uint8", None), ("hdf5", "float16", "gzip"), ("webdataset", "float16", None)])
def test_read_any_order_with_repeats_matches_the_stored_samples(tmp_path, backend, precision, compression):
    write_test_store(tmp_path / "s", backend=backend, precision=precision, compression=compression, shard_size=16)
    reader = open_store(tmp_path / "s").split("train")
    rng = np.random.default_rng(1)
    indices = np.concatenate([rng.permutation(70)[:40], [5, 5, 69, 0]])  # unsorted, repeated, both ends
    variants = rng.integers(0, 3, len(indices))
    expected = reference_rows(tmp_path / "s", indices, variants)
    np.testing.assert_array_equal(reader.read(indices, variants), expected)
    rows = reader.read_stored(indices, variants, clean=True)
    assert rows.stored.dtype == codec.STORED_DTYPE[precision]
    np.testing.assert_array_equal(rows.clean, reference_rows(tmp_path / "s", indices, np.zeros_like(variants))
                                  * 255)  # the clean twins, as uint8
    np.testing.assert_array_equal(rows.decode(), expected)


@pytest.mark.parametrize("backend", ["hdf5", "webdataset"])
def test_a_reader_sent_to_another_process_or_released_reads_the_same(tmp_path, backend):
    """One batch-wide gather reads mapped shards by address; a pickled reader (a spawned worker's) and a reader
    whose shards were released must map their own bytes again, never reuse another process's addresses."""
    write_test_store(tmp_path / "s", backend=backend, shard_size=16)
    reader = open_store(tmp_path / "s").split("train")
    rng = np.random.default_rng(2)
    indices, variants = rng.permutation(70), rng.integers(0, 3, 70)
    expected = reference_rows(tmp_path / "s", indices, variants)
    np.testing.assert_array_equal(reader.read(indices, variants), expected)
    copy = pickle.loads(pickle.dumps(reader))
    for index in range(len(reader.record.shards)):
        reader.release(index)
    del reader
    gc.collect()
    np.testing.assert_array_equal(copy.read(indices, variants), expected)
    for index in range(len(copy.record.shards)):
        copy.release(index)
    np.testing.assert_array_equal(copy.read(indices[::-1], variants[::-1]), expected[::-1])


def test_a_store_with_a_float32_variant_reads_both_arrays(tmp_path):
    build_store(tmp_path / "s", {"train": make_arrays(50)}, class_names=CLASSES, shard_size=16, progress=False,
                variant_params={"tiny": {"precision": "float32"}})
    reader = open_store(tmp_path / "s").split("train")
    indices, variants = np.arange(50)[::-1], np.arange(50) % 3
    rows = reader.read_stored(indices, variants)
    assert rows.stored.dtype == np.float32  # wide enough for both arrays, exactly
    np.testing.assert_array_equal(reader.read(indices, variants), reference_rows(tmp_path / "s", indices, variants))


def test_bad_variant_ids_are_refused(tmp_path):
    write_test_store(tmp_path / "s")
    reader = open_store(tmp_path / "s").split("train")
    for bad in (3, -1):
        with pytest.raises(IndexError, match="variant id out of range"):
            reader.read(np.array([1, 2]), np.array([0, bad]))


@pytest.mark.parametrize("precision", ["float16", "uint8"])
def test_stored_form_batches_decode_to_the_float_batches(tmp_path, precision):
    write_test_store(tmp_path / "s", precision=precision)
    config = SamplerConfig(ratio=0.75, seed=3, batch_size=16, pair_clean=True)
    floats = list(make_loader(tmp_path / "s", "train", config))
    stored = list(make_loader(tmp_path / "s", "train", config, stored_form=True))
    assert len(stored) == len(floats) == 5
    for plain, raw in zip(floats, stored, strict=True):
        assert raw.x is None and raw.stored is not None
        assert raw.stored.pixels.dtype == (torch.uint8 if precision == "uint8" else torch.float16)
        with pytest.raises(KeyError, match="stored form: call batch.decode"):
            raw["x"]
        decoded = raw.to("cpu").decode()
        assert decoded.stored is None
        for field in ("x", "x_clean", "y", "variant", "index"):
            assert torch.equal(decoded[field], plain[field]), field
    assert Batch.decode(floats[0]) is floats[0]  # a decoded batch passes through


def test_stored_form_through_workers_is_the_same_stream(tmp_path):
    write_test_store(tmp_path / "s")
    reference = list(make_loader(tmp_path / "s", "train", CONFIG))
    moved = list(make_loader(tmp_path / "s", "train", CONFIG, num_workers=2, stored_form=True))
    floats = list(make_loader(tmp_path / "s", "train", CONFIG, num_workers=2))
    for plain, raw, worker in zip(reference, moved, floats, strict=True):
        assert torch.equal(raw.decode().x, plain.x) and torch.equal(raw.index, plain.index)
        assert torch.equal(worker.x, plain.x) and torch.equal(worker.variant, plain.variant)


def test_streaming_stored_form_decodes_to_the_float_batches(tmp_path):
    write_test_store(tmp_path / "w", backend="webdataset", shard_size=16)
    floats = list(make_stream_loader(tmp_path / "w", "train", CONFIG, batch_size=16))
    stored = list(make_stream_loader(tmp_path / "w", "train", CONFIG, batch_size=16, stored_form=True))
    assert len(stored) == len(floats)
    for plain, raw in zip(floats, stored, strict=True):
        assert raw.x is None
        decoded = raw.decode()
        assert torch.equal(decoded.x, plain.x) and torch.equal(decoded.index, plain.index)


@pytest.mark.parametrize("redraw", ["epoch", "batch", "sample"])
def test_whole_epoch_draws_equal_batch_by_batch_draws(tmp_path, redraw):
    """The sampler draws a whole epoch at once; each batch must hold the draws Policy.choose makes for it alone."""
    write_test_store(tmp_path / "s")
    config = SamplerConfig(ratio=[0.3, 0.9], weights={"noise": [0.5, 2], "tiny": 1}, seed=5, batch_size=16,
                           redraw=redraw)
    store = open_store(tmp_path / "s")
    sampler = build_sampler(store, "train", config)
    policy = Policy.from_config(config, store.variants)
    for epoch in (0, 3):
        sampler.set_epoch(epoch)
        positions, indices = sampler.epoch_order(epoch)
        for number, pairs in enumerate(sampler):
            window = slice(number * 16, (number + 1) * 16)
            expected = policy.choose(epoch, positions[window], batch=number)
            np.testing.assert_array_equal(pairs[:, 0], indices[window])
            np.testing.assert_array_equal(pairs[:, 1], expected)
