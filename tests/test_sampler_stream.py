"""Streaming sampler: exactly-once splitting, reproducibility, fidelity to the store, integrity, HTTP."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, http_server, make_arrays, write_test_store

from advpipe.config import SamplerConfig
from advpipe.errors import IntegrityError, SamplerError, StoreError
from advpipe.sampler.policy import Policy
from advpipe.sampler.streaming import (
    ShardColumns,
    ShardPixels,
    ShuffleBuffer,
    StreamingVariantDataset,
    make_stream_loader,
    rebatch,
    refs_of,
    shuffle_chunks,
)
from advpipe.stores import build_store, open_store, read_manifest

COUNT = 70
MIXED = SamplerConfig(ratio=(0.6, 0.6), seed=3)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """WebDataset stores with many shards (9 for 70 images) and few (3), plus an HDF5 one."""
    root = tmp_path_factory.mktemp("stream")
    layouts = {"many": ("webdataset", 8, "float16"), "few": ("webdataset", 32, "float16"),
               "uint8": ("webdataset", 16, "uint8"), "hdf5": ("hdf5", 32, "float16")}
    for name, (backend, shard_size, precision) in layouts.items():
        write_test_store(root / name, backend=backend, shard_size=shard_size, precision=precision, count=COUNT)
    return {name: root / name for name in layouts}


@pytest.mark.parametrize("layout", ["many", "few"])
def test_every_image_exactly_once_over_two_ranks_of_two_workers(stores: dict[str, Path], layout: str) -> None:
    """Uneven shards ('few': 32, 32, 6 images): both ranks yield as many batches, and only padding repeats."""
    seen: list[int] = []
    batches = []
    for rank in (0, 1):
        loader = make_stream_loader(stores[layout], sampler_config=MIXED, batch_size=5, num_workers=2,
                                    shuffle_buffer=16, rank=rank, world_size=2)
        rank_batches = list(loader)
        assert len(rank_batches) == len(loader)
        batches.append(len(rank_batches))
        seen += [int(i) for batch in rank_batches for i in batch["index"]]
    assert batches == [8, 8]  # 4 readers x ceil(18 / 5) batches each ... per rank: 2 workers x 4
    assert sorted(set(seen)) == list(range(COUNT))  # every image
    assert len(seen) == 4 * 18  # 70 images padded to 18 per reader: two repeats, no more
    assert sum(count - 1 for count in Counter(seen).values()) == 2


def test_drop_last_cuts_instead_of_padding(stores: dict[str, Path]) -> None:
    seen: list[int] = []
    for rank in (0, 1):
        loader = make_stream_loader(stores["few"], sampler_config=MIXED, batch_size=5, num_workers=2, rank=rank,
                                    world_size=2, drop_last=True)
        rank_batches = list(loader)
        assert len(rank_batches) == len(loader) == 2 * 3  # floor(70 / 4) = 17 per reader: 3 full batches
        seen += [int(i) for batch in rank_batches for i in batch["index"]]
    assert len(seen) == len(set(seen)) == 4 * 15  # no repeats; the cut images are the documented loss


@pytest.mark.parametrize("world_size", [1, 3, 4, 9, 10, 16])
def test_exactly_once_and_layout_independent_variants(stores: dict[str, Path], world_size: int) -> None:
    """Any slot count, above or below the 9 shards; each image's variant depends only on (seed, epoch, id)."""
    variants: dict[int, int] = {}
    drawn = 0
    for rank in range(world_size):
        dataset = StreamingVariantDataset(stores["many"], sampler=MIXED, batch_size=4, rank=rank,
                                          world_size=world_size)
        dataset.set_epoch(2)
        for batch in dataset:
            for index, variant in zip(batch["index"].tolist(), batch["variant"].tolist(), strict=True):
                assert variants.setdefault(index, variant) == variant  # a padded repeat is the same draw
                drawn += 1
    assert drawn == world_size * -(-COUNT // world_size)  # padded to ceil(count / readers) per reader
    policy = Policy.from_config(MIXED, open_store(stores["many"]).variants)
    assert sorted(variants) == list(range(COUNT))
    assert [variants[i] for i in range(COUNT)] == policy.choose(2, np.arange(COUNT)).tolist()


def test_same_seed_and_epoch_give_the_same_sequence(stores: dict[str, Path]) -> None:
    def sequence(epoch: int, seed: int = 3) -> list[tuple[int, int]]:
        dataset = StreamingVariantDataset(stores["many"], sampler=SamplerConfig(ratio=(0.6, 0.6), seed=seed),
                                          batch_size=8, shuffle_buffer=20)
        dataset.set_epoch(epoch)
        return [pair for batch in dataset for pair in zip(batch["index"].tolist(), batch["variant"].tolist(),
                                                          strict=True)]

    first = sequence(0)
    assert sequence(0) == first
    assert sorted(first) != first  # shuffled
    assert [i for i, _ in sequence(1)] != [i for i, _ in first]
    assert sequence(0, seed=4) != first

    def with_workers() -> list[list[int]]:
        loader = make_stream_loader(stores["many"], sampler_config=MIXED, batch_size=8, num_workers=2)
        return [batch["index"].tolist() + batch["variant"].tolist() for batch in loader]

    assert with_workers() == with_workers()


def test_batches_match_the_random_access_reader(stores: dict[str, Path]) -> None:
    for layout in ("many", "uint8"):
        reader = open_store(stores[layout]).split("train")
        dataset = StreamingVariantDataset(stores[layout], sampler=MIXED, batch_size=16, pair_clean=True)
        outcomes = Counter()
        for batch in dataset:
            index, variant = batch["index"].numpy(), batch["variant"].numpy()
            assert batch["x"].dtype == torch.float32 and batch["x"].shape == (len(index), 3, 8, 8)
            assert np.array_equal(batch["x"].numpy(), reader.read(index, variant))
            assert np.array_equal(batch["x_clean"].numpy(), reader.read(index, 0))
            assert np.array_equal(batch["y"].numpy(), reader.labels[index])
            assert np.array_equal(batch["is_adv"].numpy(), variant > 0)
            outcomes.update(variant.tolist())
        assert set(outcomes) == {0, 1, 2}


def test_per_sample_mode_collates_like_batches(stores: dict[str, Path]) -> None:
    dataset = StreamingVariantDataset(stores["few"], sampler=MIXED)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32)
    batches = list(loader)
    assert [len(b["y"]) for b in batches] == [32, 32, 6]
    assert set(batches[0]) == {"x", "y", "variant", "is_adv", "index"}
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(COUNT))


