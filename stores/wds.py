"""WebDataset shards: POSIX tar files, one record per source image (docs/FORMAT.md, "WebDataset shards").

Record for image id 42 in a float16 store whose `cw` variant is kept as float32:

    000000042.cls                    label, ASCII decimal
    000000042.json                   {"id": 42, "label": 3, "failed": ["cw"]}
    000000042.clean.npy              uint8 (C, H, W)
    000000042.variants.npy           the float16 variants stacked in manifest order, (k, C, H, W)
    000000042.variants_float32.npy   the float32 ones (only when some variant has its own precision)

Reading cost is dominated by per-member handling, so all variants of one precision share
one member. The tars are plain ustar archives written deterministically (mtime 0, uid/gid
0, mode 0444), readable by the `webdataset` library and by `tar`. `TarParser` turns a
shard's bytes into `ShardColumns`: a shard as written here has a fixed stride and is read
as strided numpy views with every header checked in bulk; any other valid tar is read
record by record. Random access (`WdsShard`) and streaming (advpipe.sampler.streaming)
both use it.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from advpipe.errors import IntegrityError, shown
from advpipe.stores import tar
from advpipe.stores.manifest import Manifest, ShardRecord
from advpipe.stores.shard import DEFAULT_ARRAY, Layout, MappedArrays, ShardData, ShardReader, StoredArray
from advpipe.stores.tar import iter_members

log = logging.getLogger(__name__)

KEY_DIGITS = 9
NO_FAILURES = b',"failed":[]}'  # how a record's JSON ends when no variant failed


def sample_key(sample_id: int) -> str:
    return f"{sample_id:0{KEY_DIGITS}d}"


def write_shard(path, shard: ShardData, layout: Layout, compression: str | None = None) -> None:
    """Write one shard tar at `path` (the caller makes it atomic); tars are never compressed."""
    names = list(shard.stored)
    stacked = {array.name: shard.stacked(array, layout) for array in layout.arrays}
    with open(path, "wb") as handle, tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for row, sample_id in enumerate(shard.ids):
            key = sample_key(int(sample_id))
            meta = {"id": int(sample_id), "label": int(shard.labels[row]),
                    "failed": [n for n in names if shard.failed[n][row]]}
            _add(archive, f"{key}.cls", str(int(shard.labels[row])).encode())
            _add(archive, f"{key}.json", json.dumps(meta, separators=(",", ":")).encode())
            _add(archive, f"{key}.clean.npy", _npy(shard.clean[row]))
            for name, array in stacked.items():
                _add(archive, f"{key}.{name}.npy", _npy(array[row]))


def _add(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    archive.addfile(info, io.BytesIO(payload))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False)
    return buffer.getvalue()


# Record by record ---------------------------------------------------------------------------------


@dataclass
class Record:
    """One decoded sample record: every variant of one image."""

    key: str
    id: int
    label: int
    failed: list[str]
    clean: np.ndarray
    arrays: dict[str, np.ndarray]  # stacked array name ('variants', 'variants_float32') -> (k, C, H, W)


class NpyDecoder:
    """Decode .npy payloads; the header is parsed once per distinct header, since a shard repeats it.

    Only versions 1.0 and 2.0 (plain latin-1 headers) are read, and the array is always a view
    of the payload: numpy's own loader would first allocate whatever shape a header claims.
    """

    def __init__(self) -> None:
        self._headers: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}

    def __call__(self, payload: memoryview) -> np.ndarray:
        magic = bytes(payload[:8])
        if magic == b"\x93NUMPY\x01\x00":
            header_len = 10 + int.from_bytes(payload[8:10], "little")
        elif magic == b"\x93NUMPY\x02\x00":
            header_len = 12 + int.from_bytes(payload[8:12], "little")
        else:
            raise ValueError(f"not a .npy payload of version 1.0 or 2.0 (starts {shown(magic)})")
        header = bytes(payload[:header_len])
        if header not in self._headers:
            stream = io.BytesIO(header)
            version = np.lib.format.read_magic(stream)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(stream)
            if fortran or dtype.hasobject or not dtype.itemsize:
                raise ValueError("npy payload must be a C-ordered plain array")
            self._headers[header] = (dtype, shape, header_len)
        dtype, shape, offset = self._headers[header]
        return np.frombuffer(payload, dtype=dtype, offset=offset).reshape(shape)


def iter_records(data: memoryview | bytes, shard: str) -> Iterator[Record]:
    """Group a shard's members into Records (members of one key are consecutive)."""
    decode = NpyDecoder()
    members: dict[str, memoryview] = {}
    key = None
    for name, payload in iter_members(data, shard):
        base = name.rsplit("/", 1)[-1]
        member_key, _, suffix = base.partition(".")
        if key is not None and member_key != key:
            yield _record(key, members, decode, shard)
            members = {}
        key = member_key
        members[suffix] = payload
    if key is not None:
        yield _record(key, members, decode, shard)


