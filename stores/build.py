"""Writing whole stores from in-memory arrays, and converting a store between backends.

Generation (pipeline/) writes shard by shard on many workers; these helpers are
for everything else: stores made from clean images or test arrays, and `convert`.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from advpipe.errors import StoreError
from advpipe.io import sha256_json
from advpipe.provenance import library_versions
from advpipe.stores import codec
from advpipe.stores.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, SplitRecord, VariantRecord
from advpipe.stores.shard import ShardData
from advpipe.stores.stats import Tally, merge_all
from advpipe.stores.store import Store, shard_name, write_manifest, write_shard

log = logging.getLogger(__name__)


@dataclass
class SplitArrays:
    """One split in memory: uint8 (N, C, H, W) clean images, labels, float variants in [0, 1]."""

    images: np.ndarray
    labels: np.ndarray
    variants: dict[str, np.ndarray] = field(default_factory=dict)
    source_fingerprint: str = ""


def encode_shard(split: str, start: int, clean: np.ndarray, labels: np.ndarray,
                 variants: dict[str, np.ndarray], precision: str) -> tuple[ShardData, dict[str, Tally]]:
    """Encode one shard's float variants and tally what the encoding kept."""
    clean_float = codec.to_float(clean)
    encoded = {name: codec.encode(clean, array, precision) for name, array in variants.items()}
    shard = ShardData(split=split, start=start, ids=np.arange(start, start + len(clean)), labels=labels, clean=clean,
                      stored={n: e.stored for n, e in encoded.items()},
                      failed={n: e.failed for n, e in encoded.items()})
    tallies = {n: Tally.measure(clean_float, e.decoded, e.failed, e.max_abs_error) for n, e in encoded.items()}
    return shard, tallies


def prepare_directory(path: Path, overwrite: bool) -> None:
    """Refuse to write over a finished store unless asked; never leave a stale manifest behind."""
    if (path / MANIFEST_NAME).exists():
        if not overwrite:
            raise StoreError(f"{path}: a store already exists here; choose another path, or --force to replace it "
                             "(overwrite=True in Python)")
        (path / MANIFEST_NAME).unlink()
    if path.exists() and overwrite:
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{path}: cannot write a store here ({exc.strerror or exc}); choose a writable path") from None


def build_store(path: str | Path, splits: dict[str, SplitArrays], *, class_names: list[str],
                backend: str = "hdf5", precision: str = "float16", compression: str | None = None,
                shard_size: int = 512, seed: int = 0, variant_params: dict[str, dict] | None = None,
                source: dict | None = None, model: dict | None = None, overwrite: bool = False,
                progress: bool = True) -> Manifest:
    """Write a complete store from arrays; returns its manifest."""
    path = Path(path)
    names = _variant_names(splits)
    compression = compression if backend == "hdf5" else None
    prepare_directory(path, overwrite)
    shape = next(iter(splits.values())).images.shape[1:]
    records = {}
    for split, arrays in splits.items():
        shards, tallies = [], {n: [] for n in names}
        starts = range(0, len(arrays.images), shard_size)
        for index, start in enumerate(tqdm(starts, desc=f"write {split}", disable=not progress, unit="shard")):
            stop = min(start + shard_size, len(arrays.images))
            data, shard_tallies = encode_shard(split, start, arrays.images[start:stop], arrays.labels[start:stop],
                                               {n: arrays.variants[n][start:stop] for n in names}, precision)
            shards.append(write_shard(path, shard_name(split, index, backend), data, backend, compression))
            for name in names:
                tallies[name].append(shard_tallies[name])
        records[split] = SplitRecord(count=len(arrays.images), source_fingerprint=arrays.source_fingerprint,
                                     shards=shards, stats={n: merge_all(t).summary() for n, t in tallies.items()})
    variants = [_variant_record(n, (variant_params or {}).get(n, {})) for n in names]
    content = {"splits": {s: a.source_fingerprint for s, a in splits.items()}, "precision": precision,
               "variants": [v.fingerprint for v in variants], "shard_size": shard_size, "seed": seed}
    manifest = Manifest(
        format_version=FORMAT_VERSION, fingerprint=sha256_json(content), backend=backend, precision=precision,
        compression=compression, image_shape=tuple(shape), class_names=list(class_names), seed=seed,
        source=source or {}, model=model, library_versions=library_versions(), variants=variants,
        splits=records, created_by="advpipe.stores.build_store",
    )
    write_manifest(path, manifest)
    return manifest


def _variant_names(splits: dict[str, SplitArrays]) -> list[str]:
    names = [list(a.variants) for a in splits.values()]
    if any(n != names[0] for n in names):
        raise StoreError("every split must have the same variants in the same order")
    return names[0] if names else []


def _variant_record(name: str, params: dict) -> VariantRecord:
    generator = params.get("generator", name)
    rest = {k: v for k, v in params.items() if k not in ("generator", "backend")}
    backend = params.get("backend", "arrays")
    return VariantRecord(name=name, generator=generator, backend=backend, params=rest,
                         fingerprint=sha256_json({"name": name, "generator": generator, "backend": backend,
                                                     "params": rest}))


def convert_store(source: str | Path, target: str | Path, backend: str, compression: str | None = None,
                  overwrite: bool = False, progress: bool = True) -> Manifest:
    """Rewrite a store with another backend (or compression); the stored values are unchanged."""
    store = Store.open(source)
    target = Path(target)
    compression = compression if backend == "hdf5" else None
    if target.resolve() == store.path.resolve():
        raise StoreError(f"{target}: conversion target must differ from the source store")
    prepare_directory(target, overwrite)
    splits = {}
    for split, record in store.manifest.splits.items():
        reader, shards = store.split(split), []
        for index in tqdm(range(len(record.shards)), desc=f"convert {split}", disable=not progress, unit="shard"):
            data = reader.shard_data(index)
            shards.append(write_shard(target, shard_name(split, index, backend), data, backend, compression))
        splits[split] = record.model_copy(update={"shards": shards})
    manifest = store.manifest.model_copy(update={"backend": backend, "compression": compression, "splits": splits})
    write_manifest(target, Manifest.model_validate(manifest.model_dump()))
    return manifest