def test_failed_variants_are_never_drawn(tmp_path: Path) -> None:
    arrays = make_arrays(COUNT)
    arrays.variants["noise"][::3] = np.nan  # generation failed for every third image
    build_store(tmp_path / "s", {"train": arrays}, class_names=CLASSES, backend="webdataset", shard_size=16,
                progress=False)
    dataset = StreamingVariantDataset(tmp_path / "s", sampler=SamplerConfig(ratio=1.0, redraw="batch",
                                                                            batch_size=8), batch_size=10)
    drawn = {int(i): int(v) for batch in dataset for i, v in zip(batch["index"], batch["variant"], strict=True)}
    assert all(drawn[i] == 2 for i in range(0, COUNT, 3))  # 'tiny' is the only variant left for them
    assert {drawn[i] for i in range(1, COUNT, 3)} == {1, 2}


PIXELS = ShardPixels("float16", (1, 1, 1), np.dtype(np.float16))


def refs(start: int, count: int, key: int) -> dict[str, np.ndarray]:
    """Samples start..start+count whose pixels encode their id; odd ids pick variant 1, whose delta is the id."""
    ids = np.arange(start, start + count)
    columns = ShardColumns(ids=ids, labels=ids % 10, failed=np.zeros((count, 2), bool),
                           clean=ids.astype(np.uint8).reshape(count, 1, 1, 1),
                           variants=ids.astype(np.float16).reshape(count, 1, 1, 1, 1))
    return refs_of(columns, key, np.arange(count), ids, ids % 10, ids % 2)


