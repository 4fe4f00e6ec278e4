"""The manifest: what a store holds, where, and how to check it (docs/FORMAT.md).

The manifest is written last and atomically, so a directory is a store exactly
when `manifest.json` exists and validates against this schema. Everything a
reader trusts (shard names, counts, shapes) is validated here before use.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from advpipe.errors import StoreError, describe_validation_error, shorten, shown
from advpipe.stores.shard import DEFAULT_ARRAY, Layout

FORMAT = "advpipe-store"
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)  # version 2: one precision per store, no variant kinds (upgraded on reading)
MANIFEST_NAME = "manifest.json"
#: Generators whose variants are scenario shifts; only for version 2 manifests, which predate `kind`.
SHIFT_GENERATORS = frozenset({"b1", "b2"})
Precision = Literal["float16", "float32", "uint8"]

# Bounds on what a manifest may claim (docs/FORMAT.md, "What a reader refuses"): a store is someone
# else's input, and these numbers size allocations before any shard is read.
#: the largest manifest.json read (about 300,000 shard records; JSON takes ~10x its size in memory)
MAX_MANIFEST_BYTES = 64 * 2**20
#: the deepest nesting of JSON arrays and objects; writers nest 5 deep plus what `params` and `source` hold
MAX_JSON_DEPTH = 32
#: sample ids, counts and shard sizes stay far inside int64
MAX_SAMPLES = 2**40
MAX_SHARD_BYTES = 2**50
#: every sample takes at least this many bytes in any shard: its int64 id and label (HDF5) or 4 tar headers
MIN_SAMPLE_BYTES = 16
#: an image side, and the values of one image (C * H * W): 3 x 4096 x 4096 fits
MAX_IMAGE_SIDE = 2**16
MAX_IMAGE_VALUES = 2**26
#: the longest shard name (a path inside the store), and variant or split name
MAX_NAME_CHARS = 1024
MAX_VARIANT_NAME_CHARS = 255
#: characters no name in a manifest may hold: a NUL fails inside os.stat, escapes rewrite a terminal
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


ImageSide = Annotated[int, Field(ge=1, le=MAX_IMAGE_SIDE)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardRecord(Strict):
    """One shard file: the half-open sample range [start, stop) of its split."""

    name: str = Field(max_length=MAX_NAME_CHARS)
    start: int = Field(ge=0, le=MAX_SAMPLES)
    stop: int = Field(ge=0, le=MAX_SAMPLES)
    bytes: int = Field(ge=0, le=MAX_SHARD_BYTES)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("name")
    @classmethod
    def _inside_store(cls, name: str) -> str:
        return safe_relative_name(name)

    @model_validator(mode="after")
    def _fits(self) -> ShardRecord:
        """A shard cannot hold more samples than its bytes can carry, so counts never outgrow the real files."""
        if self.count * MIN_SAMPLE_BYTES > self.bytes:
            raise ValueError(f"shard {self.name} claims {self.count} samples in {self.bytes} bytes; every sample "
                             f"takes at least {MIN_SAMPLE_BYTES}")
        return self

    @property
    def count(self) -> int:
        return self.stop - self.start


class VariantStats(Strict):
    """Per-variant statistics over one split, filled in by generation.

    `fooled`/`success_rate` are measured on what a reader gets back, `fooled_fresh`/
    `success_rate_fresh` on the generator's own output; `lost` counts the images that
    fooled the model fresh but not after the storage round trip. None: not recorded
    (format version 2 stores; timing of stores built from arrays).
    """

    count: int = 0
    failed: int = 0
    clean_correct: int = 0
    fooled: int = 0
    success_rate: float | None = None
    fooled_fresh: int | None = None
    success_rate_fresh: float | None = None
    lost: int | None = None
    seconds: float | None = None
    images_per_second: float | None = None
    mean_l2: float | None = None
    max_l2: float | None = None
    mean_linf: float | None = None
    max_linf: float | None = None
    max_abs_error: float = 0.0
    #: images that got their generator's documented fallback (style: no image of another class in
    #: the split); None: not recorded (stores written before this field)
    fallbacks: int | None = None


class SplitRecord(Strict):
    count: int = Field(ge=0, le=MAX_SAMPLES)
    source_fingerprint: str
    shards: list[ShardRecord]
    stats: dict[str, VariantStats] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _contiguous(self) -> SplitRecord:
        position = 0
        for shard in self.shards:
            if shard.start != position or shard.stop <= shard.start:
                raise ValueError(
                    f"shard {shard.name} covers [{shard.start}, {shard.stop}), expected to start at {position}"
                )
            position = shard.stop
        if position != self.count:
            raise ValueError(f"shards cover {position} samples but count is {self.count}")
        return self


class VariantRecord(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$", max_length=MAX_VARIANT_NAME_CHARS)
    generator: str
    backend: str
    params: dict[str, Any]
    fingerprint: str
    kind: Literal["attack", "shift"]  # shift: a distribution shift the sampler's default mix leaves out
    precision: Precision  # how this variant is stored (docs/FORMAT.md section 3)
    array: str  # the stacked array that holds it ('variants', 'variants_float32')
    column: int = Field(ge=0)  # its index along that array's variant axis

    @field_validator("name")
    @classmethod
    def _not_clean(cls, name: str) -> str:
        if name == "clean":
            raise ValueError("'clean' is reserved for the source image (variant id 0)")
        return name


class Manifest(Strict):
    format: Literal["advpipe-store"] = FORMAT
    format_version: int
    fingerprint: str
    backend: Literal["hdf5", "webdataset"]
    precision: Precision
    compression: Literal["gzip", "lzf"] | None = None
    image_shape: tuple[ImageSide, ImageSide, ImageSide]
    class_names: list[str]
    seed: int
    source: dict[str, Any]
    model: dict[str, Any] | None
    library_versions: dict[str, str]
    variants: list[VariantRecord]
    splits: dict[str, SplitRecord]
    created_by: str = ""
    generation: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, raw: Any) -> Any:
        """Read a version 2 manifest as version 3: one precision, kinds from generator names, one array."""
        if not isinstance(raw, dict) or raw.get("format_version") != 2 or not isinstance(raw.get("variants"), list):
            return raw
        variants = [{"kind": "shift" if v.get("generator") in SHIFT_GENERATORS else "attack",
                     "precision": raw.get("precision"), "array": DEFAULT_ARRAY, "column": column, **v}
                    if isinstance(v, dict) else v for column, v in enumerate(raw["variants"])]
        return {**raw, "variants": variants}

    @field_validator("variants")
    @classmethod
    def _unique(cls, variants: list[VariantRecord]) -> list[VariantRecord]:
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            repeated = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(f"variant names repeat: {shown(repeated)}")
        return variants

    @field_validator("image_shape")
    @classmethod
    def _image_size(cls, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        if math.prod(shape) > MAX_IMAGE_VALUES:
            raise ValueError(f"an image of {math.prod(shape)} values is more than this reader takes "
                             f"({MAX_IMAGE_VALUES})")
        return shape

    @field_validator("splits")
    @classmethod
    def _split_names(cls, splits: dict[str, SplitRecord]) -> dict[str, SplitRecord]:
        for name in splits:
            if not 0 < len(name) <= MAX_VARIANT_NAME_CHARS or _CONTROL.search(name):
                raise ValueError(f"split name {shown(name)} must be 1 to {MAX_VARIANT_NAME_CHARS} characters, "
                                 "without control characters")
        return splits

    @model_validator(mode="after")
    def _images_fit(self) -> Manifest:
        """Uncompressed shards hold every clean image whole, so each shard must have room for them."""
        if self.backend == "hdf5" and self.compression is not None:
            return self
        values = math.prod(self.image_shape)
        for split in self.splits.values():
            for shard in split.shards:
                if shard.count * values > shard.bytes:
                    raise ValueError(f"shard {shard.name} claims {shard.count} images of {values} bytes in "
                                     f"{shard.bytes} bytes")
        return self

    @model_validator(mode="after")
    def _placed(self) -> Manifest:
        """Each variant's array and column are the ones writers use (docs/FORMAT.md section 5.2)."""
        try:
            layout = self.layout
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        for index, variant in enumerate(self.variants):
            if (variant.array, variant.column) != layout.placement(index):
                raise ValueError(f"variant '{variant.name}' is placed at {variant.array}[{variant.column}], a "
                                 f"{variant.precision} variant of a {self.precision} store belongs at "
                                 "{}[{}]".format(*layout.placement(index)))
        return self

    @field_validator("format_version")
    @classmethod
    def _supported(cls, version: int) -> int:
        if version == 1:
            raise ValueError(
                "store format version 1 (one HDF5 dataset per variant) is no longer read: version 2 stacks the "
                "variants of a shard so that a batch is one read per shard; regenerate the store with "
                "`advpipe generate CONFIG --force`"
            )
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"store format version {version} is not supported by this advpipe (it reads versions "
                f"{' and '.join(map(str, READABLE_VERSIONS))}); convert the store with the advpipe that wrote it "
                "or regenerate it"
            )
        return version

    @property
    def variant_names(self) -> list[str]:
        return [variant.name for variant in self.variants]

    @property
    def layout(self) -> Layout:
        """Where each variant is stored: its stacked array and column."""
        return Layout.build(self.variant_names, [v.precision for v in self.variants], self.precision)

    def variants_of_kind(self, kind: str) -> list[str]:
        return [v.name for v in self.variants if v.kind == kind]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def variant(self, name: str) -> VariantRecord:
        for record in self.variants:
            if record.name == name:
                return record
        raise StoreError(f"store has no variant {shown(name)} (it has: "
                         f"{shorten(', '.join(self.variant_names)) or 'none'})")


