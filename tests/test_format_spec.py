"""docs/FORMAT.md is complete enough to read a store without advpipe.

The reader below is written only from that document: it uses json, hashlib,
tarfile, h5py and numpy, never `stores` or `advpipe`. advpipe is used only to
build the test stores and to read them a second time for comparison.
"""

from __future__ import annotations

import ast
import bisect
import hashlib
import json
import re
import tarfile
from pathlib import Path, PurePosixPath

import h5py
import numpy as np
import pytest
from conftest import CLASSES, make_arrays

from advpipe.stores import SplitArrays, build_store, open_store

# --------------------------------------------------------------------------------------------------
# Independent reader (docs/FORMAT.md only)
# --------------------------------------------------------------------------------------------------

SUPPORTED_VERSION = 2
EXTENSIONS = {"hdf5": "h5", "webdataset": "tar"}
STORED_DTYPE = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "uint8": np.dtype("u1")}


class FormatError(Exception):
    pass


def safe_name(name: str) -> str:
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name or name.startswith("~"):
        raise FormatError(f"unsafe shard name {name!r}")
    return name


def load_manifest(store: Path) -> dict:
    path = store / "manifest.json"
    if not path.is_file():
        raise FormatError(f"{store}: not a finished store (no manifest.json)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or manifest.get("format") != "advpipe-store":
        raise FormatError(f"{path}: not an advpipe store manifest")
    if manifest.get("format_version") != SUPPORTED_VERSION:
        raise FormatError(f"store format version {manifest.get('format_version')} is not supported "
                          f"(this reader reads version {SUPPORTED_VERSION})")
    for split in manifest["splits"].values():
        position = 0
        for shard in split["shards"]:
            safe_name(shard["name"])
            if shard["start"] != position or shard["stop"] <= shard["start"]:
                raise FormatError(f"shard {shard['name']} is not contiguous with the previous one")
            position = shard["stop"]
        if position != split["count"]:
            raise FormatError("shards do not cover the split")
    return manifest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def to_float(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) / np.float32(255)


def reconstruct(clean: np.ndarray, stored: np.ndarray, precision: str) -> np.ndarray:
    if precision == "uint8":
        return to_float(stored)
    return np.clip(to_float(clean) + stored.astype(np.float32), np.float32(0), np.float32(1))


def parse_npy(payload: bytes) -> np.ndarray:
    if payload[:8] != b"\x93NUMPY\x01\x00":
        raise FormatError("expected an .npy payload of format version 1.0")
    header_len = int.from_bytes(payload[8:10], "little")
    header = ast.literal_eval(payload[10 : 10 + header_len].decode("latin-1"))
    if header["fortran_order"]:
        raise FormatError("npy payload is not C-ordered")
    dtype = np.dtype(header["descr"])
    return np.frombuffer(payload, dtype=dtype, offset=10 + header_len).reshape(header["shape"])


def read_hdf5_shard(path: Path, variants: list[str], count: int) -> dict:
    out: dict = {"stored": {}, "failed": {}}
    with h5py.File(path, "r") as handle:
        assert handle.attrs["format"] == "advpipe-shard"
        out["ids"] = handle["ids"][()]
        out["labels"] = handle["labels"][()]
        out["clean"] = read_image_dataset(path, handle["clean"])
        if variants:
            stacked = read_image_dataset(path, handle["variants"])  # (n, V, C, H, W), manifest order
            flags = handle["failed"][()]  # (n, V) uint8
            assert stacked.shape[1] == flags.shape[1] == len(variants)
            for v, name in enumerate(variants):
                out["stored"][name] = stacked[:, v]
                out["failed"][name] = flags[:, v] != 0
    for key in ("ids", "labels", "clean"):
        assert len(out[key]) == count
    return out


def read_image_dataset(path: Path, dataset: h5py.Dataset) -> np.ndarray:
    """Uncompressed image datasets are contiguous: map them from the file at the dataset's offset."""
    if dataset.chunks is None:
        offset = dataset.id.get_offset()
        assert offset is not None
        mapped = np.memmap(path, mode="r", dtype=dataset.dtype, offset=offset, shape=dataset.shape)
        return np.array(mapped)
    return dataset[()]


def read_tar_shard(path: Path, variants: list[str], count: int) -> dict:
    records: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path, "r:") as tar:
        for member in tar.getmembers():
            parts = PurePosixPath(member.name)
            if not member.isreg() or parts.is_absolute() or ".." in parts.parts:
                raise FormatError(f"unsafe member {member.name!r}")
            key, _, suffix = parts.name.partition(".")
            if not records or records[-1][0] != key:
                records.append((key, {}))
            records[-1][1][suffix] = tar.extractfile(member).read()
    assert len(records) == count
    ids, labels, clean = [], [], []
    stored: dict[str, list] = {name: [] for name in variants}
    failed: dict[str, list] = {name: [] for name in variants}
    for key, members in records:
        meta = json.loads(members["json"])
        assert key == f"{meta['id']:09d}"
        assert int(members["cls"].decode("ascii")) == meta["label"]
        ids.append(meta["id"])
        labels.append(meta["label"])
        clean.append(parse_npy(members["clean.npy"]))
        if variants:
            stack = parse_npy(members["variants.npy"])
            assert stack.shape[0] == len(variants)
            for v, name in enumerate(variants):
                stored[name].append(stack[v])
                failed[name].append(name in meta["failed"])
    return {"ids": np.array(ids), "labels": np.array(labels), "clean": np.stack(clean),
            "stored": {n: np.stack(stored[n]) for n in variants},
            "failed": {n: np.array(failed[n], dtype=bool) for n in variants}}


class IndependentStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.manifest = load_manifest(path)
        self.precision = self.manifest["precision"]
        self.variants = ["clean", *(v["name"] for v in self.manifest["variants"])]
        self._shards: dict[tuple[str, int], dict] = {}

    def shard(self, split: str, index: int) -> dict:
        if (split, index) not in self._shards:
            record = self.manifest["splits"][split]["shards"][index]
            path = self.path / record["name"]
            if path.stat().st_size != record["bytes"] or file_sha256(path) != record["sha256"]:
                raise FormatError(f"shard {record['name']} does not match the manifest")
            reader = read_hdf5_shard if self.manifest["backend"] == "hdf5" else read_tar_shard
            self._shards[split, index] = reader(path, self.variants[1:], record["stop"] - record["start"])
        return self._shards[split, index]

    def locate(self, split: str, index: int) -> tuple[int, int]:
        starts = [s["start"] for s in self.manifest["splits"][split]["shards"]]
        shard = bisect.bisect_right(starts, index) - 1
        return shard, index - starts[shard]

    def read(self, split: str, index: int, variant_id: int) -> np.ndarray:
        shard, row = self.locate(split, index)
        data = self.shard(split, shard)
        if variant_id == 0:
            return to_float(data["clean"][row])
        name = self.variants[variant_id]
        return reconstruct(data["clean"][row], data["stored"][name][row], self.precision)

    def column(self, split: str, key: str, variant: str | None = None) -> np.ndarray:
        shards = range(len(self.manifest["splits"][split]["shards"]))
        parts = [self.shard(split, i)[key] if variant is None else self.shard(split, i)[key][variant] for i in shards]
        return np.concatenate(parts)


# --------------------------------------------------------------------------------------------------
# Tests: the independent reader against advpipe's own
# --------------------------------------------------------------------------------------------------

FAILURES = {"train": {"noise": [3, 17], "tiny": [5]}, "test": {"noise": [0]}}


def failing_splits() -> dict[str, SplitArrays]:
    """Two splits whose variants contain whole-NaN rows and single non-finite pixels."""
    splits = {"train": make_arrays(40, seed=0), "test": make_arrays(21, seed=1)}
    splits["train"].variants["noise"][3] = np.nan
    splits["train"].variants["noise"][17, 1, 2, 3] = np.inf
    splits["train"].variants["tiny"][5, 0, 0, 0] = -np.inf
    splits["test"].variants["noise"][0] = np.nan
    return splits