def gathered(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Every batch's ids, labels and pixels, concatenated."""
    out: dict[str, list[np.ndarray]] = {"index": [], "label": [], "clean": [], "stored": []}
    for batch in batches:
        clean, stored = PIXELS.gather(batch, True)
        for key, value in (("index", batch["index"]), ("label", batch["label"]), ("clean", clean),
                           ("stored", stored)):
            out[key].append(value)
    return {key: np.concatenate(values) for key, values in out.items()}


def test_shuffle_buffer_and_rebatch_keep_every_sample_with_its_pixels() -> None:
    rng = np.random.default_rng(0)
    starts_and_counts = ((0, 5), (5, 40), (45, 1), (46, 30))
    for size in (1, 7, 50, 200):
        for live in (1, 2, 6):
            chunks = (refs(s, n, key) for key, (s, n) in enumerate(starts_and_counts))
            out = gathered(list(rebatch(shuffle_chunks(chunks, size, rng, PIXELS, live), 16)))
            assert sorted(out["index"].tolist()) == list(range(76)) and out["index"].tolist() != list(range(76))
            assert np.array_equal(out["clean"].ravel(), out["index"])
            assert np.array_equal(out["label"], out["index"] % 10)
            assert np.array_equal(out["stored"].ravel(), np.where(out["index"] % 2, out["index"], 0))
    chunks = [refs(s, n, key) for key, (s, n) in enumerate(starts_and_counts)]
    assert [len(b["index"]) for b in rebatch(chunks, 32)] == [32, 32, 12]
    assert [len(b["index"]) for b in rebatch(chunks, 32, drop_last=True)] == [32, 32]


def test_shuffle_buffer_holds_at_most_live_shards_and_keeps_the_order() -> None:
    """Spilling old shards' last samples bounds the shards alive and changes nothing in the stream."""
    starts = [(start, 10) for start in range(0, 200, 10)]

    def run(live: int) -> tuple[list[int], int]:
        buffer = ShuffleBuffer(30, np.random.default_rng(5), PIXELS, live)
        order, most = [], 0
        for chunk in buffer(refs(s, n, key) for key, (s, n) in enumerate(starts)):
            if buffer.pool is not None:
                keys = buffer.pool["key"]
                most = max(most, len(np.unique(keys[keys >= 0])))
            out = gathered([chunk])
            assert np.array_equal(out["clean"].ravel(), out["index"] % 256)
            assert np.array_equal(out["stored"].ravel(), np.where(out["index"] % 2, out["index"], 0))
            order += out["index"].tolist()
        return order, most

    unbounded, most = run(1000)
    assert most > 3 and sorted(unbounded) == list(range(200))
    bounded, most = run(3)
    assert most == 3 and bounded == unbounded


def test_live_shards_bounds_memory_without_changing_the_stream(stores: dict[str, Path]) -> None:
    """One live shard (every older shard's last samples copied out) or all nine: the same batches, pixels included."""
    def batches(live: int) -> list[dict[str, torch.Tensor]]:
        return list(StreamingVariantDataset(stores["many"], sampler=MIXED, batch_size=8, shuffle_buffer=16,
                                            pair_clean=True, live_shards=live))

    reader = open_store(stores["many"]).split("train")
    for one, every in zip(batches(1), batches(100), strict=True):
        for key in ("index", "variant", "x", "x_clean", "y"):
            assert torch.equal(one[key], every[key])
        assert np.array_equal(one["x"].numpy(), reader.read(one["index"].numpy(), one["variant"].numpy()))
    with pytest.raises(SamplerError, match="live_shards"):
        StreamingVariantDataset(stores["many"], live_shards=0)


def test_a_local_shard_rewritten_between_epochs_is_read_anew(tmp_path: Path) -> None:
    """Parsed shards are reused only while the file is unchanged: a rewrite of the same size is seen next epoch."""
    write_test_store(tmp_path / "s", backend="webdataset", shard_size=8, count=COUNT)
    shard = read_manifest(tmp_path / "s").splits["train"].shards[2]
    dataset = StreamingVariantDataset(tmp_path / "s", shuffle=False, batch_size=10, pair_clean=True, verify="size")

    def first_pixel() -> float:
        clean = {int(i): x for batch in dataset for i, x in zip(batch["index"], batch["x_clean"], strict=True)}
        return float(clean[shard.start].reshape(-1)[0])

    before = first_pixel()
    assert first_pixel() == before
    offset, npy_header, _ = dataset.reader.members["clean.npy"]
    path = tmp_path / "s" / shard.name
    data = bytearray(path.read_bytes())
    at = offset + 512 + len(npy_header)  # record 0's first clean pixel
    data[at] = (data[at] + 1) % 256
    path.unlink()
    path.write_bytes(bytes(data))
    assert first_pixel() == np.float32(data[at]) / np.float32(255) != before


def flip_a_byte(path: Path) -> None:
    """Corrupt a shard by replacing the file (a new inode, as any rewrite by rename gives)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.unlink()
    path.write_bytes(bytes(data))


def test_corrupt_shard_is_an_error_naming_it_and_yields_nothing_from_it(tmp_path: Path) -> None:
    write_test_store(tmp_path / "s", backend="webdataset", shard_size=8, count=COUNT)
    shard = read_manifest(tmp_path / "s").splits["train"].shards[3]
    dataset = StreamingVariantDataset(tmp_path / "s", shuffle=False)  # verified while intact
    flip_a_byte(tmp_path / "s" / shard.name)
    seen: list[int] = []
    with pytest.raises(IntegrityError, match=shard.name):
        for sample in dataset:
            seen.append(int(sample["index"]))
    assert seen and not any(shard.start <= i < shard.stop for i in seen)
    with pytest.raises(IntegrityError, match=f"{shard.name}: sha256"):  # a new dataset: at construction
        StreamingVariantDataset(tmp_path / "s")
    (tmp_path / "s" / shard.name).write_bytes(b"\0" * 1024)
    with pytest.raises(IntegrityError, match="truncated"):
        StreamingVariantDataset(tmp_path / "s")


def rewrite_shard_with_long_json(store: Path, split: str, index: int) -> None:
    """Pad every record's JSON past one tar block: still valid, but no longer at a fixed stride."""
    manifest = json.loads((store / "manifest.json").read_text())
    record = manifest["splits"][split]["shards"][index]
    path = store / record["name"]
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, payload in members:
            payload = payload + b" " * 600 if member.name.endswith(".json") else payload
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    record.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    (store / "manifest.json").write_text(json.dumps(manifest))


def test_fixed_stride_and_record_by_record_reading_agree(tmp_path: Path) -> None:
    arrays = make_arrays(COUNT)
    arrays.variants["tiny"][::4] = np.nan
    build_store(tmp_path / "s", {"train": arrays}, class_names=CLASSES, backend="webdataset", shard_size=16,
                progress=False)
    rewrite_shard_with_long_json(tmp_path / "s", "train", 1)
    dataset = StreamingVariantDataset(tmp_path / "s", sampler=SamplerConfig(ratio=1.0), shuffle=False)
    shards = dataset.shards
    strided = [dataset.reader._strided(dataset.source.fetch(s), s) for s in shards]
    assert [c is None for c in strided] == [False, True, False, False, False]
    for shard, columns in zip(shards, strided, strict=True):
        by_record = dataset.reader._by_record(dataset.source.fetch(shard), shard)
        for name in ("ids", "labels", "failed", "clean", "variants") if columns is not None else ():
            assert np.array_equal(getattr(columns, name), getattr(by_record, name)), name
        assert np.array_equal(by_record.failed[:, 2], by_record.ids % 4 == 0)
    reader = open_store(tmp_path / "s").split("train")
    for sample in dataset:
        index, variant = np.array([int(sample["index"])]), np.array([int(sample["variant"])])
        assert np.array_equal(sample["x"].numpy()[None], reader.read(index, variant))


def test_loader_advances_epochs_and_applies_adaptive_updates(stores: dict[str, Path]) -> None:
    config = SamplerConfig(ratio=1.0, weights={"noise": (0.0, 1.0), "tiny": (0.0, 1.0)}, adaptive=True,
                           adapt_rate=1.0, redraw="sample", seed=5)
    loader = make_stream_loader(stores["few"], sampler_config=config, batch_size=16)
    first = [i for batch in loader for i in batch["index"].tolist()]
    loader.update({"noise": 1.0, "tiny": 0.0})
    second = {i: v for batch in loader for i, v in zip(batch["index"].tolist(), batch["variant"].tolist(),
                                                       strict=True)}
    assert loader.epoch == 2 and sorted(second) == list(range(COUNT)) and first != sorted(first)
    expected = Policy.from_config(config, open_store(stores["few"]).variants)
    expected.update({"noise": 1.0, "tiny": 0.0})
    expected.adapt()
    assert [second[i] for i in range(COUNT)] == expected.choose(1, np.arange(COUNT)).tolist()


def test_persistent_workers_follow_epochs_and_adaptive_updates(stores: dict[str, Path]) -> None:
    """The loader's two workers live across epochs; set_epoch and update() still reach them at each epoch start."""
    config = SamplerConfig(ratio=1.0, weights={"noise": (0.0, 1.0), "tiny": (0.0, 1.0)}, adaptive=True,
                           adapt_rate=1.0, redraw="sample", seed=5)
    loader = make_stream_loader(stores["few"], sampler_config=config, batch_size=8, num_workers=2)
    assert loader.dataloader.persistent_workers

    def variants() -> list[int]:
        drawn = {i: v for batch in loader for i, v in zip(batch["index"].tolist(), batch["variant"].tolist(),
                                                          strict=True)}
        assert sorted(drawn) == list(range(COUNT))
        return [drawn[i] for i in range(COUNT)]

    expected = Policy.from_config(config, open_store(stores["few"]).variants)
    assert variants() == expected.choose(0, np.arange(COUNT)).tolist()
    loader.update({"noise": 1.0, "tiny": 0.0})
    expected.update({"noise": 1.0, "tiny": 0.0})
    expected.adapt()
    assert variants() == expected.choose(1, np.arange(COUNT)).tolist()
    loader.set_epoch(6)
    assert variants() == expected.choose(6, np.arange(COUNT)).tolist() != expected.choose(1, np.arange(COUNT)).tolist()


def test_hdf5_store_and_bad_arguments_are_refused_at_construction(stores: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="advpipe convert"):
        StreamingVariantDataset(stores["hdf5"])
    with pytest.raises(StoreError, match="no split 'valid'"):
        StreamingVariantDataset(stores["many"], split="valid")
    with pytest.raises(StoreError, match="not a finished store"):
        StreamingVariantDataset(tmp_path)
    with pytest.raises(SamplerError, match="rank"):
        StreamingVariantDataset(stores["many"], rank=2, world_size=2)


@pytest.fixture
def http_root(stores: dict[str, Path]) -> Iterator[str]:
    """Serve the stores' directory from 127.0.0.1 with Python's http.server, in a subprocess."""
    with http_server(stores["many"].parent) as url:
        yield url


def test_train_one_epoch_streamed_over_http(http_root: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3 * 8 * 8, len(CLASSES))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = make_stream_loader(f"{http_root}/many", sampler_config=MIXED, batch_size=16, num_workers=2,
                                shuffle_buffer=32)
    seen, losses = [], []
    for batch in loader:
        loss = torch.nn.functional.cross_entropy(model(batch["x"].flatten(1)), batch["y"])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        seen += batch["index"].tolist()
        losses.append(loss.item())
    assert sorted(seen) == list(range(COUNT))
    assert losses and np.isfinite(losses).all()


def test_http_corrupt_or_missing_shard_is_an_integrity_error(http_root: str, stores: dict[str, Path]) -> None:
    """Remote shards are hashed at every fetch: a shard changed after construction is caught then."""
    shard = read_manifest(stores["few"]).splits["test"].shards[0]
    path = stores["few"] / shard.name
    intact = path.read_bytes()
    dataset = StreamingVariantDataset(f"{http_root}/few", split="test")
    try:
        flip_a_byte(path)
        with pytest.raises(IntegrityError, match=f"{shard.name}: sha256"):
            list(dataset)
        path.unlink()
        with pytest.raises(IntegrityError, match=f"{shard.name}: missing"):
            list(dataset)
    finally:
        path.write_bytes(intact)


def test_stream_resumes_mid_epoch_in_a_new_process(stores: dict[str, Path], tmp_path: Path) -> None:
    """Consume 3 batches, save, resume in a fresh process: the rest of the epoch and its counts are identical."""
    config = SamplerConfig(ratio=[0.3, 0.7], seed=5)

    def loader():
        return make_stream_loader(stores["many"], "train", config, batch_size=8, num_workers=2)

    full = [batch["index"].tolist() for batch in loader()]
    first = loader()
    iterator = iter(first)
    for _ in range(3):
        next(iterator)
    (tmp_path / "state.json").write_text(json.dumps(first.state_dict()))
    script = tmp_path / "resume.py"
    script.write_text(f"""
import json, sys
from advpipe.config import SamplerConfig
from advpipe.sampler.streaming import make_stream_loader
loader = make_stream_loader({str(stores["many"])!r}, "train", SamplerConfig(ratio=[0.3, 0.7], seed=5), batch_size=8,
                            num_workers=2)
loader.load_state_dict(json.loads(open({str(tmp_path / "state.json")!r}).read()))
rest = [batch["index"].tolist() for batch in loader]
print(json.dumps({{"rest": rest, "metrics": loader.metrics()}}))
""")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=True)
    resumed = json.loads(result.stdout.strip().splitlines()[-1])
    assert resumed["rest"] == full[3:]
    complete = loader()
    for _ in complete:
        pass
    assert resumed["metrics"] == complete.metrics()
    assert sum(v for k, v in complete.metrics().items() if k != "sampler/adversarial_fraction") == COUNT
    other = make_stream_loader(stores["many"], "train", config, batch_size=8, num_workers=1)
    with pytest.raises(SamplerError, match="does not fit this loader: num_workers is 1, saved 2"):
        other.load_state_dict(first.state_dict())
