"""Property-based fuzzing of the parsers that read other people's bytes: the manifest and the tar reader.

Whatever the bytes, the answer is a valid object or one error of advpipe's own type
(StoreError, IntegrityError), never another exception, and it comes within a bounded time
(hypothesis' deadline) and memory (tracemalloc's peak, numpy's buffers included).
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import tracemalloc
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CLASSES, make_arrays
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advpipe.errors import IntegrityError, StoreError
from advpipe.stores import build_store, read_manifest
from advpipe.stores.manifest import MANIFEST_NAME, MAX_SAMPLES, Manifest, parse_manifest
from advpipe.stores.tar import BLOCK, iter_members
from advpipe.stores.wds import NpyDecoder, ShardColumns, TarParser

FUZZ = settings(max_examples=200, deadline=timedelta(seconds=5), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MEMORY = 32 * 2**20  # far above what parsing these small inputs needs, far below any runaway allocation
SHOWN = 1000  # the longest error message accepted: a message never grows with the input


def bounded(parse: Callable[[], Any], errors: tuple[type[Exception], ...]) -> Any:
    """parse() -> its value, or None when it raised one of `errors` with a bounded message; memory bounded."""
    tracemalloc.start()
    try:
        try:
            return parse()
        except errors as exc:
            assert len(str(exc)) < SHOWN, str(exc)[:300]
            return None
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            assert peak < MEMORY, f"parsing took {peak} bytes"
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    """A webdataset store of 1x4x4 images, 3 per shard: small shards, every header within reach of a mutation."""
    path = tmp_path_factory.mktemp("fuzz") / "store"
    build_store(path, {"train": make_arrays(6, shape=(1, 4, 4))}, class_names=CLASSES, backend="webdataset",
                shard_size=3, progress=False)
    return path


# Manifests -------------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.sampled_from([-1, 0, 2**63])
    | st.floats(allow_nan=True) | st.text(max_size=20) | st.sampled_from(["float16", "hdf5", "x" * 5000]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside a JSON document."""
    found = [prefix]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        found += paths(child, (*prefix, key))
    return found


def mutate(document: Any, path: tuple, action: str, value: Any) -> Any:
    if not path:
        return value
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete":
        del parent[path[-1]]
    elif action == "insert" and isinstance(parent, dict):
        parent[f"{path[-1]}_extra"] = value
    else:
        parent[path[-1]] = value
    return document


def check_valid(manifest: Manifest) -> None:
    """What a reader may rely on once a manifest validates: bounded, contiguous, inside the store."""
    assert all(side >= 1 for side in manifest.image_shape) and math.prod(manifest.image_shape) <= 2**26
    for split in manifest.splits.values():
        position = 0
        for shard in split.shards:
            assert shard.start == position < shard.stop <= MAX_SAMPLES and shard.count * 16 <= shard.bytes
            assert not shard.name.startswith("/") and ".." not in shard.name.split("/")
            position = shard.stop
        assert position == split.count


@FUZZ
@given(data=st.binary(max_size=4096))
def test_manifest_parser_on_any_bytes(data):
    manifest = bounded(lambda: parse_manifest(data, "fuzz/manifest.json"), (StoreError,))
    if manifest is not None:
        check_valid(manifest)


@FUZZ
@given(data=st.data())
def test_manifest_parser_on_mutated_manifests(tiny_store, data):
    """One to three edits of a real manifest: a value replaced, deleted or added anywhere, with any JSON value."""
    text = (tiny_store / MANIFEST_NAME).read_text()
    document = json.loads(text)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths(document)))
        document = mutate(document, path, data.draw(st.sampled_from(["replace", "delete", "insert"])),
                          data.draw(json_values))
    raw = json.dumps(document)
    if data.draw(st.booleans()):  # deep nesting and huge numbers, which json.dumps of drawn values never makes
        raw = raw.replace('"webdataset"', "[" * 5000 + "]" * 5000).replace('"float16"', "9" * 5000)
    manifest = bounded(lambda: parse_manifest(raw, "fuzz/manifest.json"), (StoreError,))
    if manifest is not None:
        check_valid(manifest)


def test_the_mutation_strategy_reaches_valid_manifests(tiny_store):
    """The fuzzing above is only worth something if edits can leave a valid manifest: an edit of a free-form field."""
    document = json.loads((tiny_store / MANIFEST_NAME).read_text())
    check_valid(parse_manifest(json.dumps(mutate(document, ("source", "kind"), "replace", [1, {"a": None}])), "x"))


# Tar shards ------------------------------------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=8 * BLOCK))
def test_tar_members_on_any_bytes(data):
    bounded(lambda: list(iter_members(data, "fuzz.tar")), (IntegrityError,))