def expected_error(arrays: SplitArrays, name: str, decoded: np.ndarray) -> float:
    """max |decoded - variant| after failures are replaced by the clean image and values clipped."""
    variant = arrays.variants[name].astype(np.float32)
    failed = ~np.isfinite(variant).reshape(len(variant), -1).all(axis=1)
    variant = np.where(failed[:, None, None, None], to_float(arrays.images), variant)
    return float(np.abs(decoded - np.clip(variant, 0, 1)).max())


LAYOUTS = [(b, p, None) for b in ("hdf5", "webdataset") for p in ("float16", "float32", "uint8")]
LAYOUTS += [("hdf5", "float16", "gzip"), ("hdf5", "uint8", "lzf")]


@pytest.mark.parametrize(("backend", "precision", "compression"), LAYOUTS)
def test_independent_reader_matches_advpipe(tmp_path: Path, backend: str, precision: str, compression: str | None):
    splits = failing_splits()
    path = tmp_path / "store"
    build_store(path, splits, class_names=CLASSES, backend=backend, precision=precision, compression=compression,
                shard_size=16, progress=False)
    ours, theirs = IndependentStore(path), open_store(path)
    assert ours.variants == theirs.variants == ["clean", "noise", "tiny"]
    manifest = ours.manifest
    assert manifest["image_shape"] == [3, 8, 8]
    assert (manifest["backend"], manifest["precision"], manifest["compression"]) == (backend, precision, compression)

    for split, arrays in splits.items():
        record, reader = manifest["splits"][split], theirs.split(split)
        count = record["count"]
        assert count == len(arrays.images) == len(reader)
        for index, shard in enumerate(record["shards"]):
            assert shard["name"] == f"{split}/{split}-{index:05d}.{EXTENSIONS[backend]}"
            file = path / shard["name"]
            assert file.stat().st_size == shard["bytes"]
            assert file_sha256(file) == shard["sha256"]

        assert np.array_equal(ours.column(split, "ids"), np.arange(count))
        labels = ours.column(split, "labels")
        assert np.array_equal(labels, reader.labels)
        assert np.array_equal(labels, arrays.labels)
        assert np.array_equal(ours.column(split, "clean"), arrays.images)

        their_failed = reader.failed()
        assert not their_failed[:, 0].any()
        for v, name in enumerate(ours.variants[1:], start=1):
            failed = ours.column(split, "failed", name)
            assert np.array_equal(failed, their_failed[:, v])
            assert sorted(np.flatnonzero(failed)) == FAILURES[split].get(name, [])
            assert ours.column(split, "stored", name).dtype == STORED_DTYPE[precision]

        everything = np.arange(count)
        clean = to_float(arrays.images)
        for v, name in enumerate(ours.variants):
            mine = np.stack([ours.read(split, int(i), v) for i in everything])
            theirs_v = reader.read(everything, v)
            assert mine.dtype == theirs_v.dtype == np.float32
            assert np.array_equal(mine, theirs_v), f"{split}/{name}: reconstructions differ"
            if v == 0:
                assert np.array_equal(mine, clean)
                continue
            failed = ours.column(split, "failed", name)
            assert np.array_equal(mine[failed], clean[failed]), "a failed image must read back as the clean one"
            stats = record["stats"][name]
            delta = (mine - clean).reshape(count, -1)[~failed]
            l2, linf = np.linalg.norm(delta, axis=1), np.abs(delta).max(axis=1)
            assert (stats["count"], stats["failed"]) == (count, int(failed.sum()))
            assert (stats["clean_correct"], stats["fooled"], stats["success_rate"]) == (0, 0, None)
            assert stats["mean_l2"] == pytest.approx(float(l2.mean()), rel=1e-5)
            assert stats["max_l2"] == pytest.approx(float(l2.max()), rel=1e-6)
            assert stats["mean_linf"] == pytest.approx(float(linf.mean()), rel=1e-5)
            assert stats["max_linf"] == pytest.approx(float(linf.max()), rel=1e-6)
            assert stats["max_abs_error"] == pytest.approx(expected_error(arrays, name, mine), rel=1e-6, abs=1e-12)