def _record(key: str, members: dict[str, memoryview], decode: NpyDecoder, shard: str) -> Record:
    try:
        meta = json.loads(bytes(members["json"]))
        arrays = {suffix.removesuffix(".npy"): decode(payload) for suffix, payload in members.items()
                  if suffix.startswith(DEFAULT_ARRAY) and suffix.endswith(".npy")}
        return Record(key, _int64(meta["id"]), _int64(meta["label"]), _failed_list(meta), decode(members["clean.npy"]),
                      arrays)
    except (KeyError, ValueError, TypeError, RecursionError) as exc:  # RecursionError: JSON nested too deeply
        raise IntegrityError(f"shard {shard}: record '{key}' is malformed ({shown(exc)}); "
                             "run `advpipe verify`") from None


def _failed_list(meta: dict) -> list:
    failed = meta.get("failed", [])
    if not isinstance(failed, list):
        raise TypeError(f"'failed' is not a list but {shown(failed)}")
    return failed


def _int64(value: Any) -> int:
    """A JSON id or label as an int64 value (bools and floats are not ids)."""
    if type(value) is not int or not -(2**63) <= value < 2**63:
        raise ValueError(f"{shown(value)} is not a 64-bit integer")
    return value


# Whole shards as columns ----------------------------------------------------------------------------


@dataclass
class ShardColumns:
    """One shard as parallel arrays; the image arrays may be read-only views of the shard's bytes."""

    ids: np.ndarray  # int64 (n,)
    labels: np.ndarray  # int64 (n,)
    failed: np.ndarray  # bool (n, V+1): variants whose generation failed (column 0, clean, never)
    clean: np.ndarray  # uint8 (n, C, H, W)
    variants: np.ndarray  # the stacked array named 'variants' (the store's precision): (n, k, C, H, W)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # the other stacked arrays, by name
    layout: Layout | None = None  # where each variant is; None: every variant is in `variants`, in order

    def array(self, name: str) -> np.ndarray:
        return self.variants if name == DEFAULT_ARRAY else self.arrays[name]

    @property
    def stored_dtype(self) -> np.dtype:
        """A dtype that holds any variant's stored values exactly."""
        return self.variants.dtype if self.layout is None else self.layout.dtype

    def gather(self, rows: np.ndarray, variants: np.ndarray) -> np.ndarray:
        """Stored values of variant variants[i] (0-based) at row rows[i], in `stored_dtype`: one gather per array."""
        if self.layout is None:
            return self.variants[rows, variants]
        out = np.empty((len(rows), *self.clean.shape[1:]), self.stored_dtype)
        for array, positions, columns in self.layout.groups(variants):
            out[positions] = self.array(array.name)[rows[positions], columns]
        return out


