"""A store is someone else's input: nothing in it may reach outside it, and every bad store is one error of ours.

One case per class of hostile store (docs/FORMAT.md, "What a reader refuses"). Each shard is
re-signed in the manifest after it is tampered with, so its size and sha256 match: these are
stores a checksum cannot catch, made by someone who controls the whole store.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_test_store

from advpipe.cli import main
from advpipe.errors import IntegrityError, StoreError
from advpipe.sampler.streaming import StreamingVariantDataset
from advpipe.stores import manifest as manifest_module
from advpipe.stores import open_store, read_manifest, verify_store
from advpipe.stores.manifest import MANIFEST_NAME
from advpipe.stores.tar import iter_members

H5_SHARD = "train/train-00000.h5"
TAR_SHARD = "train/train-00000.tar"


def resign(store: Path, name: str) -> None:
    """Record shard `name`'s current size and sha256 in the manifest, as a store's author could."""
    manifest = json.loads((store / MANIFEST_NAME).read_text())
    data = (store / name).read_bytes()
    for split in manifest["splits"].values():
        for record in split["shards"]:
            if record["name"] == name:
                record["bytes"], record["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (store / MANIFEST_NAME).write_text(json.dumps(manifest))


def edit_manifest(store: Path, change: Callable[[dict], None]) -> None:
    manifest = json.loads((store / MANIFEST_NAME).read_text())
    change(manifest)
    (store / MANIFEST_NAME).write_text(json.dumps(manifest))


def rebuild_h5(store: Path, make: Callable[[h5py.File, dict[str, np.ndarray]], None]) -> None:
    """Rewrite the first HDF5 shard: `make` writes the datasets (given the originals' data) into a fresh file."""
    path = store / H5_SHARD
    with h5py.File(path, "r") as handle:
        datasets = {key: handle[key][()] for key in handle}
    path.unlink()
    with h5py.File(path, "w") as handle:
        make(handle, datasets)
    resign(store, H5_SHARD)


def copy_except(skip: set[str]) -> Callable[[h5py.File, dict[str, np.ndarray]], None]:
    def write(handle: h5py.File, datasets: dict[str, np.ndarray]) -> None:
        for key, data in datasets.items():
            if key not in skip:
                handle.create_dataset(key, data=data)
    return write


def refused_everywhere(store: Path, match: str, shard: str = H5_SHARD) -> None:
    """`verify` names the shard and the problem; a reader raises IntegrityError (exit 3) naming it."""
    report = verify_store(store)
    assert not report.ok and len(report.problems) == 1, report.problems
    assert report.problems[0].startswith(f"shard {shard}: ") and re.search(match, report.problems[0]), report.problems
    for verify in ("checksum", "none"):
        with pytest.raises(IntegrityError, match=re.escape(shard)) as caught:
            open_store(store, verify=verify).split("train").read(np.arange(3), 1)
        assert re.search(match, str(caught.value)) and caught.value.exit_code == 3


@pytest.fixture
def h5store(tmp_path: Path) -> Path:
    write_test_store(tmp_path / "store")
    return tmp_path / "store"


@pytest.fixture
def tarstore(tmp_path: Path) -> Path:
    write_test_store(tmp_path / "store", backend="webdataset")
    return tmp_path / "store"


# HDF5: data from outside the shard --------------------------------------------------------------------------------


def test_hdf5_external_storage_is_refused(h5store, tmp_path):
    outside = tmp_path / "outside.bin"

    def make(handle, datasets):
        copy_except({"labels"})(handle, datasets)
        labels = datasets["labels"]
        outside.write_bytes(labels.tobytes())
        handle.create_dataset("labels", shape=labels.shape, dtype=labels.dtype,
                              external=[(str(outside), 0, labels.nbytes)])

    rebuild_h5(h5store, make)
    refused_everywhere(h5store, "stored in external files")


def test_hdf5_external_link_is_refused(h5store, tmp_path):
    with h5py.File(tmp_path / "outside.h5", "w") as other, h5py.File(h5store / H5_SHARD, "r") as shard:
        other.create_dataset("labels", data=shard["labels"][()])

    def make(handle, datasets):
        copy_except({"labels"})(handle, datasets)
        handle["labels"] = h5py.ExternalLink(str(tmp_path / "outside.h5"), "/labels")

    rebuild_h5(h5store, make)
    refused_everywhere(h5store, "external or user-defined link")


def test_hdf5_soft_link_through_an_external_link_is_refused(h5store, tmp_path):
    with h5py.File(tmp_path / "outside.h5", "w") as other, h5py.File(h5store / H5_SHARD, "r") as shard:
        other.create_dataset("group/labels", data=shard["labels"][()])

    def make(handle, datasets):
        copy_except({"labels"})(handle, datasets)
        handle["elsewhere"] = h5py.ExternalLink(str(tmp_path / "outside.h5"), "/group")
        handle["labels"] = h5py.SoftLink("/elsewhere/labels")

    rebuild_h5(h5store, make)
    refused_everywhere(h5store, "external or user-defined link")


def test_hdf5_virtual_dataset_is_refused(h5store, tmp_path):
    with h5py.File(tmp_path / "outside.h5", "w") as other, h5py.File(h5store / H5_SHARD, "r") as shard:
        other.create_dataset("labels", data=shard["labels"][()])

    def make(handle, datasets):
        copy_except({"labels"})(handle, datasets)
        labels = datasets["labels"]
        layout = h5py.VirtualLayout(shape=labels.shape, dtype=labels.dtype)
        layout[:] = h5py.VirtualSource(str(tmp_path / "outside.h5"), "labels", shape=labels.shape)
        handle.create_virtual_dataset("labels", layout)

    rebuild_h5(h5store, make)
    refused_everywhere(h5store, "virtual dataset")


def test_hdf5_soft_links_inside_the_file_are_read(h5store):
    """A soft link to elsewhere in the same file reaches nothing outside it: read as the data it names."""
    expected = open_store(h5store).split("train").read(np.arange(70), 2)

    def make(handle, datasets):
        copy_except({"labels", "clean"})(handle, datasets)
        handle.create_dataset("kept/labels", data=datasets["labels"])
        handle.create_dataset("kept/deeper/clean", data=datasets["clean"])
        handle["labels"] = h5py.SoftLink("/kept/labels")
        handle["kept/alias"] = h5py.SoftLink("deeper")  # relative: resolved from the group holding the link
        handle["clean"] = h5py.SoftLink("/kept/alias/clean")

    rebuild_h5(h5store, make)
    assert verify_store(h5store).ok
    np.testing.assert_array_equal(open_store(h5store).split("train").read(np.arange(70), 2), expected)


@pytest.mark.timeout(60)
def test_hdf5_soft_link_loop_is_refused(h5store):
    def make(handle, datasets):
        copy_except({"labels"})(handle, datasets)
        handle["labels"] = h5py.SoftLink("/loop")
        handle["loop"] = h5py.SoftLink("/labels")

    rebuild_h5(h5store, make)
    refused_everywhere(h5store, "soft links")


# HDF5: datasets that are not what the format says ----------------------------------------------------------------


@pytest.mark.parametrize("key,data", [
    ("labels", lambda d: d.astype(np.float64)),
    ("labels", lambda d: np.array([str(x) for x in d], dtype=h5py.string_dtype())),
    ("labels", lambda d: np.array([(x, x) for x in d], dtype=[("a", "<i8"), ("b", "<i8")])),
    ("ids", lambda d: d.astype(np.int32)),
    ("failed", lambda d: d.astype(bool)),
], ids=["float-labels", "string-labels", "compound-labels", "int32-ids", "bool-failed"])
def test_hdf5_dataset_of_another_dtype_is_refused(h5store, key, data):
    def make(handle, datasets):
        copy_except({key})(handle, datasets)
        handle.create_dataset(key, data=data(datasets[key]))

    rebuild_h5(h5store, make)
    refused_everywhere(h5store, f"dataset '{key}' is .*, the format and manifest say")


@pytest.mark.parametrize("key,data,match", [
    ("labels", lambda d: np.stack([d, d], axis=1), r"the format and manifest say int64 \(\)"),
    ("ids", lambda d: d[0], "holds no samples"),
    ("failed", lambda d: np.concatenate([d, d], axis=1), r"the format and manifest say uint8 \(2,\)"),
    ("variants", lambda d: d[:, :, :, :4], r"the format and manifest say float16 \(2, 3, 8, 8\)"),
    ("clean", lambda d: d[:-1], "holds 31 samples, manifest says 32"),
], ids=["labels-2d", "ids-scalar", "failed-wide", "variants-narrow", "clean-short"])
def test_hdf5_dataset_of_another_shape_is_refused(h5store, key, data, match):
    def make(handle, datasets):
        copy_except({key})(handle, datasets)
        handle.create_dataset(key, data=data(datasets[key]))

    rebuild_h5(h5store, make)
    refused_everywhere(h5store, re.escape(f"dataset '{key}' ") + ".*" + match)


@pytest.mark.parametrize("label", [10, -1])
def test_labels_outside_the_classes_are_refused_by_readers(h5store, label):
    """A label past the class list would reach the loss as an index (a traceback deep in torch)."""
    def make(handle, datasets):
        copy_except({"labels"})(handle, datasets)
        handle.create_dataset("labels", data=np.where(np.arange(32) == 5, label, datasets["labels"]))

    rebuild_h5(h5store, make)
    refused_everywhere(h5store, r"labels outside \[0, 10\)")


def test_hdf5_filter_the_format_does_not_allow_is_refused(h5store):
    def make(handle, datasets):
        copy_except({"clean"})(handle, datasets)
        handle.create_dataset("clean", data=datasets["clean"], fletcher32=True)

    rebuild_h5(h5store, make)
    refused_everywhere(h5store, r"uses HDF5 filters \[3\]")


def test_hdf5_data_past_the_end_of_the_file_is_refused(h5store):
    """A dataset whose recorded offset and size run past the file, whose superblock says it is whole: one error."""
    rebuild_h5(h5store, lambda handle, datasets: [handle.create_dataset(key, data=datasets[key]) for key in
                                                  ("ids", "labels", "failed", "variants", "clean")])  # clean last
    path = h5store / H5_SHARD
    data = bytearray(path.read_bytes()[:-100])
    assert data[8] == 0  # superblock version 0: the end-of-file address is the 8 bytes at 40
    data[40:48] = len(data).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    resign(h5store, H5_SHARD)
    refused_everywhere(h5store, r"malformed HDF5 \(KeyError\(.*file corruption")  # HDF5 checks it on opening


def test_hdf5_shard_of_another_shape_is_exit_3_naming_it(h5store, capsys):
    def make(handle, datasets):
        copy_except({"labels"})(handle, datasets)
        handle.create_dataset("labels", data=np.stack([datasets["labels"]] * 2, axis=1))

    rebuild_h5(h5store, make)
    assert main(["verify", str(h5store)]) == 3
    err = capsys.readouterr().err
    assert f"FAIL shard {H5_SHARD}: dataset 'labels' is int64 (2,)" in err and "Traceback" not in err


# Local files: symbolic links out, FIFOs, directories -------------------------------------------------------------


def test_shard_symlinked_outside_the_store_is_refused(h5store, tmp_path):
    outside = tmp_path / "outside.h5"
    outside.write_bytes((h5store / H5_SHARD).read_bytes())
    (h5store / H5_SHARD).unlink()
    (h5store / H5_SHARD).symlink_to(outside)
    refused_everywhere(h5store, "leads outside the store")
    with pytest.raises(IntegrityError, match=f"shard {H5_SHARD}: leads outside the store"):
        open_store(h5store, verify="size")  # on open, before any byte is read


def test_links_inside_the_store_are_followed(tmp_path):
    """A shard linked to another file of the store, and a store reached through a link, reach nothing outside."""
    write_test_store(tmp_path / "real")
    (tmp_path / "real" / "copy.h5").write_bytes((tmp_path / "real" / H5_SHARD).read_bytes())
    (tmp_path / "real" / H5_SHARD).unlink()
    (tmp_path / "real" / H5_SHARD).symlink_to(Path("..") / "copy.h5")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert verify_store(tmp_path / "link").ok
    assert open_store(tmp_path / "link").split("train").read(np.arange(70), 1).shape == (70, 3, 8, 8)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_shard_that_is_not_a_regular_file_is_refused(h5store, kind):
    shard = h5store / H5_SHARD
    shard.unlink()
    os.mkfifo(shard) if kind == "fifo" else shard.mkdir()
    word = "a FIFO" if kind == "fifo" else "a directory"
    report = verify_store(h5store)  # a FIFO opened for reading would block here forever
    assert report.problems == [f"shard {H5_SHARD}: is {word}, not a regular file; refused"]
    with pytest.raises(IntegrityError, match=f"shard {H5_SHARD}: is {word}"):
        open_store(h5store, verify="none").split("train").read(np.arange(3), 0)


@pytest.mark.timeout(60)
def test_manifest_that_is_a_fifo_or_leads_outside_is_refused(h5store, tmp_path):
    (tmp_path / "elsewhere.json").write_text((h5store / MANIFEST_NAME).read_text())
    (h5store / MANIFEST_NAME).unlink()
    (h5store / MANIFEST_NAME).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(StoreError, match="manifest.json: leads outside the store"):
        read_manifest(h5store)
    (h5store / MANIFEST_NAME).unlink()
    os.mkfifo(h5store / MANIFEST_NAME)
    with pytest.raises(StoreError, match="manifest.json: not a regular file"):
        read_manifest(h5store)


# WebDataset tars ---------------------------------------------------------------------------------------------------


def header(name: str, size_field: bytes, kind: bytes = b"0") -> bytes:
    """One USTAR header block with a raw size field (tarfile would refuse to write a bad one)."""
    block = bytearray(tarfile.TarInfo(name).tobuf(tarfile.USTAR_FORMAT))
    block[124:136] = size_field.ljust(12, b"\0")
    block[156:157] = kind
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block)