def test_hdf5_layout(tmp_path: Path):
    path = tmp_path / "store"
    build_store(path, failing_splits(), class_names=CLASSES, precision="float16", shard_size=16, progress=False)
    build_store(tmp_path / "gz", failing_splits(), class_names=CLASSES, compression="gzip", shard_size=16,
                progress=False)
    with h5py.File(path / "train/train-00001.h5", "r") as handle:
        attrs = handle.attrs
        assert (attrs["format"], attrs["split"], int(attrs["start"])) == ("advpipe-shard", "train", 16)
        assert list(attrs["variants"]) == ["noise", "tiny"]
        expected = {"ids": ((16,), "int64"), "labels": ((16,), "int64"), "clean": ((16, 3, 8, 8), "uint8"),
                    "variants": ((16, 2, 3, 8, 8), "float16"), "failed": ((16, 2), "uint8")}
        for key, (shape, dtype) in expected.items():
            dataset = handle[key]
            assert (dataset.shape, dataset.dtype.name, dataset.chunks) == (shape, dtype, None)
            assert dataset.id.get_offset() is not None
    with h5py.File(tmp_path / "gz/train/train-00000.h5", "r") as handle:
        for key, chunks in (("clean", (16, 3, 8, 8)), ("variants", (16, 2, 3, 8, 8))):
            dataset = handle[key]
            assert (dataset.chunks, dataset.compression, dataset.shuffle) == (chunks, "gzip", True)
        assert handle["ids"].chunks is None and handle["failed"].chunks is None


def test_tar_layout(tmp_path: Path):
    path, splits = tmp_path / "store", failing_splits()
    build_store(path, splits, class_names=CLASSES, backend="webdataset", precision="float16", shard_size=16,
                progress=False)
    shard = path / "train/train-00000.tar"
    data = shard.read_bytes()
    assert len(data) % 512 == 0 and data[-1024:] == bytes(1024)
    with tarfile.open(shard, "r:") as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names[:8] == ["000000000.cls", "000000000.json", "000000000.clean.npy", "000000000.variants.npy",
                             "000000001.cls", "000000001.json", "000000001.clean.npy", "000000001.variants.npy"]
        assert len(names) == 4 * 16
        for member in members:
            assert (member.type, member.mode, member.mtime, member.uid, member.gid, member.uname, member.gname) == (
                tarfile.REGTYPE, 0o444, 0, 0, 0, "", "")
        meta = tar.extractfile("000000003.json").read()
        assert meta == json.dumps({"id": 3, "label": int(splits["train"].labels[3]), "failed": ["noise"]},
                                  separators=(",", ":")).encode()
        assert tar.extractfile("000000003.cls").read() == str(splits["train"].labels[3]).encode()
        payload = tar.extractfile("000000003.variants.npy").read()
    assert data[257:265] == b"ustar\x0000"
    assert re.match(rb"^\x93NUMPY\x01\x00", payload)
    assert parse_npy(payload).shape == (2, 3, 8, 8) and parse_npy(payload).dtype == np.dtype("<f2")
    assert (10 + int.from_bytes(payload[8:10], "little")) % 64 == 0


def test_unfinished_or_unknown_versions_are_refused(tmp_path: Path):
    path = tmp_path / "store"
    build_store(path, {"train": make_arrays(8)}, class_names=CLASSES, shard_size=4, progress=False)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 3}))
    with pytest.raises(FormatError, match="format version 3 is not supported"):
        IndependentStore(path)
    with pytest.raises(Exception, match="format version 3 is not supported"):
        open_store(path)
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(Exception, match="version 1 .* no longer read.*--force"):
        open_store(path)
    (path / "manifest.json").unlink()
    with pytest.raises(FormatError, match="not a finished store"):
        IndependentStore(path)
    with pytest.raises(Exception, match="not a finished store"):
        open_store(path)
