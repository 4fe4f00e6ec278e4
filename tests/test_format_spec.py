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
from collections import Counter
from pathlib import Path, PurePosixPath

import h5py
import numpy as np
import pytest
from conftest import CLASSES, make_arrays

from advpipe.config import SamplerConfig
from advpipe.errors import StoreError
from advpipe.sampler.streaming import StreamingVariantDataset
from advpipe.stores import SplitArrays, build_store, open_store

# --------------------------------------------------------------------------------------------------
# Independent reader (docs/FORMAT.md only)
# --------------------------------------------------------------------------------------------------

SUPPORTED_VERSIONS = (2, 3)
SHIFT_GENERATORS_V2 = ("b1", "b2")
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
    if manifest.get("format_version") not in SUPPORTED_VERSIONS:
        raise FormatError(f"store format version {manifest.get('format_version')} is not supported "
                          f"(this reader reads versions {SUPPORTED_VERSIONS})")
    if manifest["format_version"] == 2:  # section 10: fill in what version 2 lacks
        for column, variant in enumerate(manifest["variants"]):
            variant.update(precision=manifest["precision"], array="variants", column=column,
                           kind="shift" if variant["generator"] in SHIFT_GENERATORS_V2 else "attack")
    check_placement(manifest)
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


def check_placement(manifest: dict) -> None:
    """Section 2.5, rules 5 and 6."""
    store = manifest["precision"]
    columns: dict[str, int] = {}
    for variant in manifest["variants"]:
        precision = variant["precision"]
        if (store == "uint8") != (precision == "uint8"):
            raise FormatError(f"variant {variant['name']}: precision {precision} in a {store} store")
        array = "variants" if precision == store else f"variants_{precision}"
        if (variant["array"], variant["column"]) != (array, columns.get(array, 0)):
            raise FormatError(f"variant {variant['name']} is not placed at {array}[{columns.get(array, 0)}]")
        columns[array] = columns.get(array, 0) + 1


def stacked_arrays(manifest: dict) -> list[str]:
    """The arrays in tar member order: `variants` first, then by first occurrence (rule 6)."""
    names = sorted({v["array"] for v in manifest["variants"]},
                   key=lambda a: (a != "variants", [v["array"] for v in manifest["variants"]].index(a)))
    return names


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


def read_hdf5_shard(path: Path, variants: list[dict], count: int) -> dict:
    out: dict = {"stored": {}, "failed": {}}
    with h5py.File(path, "r") as handle:
        assert handle.attrs["format"] == "advpipe-shard"
        out["ids"] = handle["ids"][()]
        out["labels"] = handle["labels"][()]
        out["clean"] = read_image_dataset(path, handle["clean"])
        if variants:
            arrays = {v["array"]: read_image_dataset(path, handle[v["array"]]) for v in variants}  # (n, k, C, H, W)
            flags = handle["failed"][()]  # (n, V) uint8, manifest order
            assert flags.shape[1] == len(variants)
            assert {name: a.shape[1] for name, a in arrays.items()} == Counter(v["array"] for v in variants)
            for index, variant in enumerate(variants):
                out["stored"][variant["name"]] = arrays[variant["array"]][:, variant["column"]]
                out["failed"][variant["name"]] = flags[:, index] != 0
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


def read_tar_shard(path: Path, variants: list[dict], count: int) -> dict:
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
    names = [v["name"] for v in variants]
    ids, labels, clean = [], [], []
    stored: dict[str, list] = {name: [] for name in names}
    failed: dict[str, list] = {name: [] for name in names}
    for key, members in records:
        meta = json.loads(members["json"])
        assert key == f"{meta['id']:09d}"
        assert int(members["cls"].decode("ascii")) == meta["label"]
        ids.append(meta["id"])
        labels.append(meta["label"])
        clean.append(parse_npy(members["clean.npy"]))
        stacks = {suffix.removesuffix(".npy"): parse_npy(payload) for suffix, payload in members.items()
                  if suffix.startswith("variants")}
        assert sorted(stacks) == sorted({v["array"] for v in variants})
        for variant in variants:
            stored[variant["name"]].append(stacks[variant["array"]][variant["column"]])
            failed[variant["name"]].append(variant["name"] in meta["failed"])
    return {"ids": np.array(ids), "labels": np.array(labels), "clean": np.stack(clean),
            "stored": {n: np.stack(stored[n]) for n in names},
            "failed": {n: np.array(failed[n], dtype=bool) for n in names}}


class IndependentStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.manifest = load_manifest(path)
        self.records = self.manifest["variants"]
        self.variants = ["clean", *(v["name"] for v in self.records)]
        self._shards: dict[tuple[str, int], dict] = {}

    def shard(self, split: str, index: int) -> dict:
        if (split, index) not in self._shards:
            record = self.manifest["splits"][split]["shards"][index]
            path = self.path / record["name"]
            if path.stat().st_size != record["bytes"] or file_sha256(path) != record["sha256"]:
                raise FormatError(f"shard {record['name']} does not match the manifest")
            reader = read_hdf5_shard if self.manifest["backend"] == "hdf5" else read_tar_shard
            self._shards[split, index] = reader(path, self.records, record["stop"] - record["start"])
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
        variant = self.records[variant_id - 1]
        return reconstruct(data["clean"][row], data["stored"][variant["name"]][row], variant["precision"])

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


LAYOUTS = [(b, p, None, {}) for b in ("hdf5", "webdataset") for p in ("float16", "float32", "uint8")]
LAYOUTS += [("hdf5", "float16", "gzip", {}), ("hdf5", "uint8", "lzf", {})]
# variants with their own precision (section 3.3): one stacked array per precision
LAYOUTS += [(b, "float16", None, {"noise": "float32"}) for b in ("hdf5", "webdataset")]
LAYOUTS += [("hdf5", "float32", "gzip", {"tiny": "float16"}), ("webdataset", "float16", None,
                                                                {"noise": "float32", "tiny": "float32"})]


@pytest.mark.parametrize(("backend", "precision", "compression", "own"), LAYOUTS)
def test_independent_reader_matches_advpipe(tmp_path: Path, backend: str, precision: str, compression: str | None,
                                            own: dict[str, str]):
    splits = failing_splits()
    path = tmp_path / "store"
    build_store(path, splits, class_names=CLASSES, backend=backend, precision=precision, compression=compression,
                shard_size=16, progress=False, variant_params={n: {"precision": p} for n, p in own.items()})
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
            assert ours.column(split, "stored", name).dtype == STORED_DTYPE[own.get(name, precision)]

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
        if backend == "webdataset":
            assert_stream_matches(path, split, ours)


def assert_stream_matches(path: Path, split: str, ours: IndependentStore) -> None:
    """The streaming reader (strided tar parsing, one gather per stacked array) returns the spec's pixels."""
    dataset = StreamingVariantDataset(path, split, SamplerConfig(ratio=1.0, seed=1), batch_size=7, shuffle=False)
    drawn = set()
    for batch in dataset:
        for x, index, variant in zip(batch.x.numpy(), batch.index.tolist(), batch.variant.tolist(), strict=True):
            assert np.array_equal(x, ours.read(split, index, variant)), (split, index, variant)
            drawn.add(variant)
    assert drawn == {1, 2}


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


def test_hdf5_layout_with_a_variant_of_its_own_precision(tmp_path: Path):
    splits = failing_splits()
    splits["train"].variants = {"tiny": splits["train"].variants["tiny"], "noise": splits["train"].variants["noise"]}
    del splits["test"]
    build_store(tmp_path / "s", splits, class_names=CLASSES, precision="float32", shard_size=16, progress=False,
                variant_params={"tiny": {"precision": "float16"}})
    manifest = json.loads((tmp_path / "s/manifest.json").read_text())
    assert [(v["name"], v["precision"], v["array"], v["column"]) for v in manifest["variants"]] == [
        ("tiny", "float16", "variants_float16", 0), ("noise", "float32", "variants", 0)]
    with h5py.File(tmp_path / "s/train/train-00000.h5", "r") as handle:
        assert list(handle.attrs["variants"]) == ["tiny", "noise"]
        expected = {"variants": ((16, 1, 3, 8, 8), "float32"), "variants_float16": ((16, 1, 3, 8, 8), "float16"),
                    "failed": ((16, 2), "uint8")}
        for key, (shape, dtype) in expected.items():
            assert (handle[key].shape, handle[key].dtype.name, handle[key].chunks) == (shape, dtype, None)
        assert handle["failed"][5].tolist() == [1, 0] and handle["failed"][3].tolist() == [0, 1]  # manifest order


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


def test_tar_layout_with_variants_of_their_own_precision(tmp_path: Path):
    arrays = make_arrays(16, variants=("noise", "tiny"))
    arrays.variants = {"a": arrays.variants["noise"], "b": arrays.variants["tiny"], "c": arrays.variants["noise"]}
    build_store(tmp_path / "s", {"train": arrays}, class_names=CLASSES, backend="webdataset", precision="float16",
                shard_size=16, progress=False, variant_params={"b": {"precision": "float32"}})
    manifest = load_manifest(tmp_path / "s")
    assert stacked_arrays(manifest) == ["variants", "variants_float32"]
    with tarfile.open(tmp_path / "s/train/train-00000.tar", "r:") as tar:
        assert [m.name for m in tar.getmembers()][:5] == [
            "000000000.cls", "000000000.json", "000000000.clean.npy", "000000000.variants.npy",
            "000000000.variants_float32.npy"]
        stacked = parse_npy(tar.extractfile("000000000.variants.npy").read())
        own = parse_npy(tar.extractfile("000000000.variants_float32.npy").read())
    assert (stacked.shape, stacked.dtype, own.shape, own.dtype) == ((2, 3, 8, 8), "<f2", (1, 3, 8, 8), "<f4")
    base = to_float(arrays.images[0])
    np.testing.assert_allclose(base + stacked[1].astype(np.float32), arrays.variants["c"][0], atol=1e-3)  # column 1
    np.testing.assert_allclose(base + own[0], arrays.variants["b"][0], atol=1e-7)