def edits(size: int) -> st.SearchStrategy:
    """Overwrite bytes, mostly in header blocks' fields (name, size, type, prefix), or cut or splice the shard."""
    header_byte = st.tuples(st.integers(0, size // BLOCK - 1), st.integers(0, BLOCK - 1)).map(
        lambda pair: pair[0] * BLOCK + pair[1])
    overwrite = st.tuples(st.just("overwrite"), header_byte,
                          st.binary(min_size=1, max_size=12) | st.sampled_from([b"-1", b"0o7", b"\x80", b"5", b"\0"]))
    cut = st.tuples(st.just("cut"), st.integers(0, size), st.just(b""))
    splice = st.tuples(st.just("splice"), st.integers(0, size // BLOCK).map(lambda b: b * BLOCK),
                       st.integers(1, 4).map(lambda n: bytes(n * BLOCK)) | st.binary(min_size=1, max_size=BLOCK))
    return st.lists(overwrite | cut | splice, min_size=1, max_size=4)


def apply_edits(data: bytes, changes: list) -> bytes:
    out = bytearray(data)
    for kind, position, payload in changes:
        position = min(position, len(out))
        if kind == "overwrite":
            out[position : position + len(payload)] = payload[: max(len(out) - position, 0)]
        elif kind == "cut":
            del out[position:]
        else:
            out[position:position] = payload
    return bytes(out)


def check_columns(columns: ShardColumns, parser: TarParser) -> None:
    """What a reader may rely on once a shard parses: the manifest's shapes and dtypes, one row per record."""
    count = len(columns.ids)
    assert columns.ids.dtype == columns.labels.dtype == np.int64 and len(columns.labels) == count
    assert columns.clean.shape == (count, *parser.shape) and columns.clean.dtype == np.uint8
    assert columns.failed.shape == (count, len(parser.names) + 1)
    for array in parser.layout.arrays:
        stacked = columns.array(array.name)
        assert stacked.shape == (count, len(array.variants), *parser.shape) and stacked.dtype == array.dtype


@FUZZ
@given(data=st.data())
def test_tar_parser_on_mutated_shards(tiny_store, data):
    manifest = read_manifest(tiny_store)
    record = manifest.splits["train"].shards[0]
    shard = (tiny_store / record.name).read_bytes()
    parser = TarParser.of(manifest)
    mutated = apply_edits(shard, data.draw(edits(len(shard))))
    columns = bounded(lambda: parser.read(mutated, record), (IntegrityError,))
    if columns is not None:
        check_columns(columns, parser)


record_json = st.fixed_dictionaries(
    {"id": json_values | st.just(0), "label": json_values | st.sampled_from([0, 1, 9]),
     "failed": json_values | st.lists(st.sampled_from(["noise", "tiny", "other"]), max_size=3)},
    optional={"extra": json_values}) | json_values


@FUZZ
@given(meta=record_json, pad=st.sampled_from([0, 600]))
def test_tar_parser_on_any_record_json(tiny_store, meta, pad):
    """Any JSON, short (read in bulk) or long (read record by record), as the first record's .json member."""
    manifest = read_manifest(tiny_store)
    record = manifest.splits["train"].shards[0]
    payload = json.dumps(meta).encode() + b" " * pad
    buffer = io.BytesIO()
    with tarfile.open(tiny_store / record.name) as source, tarfile.open(fileobj=buffer, mode="w",
                                                                        format=tarfile.USTAR_FORMAT) as out:
        for member in source.getmembers():
            data = payload if member.name == "000000000.json" else source.extractfile(member).read()
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    parser = TarParser.of(manifest)
    columns = bounded(lambda: parser.read(buffer.getvalue(), record), (IntegrityError,))
    if columns is not None:
        check_columns(columns, parser)


def test_the_edit_strategy_reaches_both_parsing_paths(tiny_store):
    """An untouched shard is read in bulk; a spliced-in ignored member sends it record by record: both are fuzzed."""
    manifest = read_manifest(tiny_store)
    record = manifest.splits["train"].shards[0]
    shard = (tiny_store / record.name).read_bytes()
    parser = TarParser.of(manifest)
    assert parser._strided(shard, record) is not None
    spliced = apply_edits(shard, [("splice", 0, bytes(BLOCK))])  # an end-of-archive block first: no records
    assert parser._strided(spliced, record) is None and len(parser.read(spliced, record).ids) == 0


def npy_header(version: int, descr: str, fortran: bool, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    write = np.lib.format.write_array_header_1_0 if version == 1 else np.lib.format.write_array_header_2_0
    write(buffer, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return buffer.getvalue()


npy_headers = st.builds(npy_header, st.sampled_from([1, 2]),
                        st.sampled_from(["|u1", "<f2", ">f4", "<i8", "|O", "|V8", "|S0", "<U3"]), st.booleans(),
                        st.lists(st.integers(-3, 2**40) | st.integers(0, 20), max_size=4).map(tuple))
magics = st.sampled_from([b"\x93NUMPY\x01\x00", b"\x93NUMPY\x02\x00", b"\x93NUMPY\x03\x00"])


@FUZZ
@given(payload=st.binary(max_size=256) | st.builds(bytes.__add__, magics, st.binary(max_size=256))
       | st.builds(bytes.__add__, npy_headers, st.binary(max_size=256)))
def test_npy_decoder_on_any_bytes(payload):
    """Any payload is an array viewing its bytes or a ValueError (which the record reader names): no allocation."""
    array = bounded(lambda: NpyDecoder()(memoryview(payload)), (ValueError,))
    if array is not None:
        assert array.nbytes <= len(payload)
