"""The store format: round trips, backend equivalence, verification, read-only sharing, safety."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
from conftest import CLASSES, make_arrays, write_test_store

from advpipe.errors import IntegrityError, StoreError
from advpipe.stores import SplitArrays, build_store, convert_store, open_store, verify_store
from advpipe.stores.manifest import MANIFEST_NAME
from advpipe.stores.wds import iter_members


def tree_state(path: Path) -> dict[str, tuple]:
    """Every entry under `path` (the directory itself included): inode and mtime, and a file's sha256.

    A directory's mtime changes when an entry is created, renamed or removed in it, so a reader
    that writes a lock or temp file and deletes it again still shows here (chmod would not stop root).
    """
    return {str(p.relative_to(path)): (p.stat().st_ino, p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted([path, *path.rglob("*")])}


def error_bound(precision: str, clean: np.ndarray, variant: np.ndarray) -> np.ndarray:
    """What each precision mode may lose per pixel (stores/codec.py's table), fixed in advance.

    uint8 rounds to the nearest of 256 levels: at most 1/510. float16 keeps the perturbation
    `variant - clean/255` to 11 significant bits, so its error shrinks with the perturbation
    (2^-11 of it, plus float32 rounding of the sum); float32 loses only that rounding.
    """
    rounding = np.float32(2.0**-23)
    delta = np.abs(variant - clean.astype(np.float32) / 255)
    return {"uint8": np.full_like(delta, 1 / 510 + rounding), "float16": delta * 2.0**-11 + rounding,
            "float32": np.full_like(delta, rounding)}[precision]


@pytest.mark.parametrize("backend", ["hdf5", "webdataset"])
@pytest.mark.parametrize("precision", ["float16", "float32", "uint8"])
def test_round_trip_within_fixed_bounds(tmp_path, backend, precision):
    splits = write_test_store(tmp_path / "s", backend=backend, precision=precision)
    store = open_store(tmp_path / "s")
    for split, arrays in splits.items():
        reader = store.split(split)
        ids = np.arange(len(arrays.images))
        np.testing.assert_array_equal(reader.read(ids, 0), arrays.images.astype(np.float32) / 255)
        np.testing.assert_array_equal(reader.labels, arrays.labels)
        for name, expected in arrays.variants.items():
            error = np.abs(reader.read(ids, store.variant_id(name)) - expected)
            excess = error - error_bound(precision, arrays.images, expected)
            assert excess.max() <= 0, f"{name}: error exceeds the {precision} bound by {excess.max():.3g}"
            assert error.max() <= store.manifest.splits[split].stats[name].max_abs_error  # the record is honest


def test_precise_mode_keeps_sub_uint8_perturbations(tmp_path):
    """A 0.001 step survives float16 storage but is erased by uint8 (METHODS.md section 1)."""
    splits = {"train": make_arrays(40)}
    for precision in ("float16", "uint8"):
        build_store(tmp_path / precision, splits, class_names=CLASSES, precision=precision, progress=False)
    clean = splits["train"].images.astype(np.float32) / 255
    ids = np.arange(40)
    kept = open_store(tmp_path / "float16").split("train").read(ids, 2) - clean
    rounded = open_store(tmp_path / "uint8").split("train").read(ids, 2) - clean
    interior = (clean > 0.01) & (clean < 0.99)
    assert np.abs(np.abs(kept[interior]) - 0.001).max() < 1e-5
    assert np.mean(np.abs(rounded[interior]) < 1e-6) > 0.9
    manifest = open_store(tmp_path / "uint8").manifest
    assert manifest.precision == "uint8"
    assert manifest.splits["train"].stats["tiny"].max_abs_error == pytest.approx(0.001, abs=1e-4)


def test_backends_return_same_samples_for_same_ids(hdf5_store, tmp_path):
    path, _ = hdf5_store
    convert_store(path, tmp_path / "wds", "webdataset", progress=False)
    convert_store(tmp_path / "wds", tmp_path / "gz", "hdf5", compression="gzip", progress=False)
    stores = [open_store(p) for p in (path, tmp_path / "wds", tmp_path / "gz")]
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 70, size=50)
    variants = rng.integers(0, 3, size=50)
    reads = [s.split("train").read(ids, variants) for s in stores]
    np.testing.assert_array_equal(reads[0], reads[1])
    np.testing.assert_array_equal(reads[0], reads[2])
    assert stores[0].manifest.fingerprint == stores[1].manifest.fingerprint
    assert verify_store(tmp_path / "gz").ok


def test_shards_are_byte_identical_when_rewritten(tmp_path):
    for backend in ("hdf5", "webdataset"):
        sums = []
        for attempt in range(2):
            write_test_store(tmp_path / f"{backend}{attempt}", backend=backend)
            manifest = open_store(tmp_path / f"{backend}{attempt}").manifest
            sums.append([s.sha256 for s in manifest.splits["train"].shards])
        assert sums[0] == sums[1]


def test_failed_rows_are_recorded_and_never_stored_as_nan(tmp_path):
    arrays = make_arrays(20)
    arrays.variants["noise"][[2, 5]] = np.nan
    build_store(tmp_path / "s", {"train": arrays}, class_names=CLASSES, progress=False)
    store = open_store(tmp_path / "s")
    reader = store.split("train")
    assert np.flatnonzero(reader.failed()[:, 1]).tolist() == [2, 5]
    assert store.manifest.splits["train"].stats["noise"].failed == 2
    values = reader.read(np.arange(20), 1)
    assert np.isfinite(values).all()
    np.testing.assert_array_equal(values[2], arrays.images[2] / np.float32(255))


def test_directory_without_manifest_is_refused(hdf5_store):
    path, _ = hdf5_store
    (path / MANIFEST_NAME).rename(path / "elsewhere.json")
    with pytest.raises(StoreError, match="not a finished store"):
        open_store(path)


def test_existing_store_is_not_overwritten(hdf5_store):
    path, splits = hdf5_store
    with pytest.raises(StoreError, match="already exists"):
        build_store(path, splits, class_names=CLASSES, progress=False)


def _first_shard(path: Path) -> Path:
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    return path / manifest["splits"]["train"]["shards"][1]["name"]


@pytest.mark.parametrize("backend", ["hdf5", "webdataset"])
def test_verify_detects_flipped_byte(tmp_path, backend):
    write_test_store(tmp_path / "s", backend=backend)
    shard = _first_shard(tmp_path / "s")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    report = verify_store(tmp_path / "s")
    assert not report.ok and shard.name in report.problems[0] and "sha256" in report.problems[0]
    with pytest.raises(IntegrityError, match=shard.name):
        open_store(tmp_path / "s").split("train").read(np.arange(70), 1)


def test_a_flipped_pixel_in_a_webdataset_shard_is_a_sha256_error(tmp_path: Path) -> None:
    """A byte flipped inside an image's .npy payload leaves a valid tar of valid arrays: only the sha256
    check can tell. (A flip at a fixed offset may land in a tar header, which parsing refuses anyway.)"""
    from advpipe.sampler.streaming import StreamingVariantDataset

    write_test_store(tmp_path / "s", backend="webdataset")
    shard = _first_shard(tmp_path / "s")
    problem = f"shard {shard.relative_to(tmp_path / 's').as_posix()}: sha256 does not match the manifest"
    with tarfile.open(shard) as tar:  # the standard library's parser, not advpipe's
        member = next(m for m in tar.getmembers() if m.name.endswith(".clean.npy"))
        image = np.load(io.BytesIO(tar.extractfile(member).read()))
    assert image.dtype == np.uint8 and image.shape == (3, 8, 8)
    at = member.offset_data + member.size - 1  # the last pixel: a C-ordered .npy payload ends with its data
    index = np.array([int(member.name.split(".")[0])])
    intact = open_store(tmp_path / "s").split("train").read(index, 0)
    data = bytearray(shard.read_bytes())
    assert data[at] == image.reshape(-1)[-1]
    data[at] ^= 0x01
    shard.write_bytes(bytes(data))
    # Unchecked, the flip reaches the pixels unnoticed: exactly that one pixel moves by one grey level.
    unchecked = open_store(tmp_path / "s", verify="size").split("train").read(index, 0)
    changed = np.flatnonzero(unchecked != intact)
    assert changed.tolist() == [intact.size - 1]
    assert abs(unchecked.reshape(-1)[-1] - intact.reshape(-1)[-1]) == pytest.approx(1 / 255)
    report = verify_store(tmp_path / "s")
    assert report.problems == [f"{problem} (the file is corrupt)"]
    with pytest.raises(IntegrityError, match=re.escape(problem)):
        open_store(tmp_path / "s").split("train").read(index, 0)
    with pytest.raises(IntegrityError, match=re.escape(problem)):
        StreamingVariantDataset(tmp_path / "s")


@pytest.mark.parametrize("backend", ["hdf5", "webdataset"])
def test_verify_detects_truncated_shard(tmp_path, backend):
    write_test_store(tmp_path / "s", backend=backend)
    shard = _first_shard(tmp_path / "s")
    shard.write_bytes(shard.read_bytes()[:-700])
    report = verify_store(tmp_path / "s")
    assert not report.ok and shard.name in report.problems[0]
    with pytest.raises(IntegrityError, match="truncated"):
        open_store(tmp_path / "s")


def test_verify_detects_missing_shard(hdf5_store):
    path, _ = hdf5_store
    shard = _first_shard(path)
    shard.unlink()
    report = verify_store(path)
    assert not report.ok and "missing" in report.problems[0] and shard.name in report.problems[0]


def test_verify_detects_manifest_count_mismatch(hdf5_store):
    path, _ = hdf5_store
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest["splits"]["train"]["count"] += 1
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    report = verify_store(path)
    assert not report.ok and "count" in report.problems[0]


@pytest.mark.parametrize("backend", ["hdf5", "webdataset"])
def test_verify_names_both_shards_of_a_swapped_pair(tmp_path, backend):
    """Two valid shards of equal size trade places and the manifest's sizes and checksums follow them:
    only the sample ids inside each file show that it holds the other one's images."""
    write_test_store(tmp_path / "s", backend=backend)
    path = tmp_path / "s"
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    first, second = manifest["splits"]["train"]["shards"][:2]
    a, b = path / first["name"], path / second["name"]
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    for record, data in ((first, data_b), (second, data_a)):
        record["bytes"], record["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    report = verify_store(path)
    assert len(report.problems) == 2, report.problems
    assert "sample ids are not 0..31" in report.problems[0] and first["name"] in report.problems[0]
    assert "sample ids are not 32..63" in report.problems[1] and second["name"] in report.problems[1]
    assert report.shards == 5 and report.samples == 70 + 36 - 64


def test_verify_reports_every_damaged_shard(hdf5_store):
    path, _ = hdf5_store
    damaged = ["train/train-00000.h5", "test/test-00001.h5"]
    for name in damaged:
        data = bytearray((path / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (path / name).write_bytes(bytes(data))
    report = verify_store(path)
    assert len(report.problems) == 2, report.problems
    for name in damaged:
        assert [problem for problem in report.problems if name in problem and "sha256" in problem], name
    assert report.shards == 5


def test_manifest_shard_names_cannot_escape_the_store(hdf5_store):
    path, _ = hdf5_store
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest["splits"]["train"]["shards"][0]["name"] = "../../etc/passwd"
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="inside the store"):
        open_store(path)


@pytest.mark.parametrize("backend", ["hdf5", "webdataset"])
def test_readers_never_modify_the_store(tmp_path, backend):
    path = tmp_path / "store"
    write_test_store(path, backend=backend)
    for entry in [path, *path.rglob("*")]:
        os.utime(entry, ns=(10**18, 10**18))  # an old time: any write now moves it, however coarse the clock
    before = tree_state(path)
    store = open_store(path)
    store.split("train").read(np.arange(70), 2)
    store.split("test").failed()
    assert verify_store(path).ok
    convert_store(path, tmp_path / "copy", "webdataset" if backend == "hdf5" else "hdf5", progress=False)
    assert tree_state(path) == before


def test_split_reader_in_dataloader_workers(hdf5_store):
    """Handles open lazily in each worker process; results equal the parent's read."""
    path, splits = hdf5_store
    reader = open_store(path).split("train")

    class Dataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(reader)

        def __getitem__(self, index):
            return torch.from_numpy(reader.read(np.array([index]), 1)[0])

    loader = torch.utils.data.DataLoader(Dataset(), batch_size=16, num_workers=2, persistent_workers=True)
    got = torch.cat(list(loader)).numpy()
    np.testing.assert_array_equal(got, reader.read(np.arange(70), 1))


def test_webdataset_library_reads_our_shards(wds_store):
    path, splits = wds_store
    store = open_store(path)
    urls = [str(path / s.name) for s in store.manifest.splits["train"].shards]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(70)]
    np.testing.assert_array_equal(np.stack([s["clean.npy"] for s in samples]), splits["train"].images)
    assert [s["cls"] for s in samples] == splits["train"].labels.tolist()
    assert samples[0]["variants.npy"].shape == (2, 3, 8, 8)


def _tar_with(member: tarfile.TarInfo, payload: bytes = b"x") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        member.size = len(payload) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    return buffer.getvalue()


@pytest.mark.parametrize("name,kind", [("/etc/x.json", tarfile.REGTYPE), ("../x.json", tarfile.REGTYPE),
                                       ("a/../../x.json", tarfile.REGTYPE), ("x.json", tarfile.SYMTYPE),
                                       ("x.json", tarfile.LNKTYPE)])
def test_unsafe_tar_members_are_refused(name, kind):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = "/etc/passwd" if kind != tarfile.REGTYPE else ""
    with pytest.raises(IntegrityError, match="refused"):
        list(iter_members(_tar_with(info), "evil.tar"))


def test_stores_with_mismatched_variants_across_splits_are_refused(tmp_path):
    splits = {"train": make_arrays(10), "test": make_arrays(10, variants=("noise",))}
    with pytest.raises(StoreError, match="same variants"):
        build_store(tmp_path / "s", splits, class_names=CLASSES, progress=False)
    assert not (tmp_path / "s" / MANIFEST_NAME).exists()


def test_clean_only_store(tmp_path):
    arrays = SplitArrays(images=np.zeros((5, 1, 4, 4), np.uint8), labels=np.arange(5), source_fingerprint="z")
    build_store(tmp_path / "s", {"train": arrays}, class_names=CLASSES, progress=False)
    store = open_store(tmp_path / "s")
    assert store.variants == ["clean"]
    with pytest.raises(StoreError, match="no variant 'fgsm'"):
        store.variant_id("fgsm")
    shutil.rmtree(tmp_path / "s")
