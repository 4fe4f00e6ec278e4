"""Sources read lazily: an index of where each image's encoded bytes are, decoded only when asked for.

An image folder or a set of WebDataset shards can be far larger than memory (ImageNet-1k: about 140 GB
of JPEGs, 190 GB decoded at 224x224), so neither is ever loaded whole:

1. list: the format lists its *containers* (a folder's files, tar shards) without reading them and
   groups them into chunks (CHUNK files of a folder; one tar shard);
2. index: one task per chunk reads its bytes once and records, per image, where its encoded bytes are
   (container, offset, length), their sha256, its label and its header (width, height, channels). No
   pixel is decoded. With a Dask client the tasks run on its workers. The index is kept on the client's
   disk (`index_cache_dir`), keyed by the listing (names, sizes, modification times or ETags), so a
   resume or a second run of the same source reads nothing again;
3. split and limit, from the labels alone, exactly as for the formats loaded whole;
4. `read(indices)`: fetch those images' bytes, check each against its sha256 (a source changed since
   it was indexed is refused where it is read: SourceChangedError, exit 3), decode with PIL, convert
   channels and resize exactly as the whole-loading path does.

The fingerprint (scheme "chunked-v1", docs/FORMAT.md section 2.6) is the sha256 of a header (kind,
split, count, shape, class names, decode settings) followed by the digests of consecutive chunks of
CHUNK images in split order, each the sha256 of its images' names, labels and byte digests. A chunk's
digest is checked image by image where the images are read, so a worker reading one store shard never
reads a whole chunk to check it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

from advpipe import urls
from advpipe.datasets.base import Source, check_class_names
from advpipe.datasets.transforms import convert_channels
from advpipe.errors import DataError, SourceChangedError
from advpipe.io import canonical_json, sha256_json

log = logging.getLogger(__name__)

CHUNKED_SCHEME = "chunked-v1"
#: images per fingerprint chunk, and files per index task of a folder
CHUNK = 1024
#: bump when what the index records changes, so old cache files are not read as new ones
INDEX_VERSION = 1
DIGEST = 32

#: Map a function over task arguments, returning the results in order: inline, or on Dask workers.
Runner = Callable[[Callable[..., Any], Sequence[Any], str], list[Any]]


def inline_runner(progress: bool = True) -> Runner:
    """The Runner without a cluster: one task after another, with a progress bar unless `progress` is off."""
    def run(function: Callable[..., Any], items: Sequence[Any], what: str) -> list[Any]:
        return [function(item) for item in tqdm(items, desc=what, unit="chunk", disable=not progress or len(items) < 2)]

    return run


run_inline = inline_runner()


# The index -----------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Index:
    """One row per image: where its encoded bytes are, their sha256, its label and header.

    Compact numpy arrays only (about 70 bytes per image besides names), so a process can hold the
    index of a split of millions of images, as it holds their labels, but never their pixels.
    """

    location: str  # the directory or URL prefix containers are relative to
    containers: np.ndarray  # bytes ('S'), one row per container: a file, or a tar shard
    container: np.ndarray  # int32 (N,): each image's row in `containers`
    offset: np.ndarray  # int64 (N,): where the image's bytes start in its container
    length: np.ndarray  # int64 (N,)
    names: np.ndarray  # bytes ('S') (N,): the tar member holding the image; b"" for a file of its own
    digests: np.ndarray  # uint8 (N, 32): sha256 of the image's bytes
    labels: np.ndarray  # int64 (N,)
    sizes: np.ndarray  # int32 (N, 2): width, height from the image's header
    channels: np.ndarray  # uint8 (N,): 1 for grayscale (mode L), else 3

    ARRAYS = ("containers", "container", "offset", "length", "names", "digests", "labels", "sizes", "channels")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray) -> Index:
        """The index of these rows, in this order (containers stay shared)."""
        rows = np.asarray(rows, dtype=np.int64)
        picked = {name: getattr(self, name)[rows] for name in self.ARRAYS if name != "containers"}
        return Index(self.location, self.containers, **picked)

    def where(self, row: int) -> str:
        """The image's place for messages: its file, or its tar shard and member."""
        container = self.containers[self.container[row]].decode()
        name = self.names[row].decode()
        return f"{urls.redact(self.location)}/{container}" + (f", member {name}" if name else "")

    @classmethod
    def concat(cls, location: str, containers: Sequence[str], chunks: Sequence[dict[str, np.ndarray]]) -> Index:
        """Join per-chunk results; each chunk's `container` counts within `containers`."""
        arrays = {name: np.concatenate([chunk[name] for chunk in chunks]) for name in cls.ARRAYS[1:]}
        arrays["digests"] = arrays["digests"].reshape(-1, DIGEST)
        arrays["sizes"] = arrays["sizes"].reshape(-1, 2)
        return cls(location, np.array([c.encode() for c in containers], dtype=bytes), **arrays)

    def save(self, path: Path) -> None:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".tmp-{path.name}.", delete=False) as handle:
            np.savez(handle, location=np.array(self.location.encode()),
                     **{name: getattr(self, name) for name in self.ARRAYS})
        os.replace(handle.name, path)

    @classmethod
    def load(cls, path: Path) -> Index:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["location"].item().decode(), **{name: data[name] for name in cls.ARRAYS})


