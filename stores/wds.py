"""WebDataset shards: POSIX tar files, one record of four members per source image.

Record for image id 42 (docs/FORMAT.md, "WebDataset shards"):

    000000042.cls            label, ASCII decimal
    000000042.json           {"id": 42, "label": 3, "failed": ["cw"]}
    000000042.clean.npy      uint8 (C, H, W)
    000000042.variants.npy   every variant stacked in manifest order, (V, C, H, W)

Reading cost is dominated by per-member handling, so all variants of an image
share one member. The tars are plain ustar archives written deterministically
(mtime 0, uid/gid 0, mode 0444), readable by the `webdataset` library and by
`tar`; this module also has its own small tar reader, which is several times
faster than a general one and refuses anything but regular files with safe names.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from advpipe.errors import IntegrityError
from advpipe.stores.shard import ShardData

BLOCK = 512
REGULAR = (b"0", b"\0")


def sample_key(sample_id: int) -> str:
    return f"{sample_id:09d}"


def write_shard(path: Path, shard: ShardData) -> None:
    """Write one shard tar at `path` (the caller makes it atomic)."""
    names = list(shard.stored)
    with open(path, "wb") as handle, tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for row, sample_id in enumerate(shard.ids):
            key = sample_key(int(sample_id))
            meta = {"id": int(sample_id), "label": int(shard.labels[row]),
                    "failed": [n for n in names if shard.failed[n][row]]}
            _add(tar, f"{key}.cls", str(int(shard.labels[row])).encode())
            _add(tar, f"{key}.json", json.dumps(meta, separators=(",", ":")).encode())
            _add(tar, f"{key}.clean.npy", _npy(shard.clean[row]))
            if names:
                _add(tar, f"{key}.variants.npy", _npy(np.stack([shard.stored[n][row] for n in names])))


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False)
    return buffer.getvalue()


def iter_members(data: memoryview | bytes, shard: str) -> Iterator[tuple[str, memoryview]]:
    """Yield (name, payload) for each member; refuse links, devices, absolute or '..' names."""
    view = memoryview(data)
    position, end = 0, len(view)
    while position + BLOCK <= end:
        header = bytes(view[position : position + BLOCK])
        if header == bytes(BLOCK):
            return
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        name = f"{prefix}/{name}" if prefix else name
        try:
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            raise IntegrityError(f"shard {shard}: corrupt tar header at byte {position}") from None
        _check_member(shard, name, header[156:157])
        start = position + BLOCK
        if start + size > end:
            raise IntegrityError(f"shard {shard}: truncated (member {name} runs past the end of the file)")
        yield name, view[start : start + size]
        position = start + (size + BLOCK - 1) // BLOCK * BLOCK
    raise IntegrityError(f"shard {shard}: truncated tar (no end-of-archive marker)")


def _check_member(shard: str, name: str, kind: bytes) -> None:
    if kind not in REGULAR:
        raise IntegrityError(f"shard {shard}: member '{name}' is not a regular file (links and devices are refused)")
    if name.startswith("/") or ".." in name.split("/"):  # PurePosixPath's test, without its ~2 us per member
        raise IntegrityError(f"shard {shard}: member name '{name}' points outside the archive; refused")


@dataclass
class Record:
    """One decoded sample record: every variant of one image."""

    key: str
    id: int
    label: int
    failed: list[str]
    clean: np.ndarray
    variants: np.ndarray | None


class NpyDecoder:
    """Decode .npy payloads; the header is parsed once per distinct header, since a shard repeats it."""

    def __init__(self) -> None:
        self._headers: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}

    def __call__(self, payload: memoryview) -> np.ndarray:
        header_len = 10 + int.from_bytes(payload[8:10], "little")
        header = bytes(payload[:header_len])
        if header not in self._headers:
            stream = io.BytesIO(header)
            version = np.lib.format.read_magic(stream)
            if version != (1, 0):
                return np.load(io.BytesIO(bytes(payload)), allow_pickle=False)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
            if fortran or dtype.hasobject:
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
        variants = decode(members["variants.npy"]) if "variants.npy" in members else None
        return Record(key, int(meta["id"]), int(meta["label"]), list(meta.get("failed", [])),
                      decode(members["clean.npy"]), variants)
    except (KeyError, ValueError, TypeError) as exc:
        raise IntegrityError(f"shard {shard}: record '{key}' is malformed ({exc!r}); run `advpipe verify`") from None


class WdsShard:
    """Random access into one tar shard, for `Store.read` and conversion.

    The whole shard is read once (it is a few MiB to a few tens of MiB) and indexed;
    streaming training uses `iter_records` directly instead.
    """

    def __init__(self, path: Path, variant_names: list[str], count: int) -> None:
        self.path = path
        self.variant_names = variant_names
        self.count = count
        self._records: list[Record] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_records": None}

    def _open(self) -> list[Record]:
        if self._records is None:
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                raise IntegrityError(f"shard {self.path.name}: cannot be read ({exc})") from None
            records = list(iter_records(data, self.path.name))
            expected = (len(self.variant_names),)
            for record in records:
                if (record.variants.shape[:1] if record.variants is not None else (0,)) != expected:
                    raise IntegrityError(f"shard {self.path.name}: record '{record.key}' does not hold "
                                         f"{expected[0]} variants; run `advpipe verify`")
            if len(records) != self.count:
                raise IntegrityError(
                    f"shard {self.path.name}: holds {len(records)} records, manifest says {self.count}"
                )
            self._records = records
            self._failed = np.array([[n in r.failed for n in self.variant_names] for r in records], dtype=bool)
            self._failed = self._failed.reshape(len(records), len(self.variant_names))
        return self._records

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self._open()], dtype=np.int64)

    @property
    def ids(self) -> np.ndarray:
        return np.array([r.id for r in self._open()], dtype=np.int64)

    def failed(self, variant_index: int) -> np.ndarray:
        self._open()
        return self._failed[:, variant_index]

    def clean(self, rows: np.ndarray) -> np.ndarray:
        records = self._open()
        return np.stack([records[r].clean for r in rows])

    def stored(self, variant_index: int, rows: np.ndarray) -> np.ndarray:
        return self.stored_pairs(rows, np.full(len(rows), variant_index))

    def stored_pairs(self, rows: np.ndarray, variant_indices: np.ndarray) -> np.ndarray:
        records = self._open()
        return np.stack([records[r].variants[v] for r, v in zip(rows, variant_indices, strict=True)])
