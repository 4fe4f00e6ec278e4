"""What one shard holds, independent of the file format: its data, where each variant lives, the reader protocol.

Variants are stacked per stored precision (docs/FORMAT.md, "Stacked arrays"): the variants kept
in the store's precision share the array named `variants`; a variant with its own precision
(`precision: float32` on a minimal attack) goes to `variants_float32`. `Layout` maps every
variant to its (array, column), so a batch costs one gather per array whatever its mix.
"""

from __future__ import annotations

import os
import stat as stat_module
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from advpipe.errors import IntegrityError, shown
from advpipe.stores.codec import DELTA_PRECISIONS, STORED_DTYPE

if TYPE_CHECKING:  # both import this module
    from advpipe.stores.manifest import ShardRecord
    from advpipe.stores.source import ShardSource, Verify

DEFAULT_ARRAY = "variants"


def local_shard_stat(root: str, name: str) -> os.stat_result:
    """The stat of shard `name` of the local store at `root`, refused unless it is a regular file inside the store.

    A store is someone else's input: a shard that is a symbolic link out of the store would
    pull in any file this process can read, and a FIFO or device would block or never end.
    A few stat calls per shard open; OSError (missing, unreadable) is left to the caller.
    """
    path = os.path.join(root, name)
    info = os.stat(path)
    if not stat_module.S_ISREG(info.st_mode):
        kind = "a directory" if stat_module.S_ISDIR(info.st_mode) else "a FIFO" if stat_module.S_ISFIFO(
            info.st_mode) else "a device or socket"
        raise IntegrityError(f"shard {name}: is {kind}, not a regular file; refused")
    real, inside = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, inside]) != inside:
        raise IntegrityError(f"shard {name}: leads outside the store (a symbolic link to {shown(real)}); refused: a "
                             "store's shards must be files inside its directory")
    return info


def array_name(precision: str, default: str) -> str:
    """The stacked array holding variants of `precision` in a store whose precision is `default`."""
    return DEFAULT_ARRAY if precision == default else f"{DEFAULT_ARRAY}_{precision}"


@dataclass(frozen=True)
class StoredArray:
    """One stacked array of a shard: (n, len(variants), C, H, W) in one stored dtype."""

    name: str
    precision: str
    variants: tuple[int, ...]  # variant indices (0-based, manifest order), in column order

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(STORED_DTYPE[self.precision])


@dataclass(frozen=True)
class Layout:
    """Which stacked array and column hold each variant (index = 0-based manifest order)."""

    names: tuple[str, ...]
    default: str  # the store's precision
    arrays: tuple[StoredArray, ...]
    array_of: np.ndarray = field(repr=False, compare=False)  # (V,) index into `arrays`
    column_of: np.ndarray = field(repr=False, compare=False)  # (V,) column within that array

    @classmethod
    def build(cls, names: Sequence[str], precisions: Sequence[str], default: str) -> Layout:
        """The layout every writer uses: the store's precision first, then others in order of first use."""
        precisions = list(precisions)
        if len(precisions) != len(names):
            raise ValueError(f"{len(names)} variants but {len(precisions)} precisions")
        mixed = set(precisions) - {default}
        if mixed and not {default, *mixed} <= set(DELTA_PRECISIONS):
            raise ValueError(f"variants of precision {sorted(mixed)} in a {default} store: a variant's own precision "
                             f"must be one of {DELTA_PRECISIONS}, in a store whose precision is one of them")
        order = sorted(set(precisions), key=lambda p: (p != default, precisions.index(p)))
        arrays = tuple(StoredArray(array_name(p, default), p, tuple(i for i, q in enumerate(precisions) if q == p))
                       for p in order)
        array_of = np.zeros(len(names), dtype=np.int64)
        column_of = np.zeros(len(names), dtype=np.int64)
        for a, array in enumerate(arrays):
            array_of[list(array.variants)] = a
            column_of[list(array.variants)] = np.arange(len(array.variants))
        return cls(tuple(names), default, arrays, array_of, column_of)

    def precision(self, variant: int) -> str:
        return self.arrays[self.array_of[variant]].precision

    def placement(self, variant: int) -> tuple[str, int]:
        """(array name, column) of one variant, as the manifest records it."""
        return self.arrays[self.array_of[variant]].name, int(self.column_of[variant])

    @property
    def dtype(self) -> np.dtype:
        """The widest stored dtype: a buffer of it holds any variant exactly (float16 -> float32 is exact)."""
        dtypes = [a.dtype for a in self.arrays] or [np.dtype(STORED_DTYPE[self.default])]
        return max(dtypes, key=lambda d: d.itemsize)

    def groups(self, variants: np.ndarray) -> list[tuple[StoredArray, np.ndarray, np.ndarray]]:
        """(array, positions in `variants`, columns) for each array the requested variants touch."""
        variants = np.asarray(variants, dtype=np.int64)
        if len(self.arrays) == 1:
            return [(self.arrays[0], np.arange(len(variants)), self.column_of[variants])] if len(variants) else []
        which = self.array_of[variants]
        out = []
        for a, array in enumerate(self.arrays):
            positions = np.flatnonzero(which == a)
            if len(positions):
                out.append((array, positions, self.column_of[variants[positions]]))
        return out