class TarParser:
    """Turns a WebDataset shard's bytes into ShardColumns.

    A shard as `write_shard` writes it has a fixed stride: each record is the same members in
    the same order, .cls and .json fit one tar block, and the .npy members have the
    manifest's shapes and dtypes. Such a shard is read as strided numpy views, with every
    header checked in bulk (names and ids, member type, sizes, .npy headers) and no Python
    work per record: ids come from the member names and labels from .cls, as the format
    defines them, and the JSON is parsed only for records that list failed variants. Any
    other shard is read record by record with `iter_records`.
    """

    def __init__(self, image_shape: tuple[int, ...], layout: Layout, classes: int | None = None) -> None:
        self.shape = tuple(image_shape)
        self.layout = layout
        self.classes = classes  # when given, labels outside [0, classes) are refused (streaming reads no other check)
        self.names = list(self.layout.names)
        pixels = int(np.prod(self.shape))
        members = [("cls", b"", 0), ("json", b"", 0), ("clean.npy", tar.npy_header(self.shape, np.uint8), pixels)]
        for array in self.layout.arrays:
            stacked = (len(array.variants), *self.shape)
            members.append((f"{array.name}.npy", tar.npy_header(stacked, array.dtype),
                            len(array.variants) * pixels * array.dtype.itemsize))
        self.members: dict[str, tuple[int, bytes, int]] = {}  # suffix: offset, npy header, size (0: any)
        offset = 0
        for suffix, header, pixel_bytes in members:
            size = len(header) + pixel_bytes
            self.members[suffix] = (offset, header, size)
            offset += tar.BLOCK + tar.blocks(size or tar.BLOCK) * tar.BLOCK
        self.stride = offset

    @classmethod
    def of(cls, manifest: Manifest) -> TarParser:
        return cls(manifest.image_shape, manifest.layout, manifest.num_classes)

    def read(self, data: Any, shard: ShardRecord) -> ShardColumns:
        columns = self._strided(data, shard)
        if columns is None:
            log.debug("shard %s is not laid out at a fixed stride; reading it record by record", shard.name)
            columns = self._by_record(data, shard)
        labels = columns.labels
        if self.classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= self.classes):
            raise IntegrityError(f"shard {shard.name}: labels outside [0, {self.classes}); run `advpipe verify`")
        return columns

    def _columns(self, ids: np.ndarray, labels: np.ndarray, failed: np.ndarray, clean: np.ndarray,
                 arrays: dict[str, np.ndarray]) -> ShardColumns:
        variants = arrays.pop(DEFAULT_ARRAY, None)
        if variants is None:  # no variant is kept in the store's precision
            variants = np.zeros((len(ids), 0, *self.shape), self.layout.dtype)
        single = [a.name for a in self.layout.arrays] in ([], [DEFAULT_ARRAY])
        return ShardColumns(ids, labels, failed, clean, variants, arrays, None if single else self.layout)

    def _strided(self, data: Any, shard: ShardRecord) -> ShardColumns | None:
        count, end = shard.count, shard.count * self.stride
        if count < 1 or len(data) < end + 2 * tar.BLOCK or np.frombuffer(data, np.uint8, offset=end).any():
            return None
        checked = self._check_headers(data, count)
        labels = None if checked is None else tar.decimals(self._payload(data, count, "cls", (tar.BLOCK,)),
                                                           checked[1]["cls"])
        if checked is None or labels is None:
            return None
        ids, sizes = checked
        failed = self._failed_from_json(shard, ids, labels, self._payload(data, count, "json", (tar.BLOCK,)),
                                        sizes["json"])
        arrays = {array.name: self._payload(data, count, f"{array.name}.npy", (len(array.variants), *self.shape),
                                            array.dtype) for array in self.layout.arrays}
        return self._columns(ids, labels, failed, self._payload(data, count, "clean.npy", self.shape), arrays)

    def _check_headers(self, data: Any, count: int) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
        """(ids, member sizes) if every record has this layout's member names, types, sizes and .npy headers."""
        ids, sizes = None, {}
        for suffix, (offset, npy_header, size) in self.members.items():
            header = tar.strided(data, count, self.stride, offset, (tar.BLOCK,))
            member_ids, member_size = tar.member_keys(header, suffix, KEY_DIGITS), tar.octal_sizes(header)
            if member_ids is None or member_size is None or (ids is not None and not np.array_equal(ids, member_ids)):
                return None
            expected = member_size == size if size else (member_size > 0) & (member_size <= tar.BLOCK)
            npy = tar.strided(data, count, self.stride, offset + tar.BLOCK, (len(npy_header),))
            if not (expected.all() and (npy == np.frombuffer(npy_header, np.uint8)).all()):
                return None
            ids, sizes[suffix] = member_ids, member_size
        return ids, sizes

    def _payload(self, data: Any, count: int, suffix: str, shape: tuple[int, ...], dtype: Any = np.uint8) -> np.ndarray:
        """(count, *shape) view of each record's `suffix` member, after its .npy header if it has one."""
        offset, npy_header, _ = self.members[suffix]
        return tar.strided(data, count, self.stride, offset + tar.BLOCK + len(npy_header), shape, dtype)

    def _failed_from_json(self, shard: ShardRecord, ids: np.ndarray, labels: np.ndarray, payloads: np.ndarray,
                          sizes: np.ndarray) -> np.ndarray:
        tails = np.take_along_axis(payloads, np.maximum(sizes[:, None] - len(NO_FAILURES), 0)
                                   + np.arange(len(NO_FAILURES)), axis=1)
        listed = np.flatnonzero(~(tails == np.frombuffer(NO_FAILURES, np.uint8)).all(axis=1))
        entries = []
        for row in listed.tolist():
            key = sample_key(int(ids[row]))
            try:
                meta = json.loads(bytes(payloads[row, :sizes[row]]))
                consistent = (_int64(meta["id"]), _int64(meta["label"])) == (ids[row], labels[row])
                entries.append((row, key, _failed_list(meta)))
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                raise IntegrityError(f"shard {shard.name}: record '{key}' is malformed ({shown(exc)}); "
                                     "run `advpipe verify`") from None
            if not consistent:
                raise IntegrityError(f"shard {shard.name}: record '{key}' has id or label differing from its "
                                     "member names or .cls; run `advpipe verify`")
        return self._failed_matrix(shard, len(ids), entries)

    def _by_record(self, data: Any, shard: ShardRecord) -> ShardColumns:
        records = list(iter_records(memoryview(data), shard.name))
        expected = {a.name: ((len(a.variants), *self.shape), a.dtype) for a in self.layout.arrays}
        bad = [r.key for r in records if r.clean.shape != self.shape or r.clean.dtype != np.uint8
               or {name: (a.shape, a.dtype) for name, a in r.arrays.items()} != expected]
        if bad:
            raise IntegrityError(f"shard {shard.name}: record '{bad[0]}' does not have the manifest's image shape "
                                 f"{self.shape}, variants or precisions; run `advpipe verify`")
        count = len(records)
        arrays = {name: np.stack([r.arrays[name] for r in records]) if records else np.zeros((0, *shape), dtype)
                  for name, (shape, dtype) in expected.items()}
        return self._columns(
            ids=np.fromiter((r.id for r in records), dtype=np.int64, count=count),
            labels=np.fromiter((r.label for r in records), dtype=np.int64, count=count),
            failed=self._failed_matrix(shard, count, [(row, r.key, r.failed) for row, r in enumerate(records)]),
            clean=np.stack([r.clean for r in records]) if records else np.zeros((0, *self.shape), np.uint8),
            arrays=arrays,
        )

    def _failed_matrix(self, shard: ShardRecord, count: int, entries: list[tuple[int, str, list[str]]]) -> np.ndarray:
        failed = np.zeros((count, len(self.names) + 1), dtype=bool)
        for row, key, names in entries:
            for name in names:
                if name not in self.names:
                    raise IntegrityError(f"shard {shard.name}: record '{key}' lists unknown failed variant "
                                         f"{shown(name)}; run `advpipe verify`")
                failed[row, self.names.index(name) + 1] = True
        return failed