@pytest.mark.parametrize("size_field", [b"-1", b"-0000000001", b"0o17", b"1_0", b"+7", b"1 2"])
def test_tar_size_field_that_is_not_octal_is_refused(tarstore, size_field):
    """A negative size made the parser read the member's own payload as the next header; 'verify' said OK."""
    shard = tarstore / TAR_SHARD
    shard.write_bytes(header("000000000.junk", size_field) + shard.read_bytes())  # an ignored suffix, then the rest
    resign(tarstore, TAR_SHARD)
    refused_everywhere(tarstore, "corrupt tar header at byte 0 .*size field .* is not an octal number", TAR_SHARD)


def test_tar_member_running_past_the_end_is_refused(tarstore):
    shard = tarstore / TAR_SHARD
    shard.write_bytes(header("000000000.junk", b"77777777777") + shard.read_bytes())
    resign(tarstore, TAR_SHARD)
    refused_everywhere(tarstore, "member 000000000.junk runs past the end", TAR_SHARD)


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.DIRTYPE,
                                  tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE])
def test_tar_member_that_is_not_a_regular_file_is_refused(kind):
    data = header("000000000.cls", b"0", kind) + bytes(1024)
    with pytest.raises(IntegrityError, match="not a regular file"):
        list(iter_members(data, "evil.tar"))


