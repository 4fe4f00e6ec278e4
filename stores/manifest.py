"""The manifest: what a store holds, where, and how to check it (docs/FORMAT.md).

The manifest is written last and atomically, so a directory is a store exactly
when `manifest.json` exists and validates against this schema. Everything a
reader trusts (shard names, counts, shapes) is validated here before use.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from advpipe.errors import StoreError, describe_validation_error
from advpipe.stores.shard import DEFAULT_ARRAY, Layout

FORMAT = "advpipe-store"
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)  # version 2: one precision per store, no variant kinds (upgraded on reading)
MANIFEST_NAME = "manifest.json"
#: Generators whose variants are scenario shifts; only for version 2 manifests, which predate `kind`.
SHIFT_GENERATORS = frozenset({"b1", "b2"})
Precision = Literal["float16", "float32", "uint8"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardRecord(Strict):
    """One shard file: the half-open sample range [start, stop) of its split."""

    name: str
    start: int = Field(ge=0)
    stop: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("name")
    @classmethod
    def _inside_store(cls, name: str) -> str:
        return safe_relative_name(name)

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
    count: int = Field(ge=0)
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
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
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
    image_shape: tuple[int, int, int]
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
            raise ValueError(f"variant names repeat: {names}")
        return variants

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
        raise StoreError(f"store has no variant '{name}' (it has: {', '.join(self.variant_names) or 'none'})")


def safe_relative_name(name: str) -> str:
    """Refuse shard names that could point outside the store directory."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name or name.startswith("~"):
        raise ValueError(f"shard name '{name}' must be a relative path inside the store")
    return name


def read_manifest(store_dir: str | Path) -> Manifest:
    """Load and validate a store's manifest; a missing or partial one means 'not a finished store'."""
    store_dir = Path(store_dir)
    path = store_dir / MANIFEST_NAME
    if not store_dir.is_dir():
        problem = "not a directory (a store is a directory)" if store_dir.exists() else "no such store directory"
        raise StoreError(f"{store_dir}: {problem}")
    if not path.is_file():
        if not (store_dir / ".generation.json").exists():
            raise StoreError(f"{store_dir}: not a finished store (no {MANIFEST_NAME}), and no generation has "
                             "started here: is this the store directory? (stores are made by `advpipe generate`)")
        raise StoreError(
            f"{store_dir}: not a finished store (no {MANIFEST_NAME}); it may still be being generated, "
            "or generation was interrupted: re-run `advpipe generate` to complete it"
        )
    return parse_manifest(path.read_bytes(), str(path))


def parse_manifest(text: str | bytes, origin: str) -> Manifest:
    """Validate a manifest's JSON text; `origin` (a path or URL) names it in every error."""
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{origin}: manifest is not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise StoreError(f"{origin}: not an advpipe store manifest (missing \"format\": \"{FORMAT}\")")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(describe_validation_error(exc))
        raise StoreError(f"{origin}: manifest fails validation: {problems}") from None