class _Place:
    """An image's place for messages, formatted (with redaction) only when a message shows it."""

    __slots__ = ("index", "row")

    def __init__(self, index: Index, row: int) -> None:
        self.index, self.row = index, row

    def __str__(self) -> str:
        return self.index.where(self.row)


def chunk_result(count: int) -> dict[str, np.ndarray]:
    """Empty per-image arrays for one index task's `count` images."""
    return {"container": np.zeros(count, np.int32), "offset": np.zeros(count, np.int64),
            "length": np.zeros(count, np.int64), "names": np.zeros(count, "S1"),
            "digests": np.zeros((count, DIGEST), np.uint8), "labels": np.zeros(count, np.int64),
            "sizes": np.zeros((count, 2), np.int32), "channels": np.zeros(count, np.uint8)}


def record_image(result: dict[str, np.ndarray], row: int, data: bytes | memoryview, where: str) -> None:
    """Fill row `row` of an index task's result from the image's bytes: digest and header, no decode."""
    from advpipe.datasets.imagefolder import image_header

    result["digests"][row] = np.frombuffer(hashlib.sha256(data).digest(), np.uint8)
    width, height, channels = image_header(data, where)
    result["sizes"][row] = (width, height)
    result["channels"][row] = channels
    result["length"][row] = len(data)


# Storage ---------------------------------------------------------------------------------------------


_FILESYSTEMS: dict[tuple, tuple[Any, str]] = {}


def filesystem(location: str, options: dict[str, Any]) -> tuple[Any, str]:
    """(fsspec filesystem, base path) for a location, made once per process (forked workers make their own)."""
    key = (os.getpid(), location, canonical_json(options))
    if key not in _FILESYSTEMS:
        fs, base = urls.filesystem(location, options)
        _FILESYSTEMS[key] = (fs, base.rstrip("/") or "/")
    return _FILESYSTEMS[key]


@contextlib.contextmanager
def _read_errors(location: str, name: str) -> Iterator[None]:
    """A missing container means the source changed (exit 3); any other failure to read it is a DataError."""
    try:
        yield
    except FileNotFoundError:
        raise SourceChangedError(f"{urls.redact(location)}/{name}: no longer exists; the source changed since it "
                                 "was indexed") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{urls.redact(location)}/{name}: cannot read it ({urls.redact(exc)}); is the source "
                        "reachable from here?") from None


def read_bytes(location: str, options: dict[str, Any], name: str, start: int | None = None,
               stop: int | None = None) -> bytes:
    """A container's bytes (or the range [start, stop) of them); a clear DataError when unreachable."""
    if not urls.is_remote(location):
        with open_local(location, options, name) as handle, _read_errors(location, name):
            handle.seek(start or 0)
            return handle.read() if stop is None else handle.read(stop - (start or 0))
    fs, base = filesystem(location, options)
    with _read_errors(location, name):
        return fs.cat_file(f"{base}/{name}", start=start, end=stop)


@contextlib.contextmanager
def open_local(location: str, options: dict[str, Any], name: str) -> Iterator[BinaryIO]:
    """A local container opened for reading, with read_bytes' errors."""
    fs, base = filesystem(location, options)
    with _read_errors(location, name):
        handle = open(f"{base}/{name}", "rb")  # noqa: SIM115  (closed below, after the caller's reads)
    with handle:
        yield handle