def rebuild_tar(store: Path, change: Callable[[str, bytes], bytes]) -> None:
    """Rewrite the first tar shard member by member, `change(name, payload)` giving each new payload."""
    path = store / TAR_SHARD
    buffer = io.BytesIO()
    with tarfile.open(path) as source, tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for member in source.getmembers():
            payload = change(member.name, source.extractfile(member).read())
            member.size = len(payload)
            out.addfile(member, io.BytesIO(payload))
    path.write_bytes(buffer.getvalue())
    resign(store, TAR_SHARD)


def test_tar_label_outside_the_classes_is_refused_by_streaming_too(tarstore):
    def relabel(name: str, payload: bytes) -> bytes:
        if name == "000000005.cls":
            return b"10"
        return payload.replace(b'"label":', b'"label":10,"was":') if name == "000000005.json" else payload

    rebuild_tar(tarstore, relabel)
    refused_everywhere(tarstore, r"labels outside \[0, 10\)", TAR_SHARD)
    with pytest.raises(IntegrityError, match=re.escape(f"shard {TAR_SHARD}: labels outside [0, 10)")):
        list(StreamingVariantDataset(tarstore, shuffle=False))


def test_npy_header_claiming_a_huge_array_allocates_nothing(tarstore):
    """numpy's loader allocates the shape a version 2.0 header claims before it finds the data missing."""
    huge = io.BytesIO()
    np.lib.format.write_array_header_2_0(huge, {"descr": "|u1", "fortran_order": False, "shape": (2**40,)})
    rebuild_tar(tarstore, lambda name, payload: huge.getvalue() if name == "000000003.clean.npy" else payload)
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError, match=f"shard {TAR_SHARD}: record '000000003' is malformed"):
            open_store(tarstore).split("train").read(np.arange(3), 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20


@pytest.mark.parametrize("meta,match", [
    (b"[" * 100_000 + b"]" * 100_000, "malformed"),
    (b'{"id": 100000000000000000000000, "label": LABEL, "failed": ["noise"]}', "is not a 64-bit integer"),
    (b'{"id": 0, "label": 1.5, "failed": ["noise"]}', "is not a 64-bit integer"),
    (b'{"id": 0, "label": LABEL, "failed": "noise"}', "'failed' is not a list"),
    (b'{"id": 0, "label": LABEL, "failed": ["' + b"x" * 100_000 + b'"]}', "unknown failed variant 'xxx"),
], ids=["deep-json", "huge-id", "float-label", "failed-not-a-list", "long-name"])
def test_record_json_that_is_not_what_the_format_says_is_refused(tarstore, meta, match):
    meta = meta.replace(b"LABEL", str(open_store(tarstore).split("train").labels[0]).encode())  # only one flaw
    rebuild_tar(tarstore, lambda name, payload: meta if name == "000000000.json" else payload)
    report = verify_store(tarstore)
    assert len(report.problems) == 1 and re.search(match, report.problems[0]), report.problems
    assert report.problems[0].startswith(f"shard {TAR_SHARD}: record '000000000'")
    assert len(report.problems[0]) < 400  # never the whole value


# Manifests -------------------------------------------------------------------------------------------------------


def set_shard(**fields) -> Callable[[dict], None]:
    def change(manifest: dict) -> None:
        manifest["splits"]["train"]["shards"][-1].update(fields)
        if "stop" in fields:
            manifest["splits"]["train"]["count"] = fields["stop"]
    return change


def images_beyond_bytes(manifest: dict) -> None:
    """A count the shard's bytes could hold as ids and labels, but not as 8x8 RGB clean images."""
    last = manifest["splits"]["train"]["shards"][-1]
    set_shard(stop=last["start"] + last["bytes"] // 100)(manifest)


@pytest.mark.parametrize("change,match", [
    (set_shard(stop=10**30), "less than or equal to 1099511627776"),
    (set_shard(stop=2**39), r"claims \d+ samples in \d+ bytes; every sample takes at least 16"),
    ("IMAGES", r"claims \d+ images of 192 bytes in \d+ bytes"),
    (set_shard(bytes=-5), "greater than or equal to 0"),
    (lambda m: m.update(image_shape=[3, -8, 8]), "image_shape.1': Input should be greater than or equal to 1"),
    (lambda m: m.update(image_shape=[3, 2**16, 2**16]), "an image of 12884901888 values is more than"),
    (lambda m: m["source"].update(deep=json.loads("[" * 40 + "]" * 40)), "nests JSON deeper than 32 levels"),
    (lambda m: m.update(seed="DEEP"), "nests JSON deeper than 32 levels"),
    (lambda m: m.update(seed="HUGE"), r"not valid JSON \(Exceeds the limit \(4300 digits\)"),
    (set_shard(name="x" * 1_000_000), "should have at most 1024 characters"),
    (set_shard(name="train/a\x00b.h5"), r"shard name 'train/a\\x00b.h5' holds control characters"),
    (set_shard(name="train/\x1b[2Jx.h5"), "holds control characters"),
    (lambda m: m["splits"].update({"\x1b[31mred": m["splits"].pop("test")}), r"split name '\\x1b\[31mred' must be"),
], ids=["huge-count", "count-beyond-bytes", "images-beyond-bytes", "negative-bytes", "negative-shape",
        "huge-image", "deep-json", "very-deep-json", "huge-number", "huge-name", "nul-in-name", "escape-in-name",
        "escape-in-split"])
def test_manifest_with_absurd_numbers_or_nesting_is_one_bounded_error(h5store, change, match, capsys):
    edit_manifest(h5store, images_beyond_bytes if change == "IMAGES" else change)
    text = (h5store / MANIFEST_NAME).read_text()
    text = text.replace('"DEEP"', "[" * 100_000 + "]" * 100_000).replace('"HUGE"', "9" * 5000)
    (h5store / MANIFEST_NAME).write_text(text)
    with pytest.raises(StoreError, match=match) as caught:
        read_manifest(h5store)
    assert str(caught.value).startswith(str(h5store / MANIFEST_NAME)) and len(str(caught.value)) < 1000
    assert main(["inspect", str(h5store)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_manifest_over_the_size_limit_is_refused_before_reading(h5store, monkeypatch):
    size = (h5store / MANIFEST_NAME).stat().st_size
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", size - 1)
    monkeypatch.setattr(manifest_module.Path, "read_bytes", lambda self: pytest.fail("read an oversized manifest"))
    with pytest.raises(StoreError, match=f"{size} bytes, more than a manifest may have"):
        read_manifest(h5store)