@dataclass
class ShardData:
    """A fixed range [start, start + n) of one split, with every variant in its stored form.

    `clean` is uint8 (n, C, H, W); `stored[name]` is the variant as its precision keeps it
    (advpipe.stores.codec); `failed[name]` flags images whose generator failed.
    Dict order is the manifest's variant order.
    """

    split: str
    start: int
    ids: np.ndarray
    labels: np.ndarray
    clean: np.ndarray
    stored: dict[str, np.ndarray] = field(default_factory=dict)
    failed: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ids = np.ascontiguousarray(self.ids, dtype=np.int64)
        self.labels = np.ascontiguousarray(self.labels, dtype=np.int64)
        self.clean = np.ascontiguousarray(self.clean, dtype=np.uint8)
        n = len(self.ids)
        if len(self.labels) != n or len(self.clean) != n:
            raise ValueError("ids, labels and clean images must have the same length")
        for name, stored in self.stored.items():
            if stored.shape != self.clean.shape:
                raise ValueError(f"variant '{name}' has shape {stored.shape}, clean has {self.clean.shape}")
            self.stored[name] = np.ascontiguousarray(stored)
            self.failed.setdefault(name, np.zeros(n, dtype=bool))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def stop(self) -> int:
        return self.start + len(self)

    def stacked(self, array: StoredArray, layout: Layout) -> np.ndarray:
        """The shard's (n, k, C, H, W) stacked array as writers store it."""
        return np.stack([self.stored[layout.names[v]] for v in array.variants], axis=1)

    def failed_matrix(self) -> np.ndarray:
        """Bool (n, V): the failure flags in manifest order."""
        return np.stack([self.failed[n] for n in self.stored], axis=1) if self.stored \
            else np.zeros((len(self), 0), dtype=bool)


@dataclass(frozen=True)
class MappedArrays:
    """A shard whose clean images and single stacked array are plain numpy views (of its bytes, or in memory).

    `flat` is the stacked array's bytes as uint8 (n * k, bytes per image) when it is contiguous: one
    np.take then gathers any mix of rows and variants. Bytes, because HDF5 does not align datasets
    and numpy copies a whole unaligned array before taking from it. A strided array (a WebDataset
    shard's records) has no flat view; gathers then index `variants` by (row, column).
    """

    clean: np.ndarray  # uint8 (n, C, H, W)
    variants: np.ndarray  # (n, k, C, H, W) in the store's precision
    flat: np.ndarray | None

    @classmethod
    def of(cls, clean: object, variants: object) -> MappedArrays | None:
        if not (isinstance(clean, np.ndarray) and isinstance(variants, np.ndarray)):
            return None
        rows = variants.shape[0] * variants.shape[1]
        flat = variants.reshape(rows, -1).view(np.uint8) if variants.flags.c_contiguous else None
        return cls(clean, variants, flat)


class ShardReader(ABC):
    """Read-only access to one shard file; every backend implements it (`advpipe.stores.backends.BACKENDS`).

    A reader fetches its shard through a `ShardSource` (local path or fsspec URL; size and
    sha256 checked as `verify` says) on first use, in whichever process uses it, so readers
    can be pickled into DataLoader workers: each worker fetches and opens its own copy.
    """

    def __init__(self, source: ShardSource, record: ShardRecord, layout: Layout, image_shape: tuple[int, ...],
                 verify: Verify = "checksum") -> None:
        self.source = source
        self.record = record
        self.layout = layout
        self.image_shape = tuple(image_shape)
        self.verify = verify
        self.name = record.name
        self.count = record.count

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if not key.startswith("_")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @abstractmethod
    def load(self) -> None:
        """Fetch, check and parse the shard now (later calls do nothing); raises IntegrityError naming it."""

    @property
    @abstractmethod
    def ids(self) -> np.ndarray:
        """Int64 (n,): the sample ids, `start .. stop-1` in a sound shard."""

    @property
    @abstractmethod
    def labels(self) -> np.ndarray:
        """Int64 (n,): class indices."""

    @abstractmethod
    def failed(self) -> np.ndarray:
        """Bool (n, V): True where a variant's generator failed for an image (manifest order)."""

    @abstractmethod
    def clean(self, rows: np.ndarray) -> np.ndarray:
        """Uint8 (k, C, H, W): the clean images at these rows."""

    @abstractmethod
    def gather(self, array: StoredArray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Stored (k, C, H, W): row rows[i], column columns[i] of one stacked array, in one gather."""

    def stored_pairs(self, rows: np.ndarray, variants: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Row rows[i] of variant variants[i] for every i: (positions, stored values), one gather per array."""
        return [(positions, self.gather(array, rows[positions], columns))
                for array, positions, columns in self.layout.groups(variants)]

    def mapped(self) -> MappedArrays | None:
        """The shard as numpy views for the batched read path, or None (chunked, or variants in several arrays)."""
        return None

    def clean_into(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Write the clean images at `rows` (already bounds-checked) into `out`, a contiguous uint8 buffer."""
        out[...] = self.clean(rows)

    def stored_into(self, rows: np.ndarray, variants: np.ndarray, out: np.ndarray) -> None:
        """Write row rows[i] of variant variants[i] (0-based, checked) into out[i], in out's dtype.

        The batched read path gathers straight from `mapped()` views where a backend has them; this
        serves the other shards (chunked, or variants in several arrays) through `stored_pairs`.
        """
        for positions, values in self.stored_pairs(rows, variants):
            out[positions] = values

    def stored(self, variant: int, rows: np.ndarray) -> np.ndarray:
        """One variant's stored form at these rows."""
        array = self.layout.arrays[self.layout.array_of[variant]]
        return self.gather(array, rows, np.full(len(rows), self.layout.column_of[variant]))

    def shard_data(self, split: str) -> ShardData:
        """The whole shard in its stored form (for verification, conversion and extension)."""
        rows = np.arange(self.count)
        failed = self.failed()
        return ShardData(split=split, start=self.record.start, ids=self.ids, labels=self.labels,
                         clean=self.clean(rows),
                         stored={n: self.stored(v, rows) for v, n in enumerate(self.layout.names)},
                         failed={n: failed[:, v] for v, n in enumerate(self.layout.names)})