def v2_manifest(manifest: dict, generators: dict[str, str]) -> dict:
    """What a version 2 writer wrote for this store: no per-variant placement or kind, no new statistics."""
    new_stats = ("fooled_fresh", "success_rate_fresh", "lost", "seconds", "images_per_second", "fallbacks")
    variants = [{k: v[k] for k in ("name", "generator", "backend", "params", "fingerprint")} for v in
                manifest["variants"]]
    for variant in variants:
        variant["generator"] = generators.get(variant["name"], variant["generator"])
    splits = {name: {**split, "stats": {v: {k: x for k, x in stats.items() if k not in new_stats}
                                        for v, stats in split["stats"].items()}}
              for name, split in manifest["splits"].items()}
    return {**manifest, "format_version": 2, "variants": variants, "splits": splits}


@pytest.mark.parametrize("backend", ["hdf5", "webdataset"])
def test_version_2_stores_are_still_read(tmp_path: Path, backend: str):
    splits = failing_splits()
    path = tmp_path / "store"
    build_store(path, splits, class_names=CLASSES, backend=backend, shard_size=16, progress=False)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(v2_manifest(manifest, {"tiny": "b2"})))
    ours, theirs = IndependentStore(path), open_store(path)
    assert theirs.manifest.format_version == 2
    assert [(v.kind, v.precision, v.array, v.column) for v in theirs.manifest.variants] == [
        ("attack", "float16", "variants", 0), ("shift", "float16", "variants", 1)]
    assert theirs.manifest.splits["train"].stats["noise"].lost is None  # not recorded before version 3
    reader = theirs.split("train")
    for v in range(3):
        mine = np.stack([ours.read("train", i, v) for i in range(40)])
        assert np.array_equal(mine, reader.read(np.arange(40), v))


def test_misplaced_or_mixed_variants_are_refused(tmp_path: Path):
    path = tmp_path / "store"
    build_store(path, failing_splits(), class_names=CLASSES, shard_size=16, progress=False,
                variant_params={"noise": {"precision": "float32"}})
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["variants"][1]["column"] = 1  # tiny is column 0 of `variants`: the only float16 variant
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="tiny is not placed at variants"):
        IndependentStore(path)
    with pytest.raises(StoreError, match="variant 'tiny' is placed at variants.1."):
        open_store(path)
    manifest["variants"][1]["column"] = 0
    manifest["precision"] = "uint8"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="precision float32 in a uint8 store"):
        IndependentStore(path)
    with pytest.raises(StoreError, match="in a uint8 store"):
        open_store(path)


def test_unfinished_or_unknown_versions_are_refused(tmp_path: Path):
    path = tmp_path / "store"
    build_store(path, {"train": make_arrays(8)}, class_names=CLASSES, shard_size=4, progress=False)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 4}))
    with pytest.raises(FormatError, match="format version 4 is not supported"):
        IndependentStore(path)
    with pytest.raises(StoreError, match="format version 4 is not supported.*reads versions 2 and 3"):
        open_store(path)
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(Exception, match="version 1 .* no longer read.*--force"):
        open_store(path)
    (path / "manifest.json").unlink()
    with pytest.raises(FormatError, match="not a finished store"):
        IndependentStore(path)
    with pytest.raises(Exception, match="not a finished store"):
        open_store(path)


def test_variant_kind_is_the_generator_class_kind(tmp_path: Path):
    """The manifest's `kind` comes from the generator class: b1/b2 shift, attacks and Gaussian noise attack."""
    from conftest import digits_config

    from advpipe.config import config_from_dict
    from advpipe.pipeline.generators import generator_class
    from advpipe.pipeline.plan import variant_plans

    variants = {"gaussian": {}, "fgsm": {}, "cw": {"backend": "native"}, "b1": {}, "b2": {},
                "turn": {"generator": "b1"}}
    plans = variant_plans(config_from_dict(digits_config(tmp_path, variants=variants)))
    assert {p.name: p.kind for p in plans} == {"gaussian": "attack", "fgsm": "attack", "cw": "attack", "b1": "shift",
                                               "b2": "shift", "turn": "shift"}
    assert generator_class("deepfool").kind == "attack" and generator_class("style").kind == "attack"
