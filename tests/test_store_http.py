"""Stores served over HTTP read like local ones: open_store, verify, inspect, convert and the map-style loader.

The stores are served by `python -m http.server` on 127.0.0.1, in a subprocess bound to a free port.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, make_arrays, write_test_store

from advpipe.cli import main
from advpipe.config import SamplerConfig
from advpipe.errors import IntegrityError, StoreError
from advpipe.sampler import make_loader
from advpipe.stores import build_store, convert_store, open_store, read_manifest, verify_store

MIXED = SamplerConfig(ratio=(0.6, 0.6), seed=3, batch_size=16)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """(local root, URL of the same root): an HDF5 store, a WebDataset store, one with a float32 variant."""
    root = tmp_path_factory.mktemp("served")
    write_test_store(root / "h5", shard_size=16)
    write_test_store(root / "wds", backend="webdataset", shard_size=16)
    arrays = make_arrays(40)
    arrays.variants["noise"][::5] = np.nan  # failed images, flagged in the shards
    build_store(root / "mixed", {"train": arrays}, class_names=CLASSES, shard_size=16, progress=False,
                variant_params={"tiny": {"precision": "float32"}})
    server = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
                               "--directory", str(root)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
        port = re.search(r"port (\d+)", line)
        assert port, f"http.server did not start: {line!r}"
        yield root, f"http://127.0.0.1:{port.group(1)}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize("name", ["h5", "wds", "mixed"])
def test_open_store_over_http_reads_what_the_local_store_holds(served: tuple[Path, str], name: str) -> None:
    root, url = served
    local, remote = open_store(root / name), open_store(f"{url}/{name}")
    assert remote.path == f"{url}/{name}" and remote.manifest == local.manifest
    for split in local.manifest.splits:
        here, there = local.split(split), remote.split(split)
        ids = np.random.default_rng(0).permutation(len(here))
        variants = np.arange(len(ids)) % len(local.variants)
        assert np.array_equal(there.read(ids, variants), here.read(ids, variants))
        assert np.array_equal(there.labels, here.labels) and np.array_equal(there.failed(), here.failed())


def test_verify_and_inspect_over_http(served: tuple[Path, str], capsys: pytest.CaptureFixture) -> None:
    root, url = served
    report = verify_store(f"{url}/wds")
    assert report.ok and report.shards == 8 and report.samples == 70 + 36
    assert main(["verify", f"{url}/mixed"]) == 0
    assert main(["inspect", f"{url}/mixed"]) == 0
    out = capsys.readouterr().out
    assert f"{url}/mixed: OK, 3 shards, 40 samples verified" in out
    assert f"store        {url}/mixed" in out and re.search(r"\ntiny +tiny +attack +float32 ", out)
    assert main(["verify", f"{url}/nothing-here"]) == 2


def test_corrupt_or_missing_shards_are_named_over_http(served: tuple[Path, str]) -> None:
    root, url = served
    shard = read_manifest(root / "h5").splits["test"].shards[1]
    path = root / "h5" / shard.name
    intact = path.read_bytes()
    store = open_store(f"{url}/h5")  # sizes are checked now, checksums when a shard is first read
    try:
        path.write_bytes(intact[:100] + bytes([intact[100] ^ 0xFF]) + intact[101:])
        with pytest.raises(IntegrityError, match=f"{shard.name}: sha256 does not match"):
            store.split("test").read(np.array([shard.start]), 1)
        report = verify_store(f"{url}/h5")
        assert not report.ok and len(report.problems) == 1 and shard.name in report.problems[0]
        path.unlink()
        with pytest.raises(IntegrityError, match=f"{shard.name}: missing"):
            open_store(f"{url}/h5")
    finally:
        path.write_bytes(intact)
    with pytest.raises(StoreError, match="not a finished store"):
        open_store(f"{url}/nothing-here")


@pytest.mark.parametrize("name", ["h5", "mixed"])
def test_map_style_loader_over_http_yields_the_local_epoch(served: tuple[Path, str], name: str) -> None:
    root, url = served
    local = [b for b in make_loader(root / name, "train", MIXED)]
    remote = [b for b in make_loader(f"{url}/{name}", "train", MIXED, num_workers=2)]
    assert len(remote) == len(local) > 1
    for a, b in zip(local, remote, strict=True):
        assert np.array_equal(a.index.numpy(), b.index.numpy()) and np.array_equal(a.variant.numpy(), b.variant.numpy())
        assert np.array_equal(a.x.numpy(), b.x.numpy())
    assert {int(v) for b in remote for v in b.variant} == {0, 1, 2}


def test_convert_a_store_served_over_http(served: tuple[Path, str], tmp_path: Path) -> None:
    root, url = served
    convert_store(f"{url}/mixed", tmp_path / "copy", backend="webdataset", progress=False)
    assert verify_store(tmp_path / "copy").ok
    assert main(["convert", f"{url}/mixed", str(tmp_path / "copy-h5"), "--to", "hdf5", "--compression", "gzip"]) == 0
    assert verify_store(tmp_path / "copy-h5").ok
    here, there = open_store(root / "mixed").split("train"), open_store(tmp_path / "copy").split("train")
    ids = np.arange(len(here))
    for variant in range(3):
        assert np.array_equal(here.read(ids, variant), there.read(ids, variant))