def read_ranges(location: str, options: dict[str, Any], names: list[str], starts: list[int | None],
                stops: list[int | None]) -> list[bytes]:
    """Many ranges of a remote location at once (fsspec's concurrent cat_ranges); errors as read_bytes gives them."""
    fs, base = filesystem(location, options)
    try:
        found = fs.cat_ranges([f"{base}/{name}" for name in names], starts, stops, on_error="return")
    except (OSError, ValueError) as exc:
        found = [exc] * len(names)
    for name, start, stop, data in zip(names, starts, stops, found, strict=True):
        if isinstance(data, BaseException):  # the first failure, named as a single read names it
            read_bytes(location, options, name, start, stop)
            raise DataError(f"{urls.redact(location)}/{name}: cannot read it ({urls.redact(data)})")
    return found


# The source ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decode:
    """How encoded images become the split's uint8 arrays, the same for every image of a part."""

    image_size: int | None  # resize to size x size (bilinear, PIL); None: keep the common size
    native_channels: int  # 3 when any image of the part is colour (grayscale ones are then repeated), else 1
    channels: int | None  # source.channels: 1 -> 3 repeat, 3 -> 1 luminance, None: native
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels or self.native_channels)

    def describe(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "native_channels": self.native_channels, "channels": self.channels}


@dataclass(frozen=True, eq=False)
class LazySource(Source):
    """A split read image by image from its index; see the module docstring."""

    kind: str
    split: str
    index: Index
    class_names: tuple[str, ...]
    decode: Decode
    storage_options: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    fingerprint_scheme: str = CHUNKED_SCHEME

    @classmethod
    def create(cls, kind: str, split: str, index: Index, class_names: Sequence[str], decode: Decode,
               storage_options: dict[str, Any]) -> LazySource:
        names = tuple(class_names)
        check_class_names(names, index.location)
        source = cls(kind, split, index, names, decode, dict(storage_options))
        return replace(source, fingerprint=source.compute_fingerprint())

    @property
    def labels(self) -> np.ndarray:  # type: ignore[override]
        return self.index.labels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.decode.shape

    def chunk_digests(self) -> list[bytes]:
        """sha256 of each run of CHUNK images in split order: their names, labels and byte digests."""
        index, digests = self.index, []
        for start in range(0, len(index), CHUNK):
            rows = slice(start, start + CHUNK)
            digest = hashlib.sha256()
            digest.update(index.containers[index.container[rows]].astype(bytes).tobytes())
            digest.update(index.names[rows].astype(bytes).tobytes())
            digest.update(index.labels[rows].astype("<i8").tobytes())
            digest.update(index.digests[rows].tobytes())
            digests.append(digest.digest())
        return digests

    def compute_fingerprint(self) -> str:
        header = {"kind": self.kind, "split": self.split, "scheme": self.fingerprint_scheme, "count": len(self),
                  "shape": list(self.image_shape), "class_names": list(self.class_names),
                  "decode": self.decode.describe(), "chunk": CHUNK}
        digest = hashlib.sha256(canonical_json(header).encode() + b"\0")
        for chunk in self.chunk_digests():
            digest.update(chunk)
        return digest.hexdigest()

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Fetch, check and decode the images at `indices`; nothing else of the source is read."""
        from advpipe.datasets.imagefolder import load_image

        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"image index out of range for the {len(self)} images of {self.kind}/{self.split}")
        out = np.empty((len(indices), *self.image_shape), dtype=np.uint8)
        for position, row, data in self._fetch(indices):
            where = _Place(self.index, row)  # formatted only if an error names it
            if hashlib.sha256(data).digest() != self.index.digests[row].tobytes():
                raise SourceChangedError(f"{where}: its bytes changed since the source was indexed (sha256 "
                                         "differs); restore the source, or re-run to index it again")
            try:
                image = load_image(io.BytesIO(data), self.decode.image_size, where)
            except DataError as exc:  # its bytes are those indexed, so the source itself is corrupt here
                raise SourceChangedError(str(exc)) from None
            out[position] = self._finish(image, where)
        return out

    def _finish(self, image: np.ndarray, where: Any) -> np.ndarray:
        """Channels and shape as the whole-loading path gives them (imagefolder.read_split, load_source)."""
        if self.decode.native_channels == 3 and image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        image = convert_channels(image[None], self.decode.channels)[0]
        if image.shape != self.image_shape:
            raise SourceChangedError(f"{where}: decodes to {image.shape} (H, W, C), not the {self.image_shape} "
                                     "its header promised when the source was indexed; the image is corrupt")
        return image

    def _fetch(self, indices: np.ndarray):
        """(position in `indices`, index row, bytes) for each image: one range read per image, all of them
        in flight together on object storage (a shard's 1024 images would otherwise wait on 1024 round trips)."""
        index, rows = self.index, indices.tolist()
        names = [index.containers[index.container[row]].decode() for row in rows]
        whole = [not index.names[row] for row in rows]  # a file of its own: read it all, whatever its size now
        starts = [None if w else int(index.offset[row]) for w, row in zip(whole, rows, strict=True)]
        stops = [None if w else int(index.offset[row] + index.length[row]) for w, row in zip(whole, rows, strict=True)]
        if urls.is_remote(index.location) and len(rows) > 1:
            yield from zip(range(len(rows)), rows, read_ranges(index.location, self.storage_options, names, starts,
                                                               stops), strict=True)
            return
        with contextlib.ExitStack() as stack:
            handles: dict[str, Any] = {}  # a tar shard opened once for all its images asked for
            for position, (row, name, start, stop) in enumerate(zip(rows, names, starts, stops, strict=True)):
                if start is None or urls.is_remote(index.location):
                    yield position, row, read_bytes(index.location, self.storage_options, name, start, stop)
                    continue
                if name not in handles:
                    handles[name] = stack.enter_context(open_local(index.location, self.storage_options, name))
                handles[name].seek(start)
                yield position, row, handles[name].read(stop - start)


# Parts: what the formats build lazy sources from ---------------------------------------------------


def part_decode(index: Index, image_size: int | None, channels: int | None) -> Decode:
    """The decode settings of a part (a pool, or a predefined split), from its headers alone.

    Refuses, as the whole-loading path did, images of different sizes when no image_size is set.
    """
    native = 3 if (index.channels == 3).any() else 1
    if native == 3 and (index.channels == 1).any():
        log.info("%s mixes grayscale and color images; loading all as RGB", urls.redact(index.location))
    if image_size is not None:
        return Decode(image_size, native, channels, image_size, image_size)
    width, height = (int(v) for v in index.sizes[0])
    odd = np.flatnonzero((index.sizes[:, 0] != width) | (index.sizes[:, 1] != height))
    if odd.size:
        row = int(odd[0])
        raise DataError(f"{index.where(row)}: image is {index.sizes[row, 1]}x{index.sizes[row, 0]} (height x width) "
                        f"but {index.where(0)} is {height}x{width}; all images must have one size, or set "
                        "source.image_size to resize them on load")
    return Decode(None, native, channels, height, width)


def check_labels(index: Index, num_classes: int) -> None:
    bad = np.flatnonzero((index.labels < 0) | (index.labels >= num_classes))
    if bad.size:
        row = int(bad[0])
        raise DataError(f"{index.where(row)}: label {int(index.labels[row])} is outside [0, {num_classes}) for the "
                        f"{num_classes} classes ({bad.size} bad in all); fix the labels or source.class_names")


def index_cache_dir() -> Path:
    """Where indexes are kept between runs: $ADVPIPE_CACHE_DIR/source-index, else ~/.cache/advpipe/source-index."""
    base = os.environ.get("ADVPIPE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "advpipe")
    return Path(base) / "source-index"


def cached_index(identity: dict[str, Any], build: Callable[[], Index]) -> Index:
    """The index `identity` names (the format, location and listing), built once and then read from disk."""
    key = sha256_json({"version": INDEX_VERSION, **identity})
    path = index_cache_dir() / f"{key}.npz"
    if path.is_file():
        try:
            index = Index.load(path)
            log.info("source index: reusing %s (%d images; the listing is unchanged)", path, len(index))
            return index
        except (OSError, ValueError, KeyError) as exc:
            log.warning("source index %s unreadable (%s); indexing again", path, exc)
    index = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        index.save(path)
    except OSError as exc:  # a read-only home only costs the next run a second index pass
        log.warning("cannot keep the source index at %s (%s); the next run will index the source again", path, exc)
    return index


def listing_digest(entries: Sequence[tuple[str, int, Any]]) -> str:
    """sha256 of (name, size, modification time or ETag) of every container: what decides an index is current."""
    digest = hashlib.sha256()
    for name, size, version in entries:
        digest.update(canonical_json([name, int(size), str(version)]).encode())
    return digest.hexdigest()