def _depth(value: Any) -> int:
    """How deeply JSON arrays and objects nest in `value`, without recursion (stops counting past the limit)."""
    deepest, stack = 0, [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            break
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def safe_relative_name(name: str) -> str:
    """Refuse shard names that could point outside the store directory."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name or name.startswith("~"):
        raise ValueError(f"shard name {shown(name)} must be a relative path inside the store")
    if _CONTROL.search(name):
        raise ValueError(f"shard name {shown(name)} holds control characters")
    return name


def read_manifest(store_dir: str | Path) -> Manifest:
    """Load and validate a store's manifest; a missing or partial one means 'not a finished store'."""
    store_dir = Path(store_dir)
    path = store_dir / MANIFEST_NAME
    if not store_dir.is_dir():
        problem = "not a directory (a store is a directory)" if store_dir.exists() else "no such store directory"
        raise StoreError(f"{store_dir}: {problem}")
    if path.exists() and not path.is_file():
        raise StoreError(f"{path}: not a regular file (a FIFO, device or directory); refused")
    if not path.is_file():
        if not (store_dir / ".generation.json").exists():
            raise StoreError(f"{store_dir}: not a finished store (no {MANIFEST_NAME}), and no generation has "
                             "started here: is this the store directory? (stores are made by `advpipe generate`)")
        raise StoreError(
            f"{store_dir}: not a finished store (no {MANIFEST_NAME}); it may still be being generated, "
            "or generation was interrupted: re-run `advpipe generate` to complete it"
        )
    _check_manifest_file(store_dir, path)
    return parse_manifest(path.read_bytes(), str(path))


def _check_manifest_file(store_dir: Path, path: Path) -> None:
    """A manifest (a regular file) lies inside the store and has a size this reader takes, before a byte is read."""
    real, inside = os.path.realpath(path), os.path.realpath(store_dir)
    if os.path.commonpath([real, inside]) != inside:
        raise StoreError(f"{path}: leads outside the store (a symbolic link to {shown(real)}); refused")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise StoreError(f"{path}: {path.stat().st_size} bytes, more than a manifest may have "
                         f"({MAX_MANIFEST_BYTES}); refused")


def parse_manifest(text: str | bytes, origin: str) -> Manifest:
    """Validate a manifest's JSON text; `origin` (a path or URL) names it in every error."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise StoreError(f"{origin}: {len(text)} bytes, more than a manifest may have ({MAX_MANIFEST_BYTES}); "
                         "refused")
    try:
        raw = json.loads(text)
    except RecursionError:
        raise StoreError(f"{origin}: manifest nests JSON deeper than {MAX_JSON_DEPTH} levels; refused") from None
    except (ValueError, UnicodeDecodeError) as exc:  # ValueError: also numbers of over 4300 digits
        raise StoreError(f"{origin}: manifest is not valid JSON ({shorten(str(exc))})") from None
    if _depth(raw) > MAX_JSON_DEPTH:
        raise StoreError(f"{origin}: manifest nests JSON deeper than {MAX_JSON_DEPTH} levels; refused")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise StoreError(f"{origin}: not an advpipe store manifest (missing \"format\": \"{FORMAT}\")")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(describe_validation_error(exc))
        raise StoreError(f"{origin}: manifest fails validation: {problems}") from None