class WdsShard(ShardReader):
    """Random access into one tar shard: the whole shard is fetched once and parsed into columns.

    Shards are a few MiB to a few tens of MiB; a local one is memory-mapped, so the columns
    are views of the page cache. Streaming training parses shards with `TarParser` directly.
    """

    _columns: ShardColumns | None = None
    _views: MappedArrays | None = None

    def load(self) -> None:
        if self._columns is None:
            parser = TarParser(self.image_shape, self.layout)
            columns = parser.read(self.source.fetch(self.record, self.verify), self.record)
            if len(columns.ids) != self.count:
                raise IntegrityError(f"shard {self.name}: holds {len(columns.ids)} records, manifest says {self.count}")
            self._columns = columns

    @property
    def columns(self) -> ShardColumns:
        self.load()
        return self._columns

    @property
    def ids(self) -> np.ndarray:
        return self.columns.ids

    @property
    def labels(self) -> np.ndarray:
        return self.columns.labels

    def failed(self) -> np.ndarray:
        return self.columns.failed[:, 1:]

    def clean(self, rows: np.ndarray) -> np.ndarray:
        return self.columns.clean[rows]

    def gather(self, array: StoredArray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        return self.columns.array(array.name)[rows, columns]

    def mapped(self) -> MappedArrays | None:
        if self._views is None and self.columns.layout is None:
            self._views = MappedArrays.of(self.columns.clean, self.columns.variants)
        return self._views
