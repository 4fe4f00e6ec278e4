"""Writing whole stores from in-memory arrays, and converting a store between backends.

Generation (advpipe.pipeline) writes shard by shard on many workers; these helpers are
for everything else: stores made from clean images or test arrays, and `convert`. All of
them write through `advpipe.stores.writer.StoreWriter`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from advpipe.errors import StoreError
from advpipe.io import sha256_json
from advpipe.provenance import library_versions
from advpipe.stores import codec
from advpipe.stores.backends import shard_name
from advpipe.stores.manifest import FORMAT_VERSION, SHIFT_GENERATORS, Manifest, SplitRecord, VariantRecord
from advpipe.stores.shard import Layout, ShardData
from advpipe.stores.stats import Tally, merge_all
from advpipe.stores.store import Store
from advpipe.stores.writer import StoreWriter

log = logging.getLogger(__name__)

#: Keys of `variant_params` entries that describe the variant rather than its generator's parameters.
DESCRIPTIVE = ("generator", "backend", "kind", "precision")


@dataclass
class SplitArrays:
    """One split in memory: uint8 (N, C, H, W) clean images, labels, float variants in [0, 1]."""

    images: np.ndarray
    labels: np.ndarray
    variants: dict[str, np.ndarray] = field(default_factory=dict)
    source_fingerprint: str = ""


def encode_shard(split: str, start: int, clean: np.ndarray, labels: np.ndarray, variants: dict[str, np.ndarray],
                 precisions: dict[str, str]) -> tuple[ShardData, dict[str, Tally]]:
    """Encode one shard's float variants, each in its own precision, and tally what the encoding kept."""
    clean_float = codec.to_float(clean)
    encoded = {name: codec.encode(clean, array, precisions[name]) for name, array in variants.items()}
    shard = ShardData(split=split, start=start, ids=np.arange(start, start + len(clean)), labels=labels, clean=clean,
                      stored={n: e.stored for n, e in encoded.items()},
                      failed={n: e.failed for n, e in encoded.items()})
    tallies = {n: Tally.measure(clean_float, e.decoded, e.failed, e.max_abs_error) for n, e in encoded.items()}
    return shard, tallies


def build_store(path: str | Path, splits: dict[str, SplitArrays], *, class_names: list[str],
                backend: str = "hdf5", precision: str = "float16", compression: str | None = None,
                shard_size: int = 512, seed: int = 0, variant_params: dict[str, dict] | None = None,
                source: dict | None = None, model: dict | None = None, overwrite: bool = False,
                progress: bool = True) -> Manifest:
    """Write a complete store from arrays; returns its manifest.

    `variant_params[name]` holds the variant's generator parameters, plus optionally its
    `generator`, `backend` (implementation), `kind` ('attack' or 'shift') and its own
    `precision` (float16 or float32 in a float16 or float32 store).
    """
    names = _variant_names(splits)
    variants = [_variant_record(n, (variant_params or {}).get(n, {}), precision) for n in names]
    try:
        layout = Layout.build(names, [v["precision"] for v in variants], precision)
    except ValueError as exc:
        raise StoreError(str(exc)) from None
    records = [VariantRecord(**v, array=layout.placement(i)[0], column=layout.placement(i)[1])
               for i, v in enumerate(variants)]
    counts = {split: -(-len(arrays.images) // max(shard_size, 1)) for split, arrays in splits.items()}
    writer = StoreWriter(path, backend, compression, layout, splits=counts)
    with writer.writing_whole(overwrite, "advpipe.stores.build_store"):
        splits_out = {split: _write_split(writer, split, arrays, records, shard_size, progress)
                      for split, arrays in splits.items()}
        manifest = _built_manifest(splits, splits_out, records, writer.compression, class_names=class_names,
                                   backend=backend, precision=precision, shard_size=shard_size, seed=seed,
                                   source=source, model=model)
        writer.publish(manifest)
    return manifest


def _write_split(writer: StoreWriter, split: str, arrays: SplitArrays, records: list[VariantRecord],
                 shard_size: int, progress: bool) -> SplitRecord:
    """Encode and write one split's shards; its record carries the merged statistics of every variant."""
    names = [v.name for v in records]
    precisions = {v.name: v.precision for v in records}
    shards, tallies = [], {n: [] for n in names}
    starts = range(0, len(arrays.images), shard_size)
    for index, start in enumerate(tqdm(starts, desc=f"write {split}", disable=not progress, unit="shard")):
        stop = min(start + shard_size, len(arrays.images))
        data, shard_tallies = encode_shard(split, start, arrays.images[start:stop], arrays.labels[start:stop],
                                           {n: arrays.variants[n][start:stop] for n in names}, precisions)
        shards.append(writer.write_shard(shard_name(split, index, writer.backend.name), data))
        for name in names:
            tallies[name].append(shard_tallies[name])
    return SplitRecord(count=len(arrays.images), source_fingerprint=arrays.source_fingerprint,
                       shards=shards, stats={n: merge_all(t).summary() for n, t in tallies.items()})


def _built_manifest(splits: dict[str, SplitArrays], splits_out: dict[str, SplitRecord],
                    records: list[VariantRecord], compression: str | None, *, class_names: list[str], backend: str,
                    precision: str, shard_size: int, seed: int, source: dict | None, model: dict | None) -> Manifest:
    shape = next(iter(splits.values())).images.shape[1:]
    content = {"splits": {s: a.source_fingerprint for s, a in splits.items()}, "precision": precision,
               "variants": [v.fingerprint for v in records], "shard_size": shard_size, "seed": seed}
    manifest = Manifest(
        format_version=FORMAT_VERSION, fingerprint=sha256_json(content), backend=backend, precision=precision,
        compression=compression, image_shape=tuple(shape), class_names=list(class_names), seed=seed,
        source=source or {}, model=model, library_versions=library_versions(), variants=records,
        splits=splits_out, created_by="advpipe.stores.build_store",
    )
    return manifest


def _variant_names(splits: dict[str, SplitArrays]) -> list[str]:
    names = [list(a.variants) for a in splits.values()]
    if any(n != names[0] for n in names):
        raise StoreError("every split must have the same variants in the same order")
    return names[0] if names else []


def _variant_record(name: str, params: dict, store_precision: str) -> dict[str, Any]:
    """A variant record's fields (without its placement), as generation would record them."""
    generator = params.get("generator", name)
    rest = {k: v for k, v in params.items() if k not in DESCRIPTIVE}
    backend = params.get("backend", "arrays")
    own = params.get("precision")
    identity = {"name": name, "generator": generator, "backend": backend, "params": rest}
    if own is not None and own != store_precision:
        identity["precision"] = own
    return {**identity, "fingerprint": sha256_json(identity), "precision": own or store_precision,
            "kind": params.get("kind", "shift" if generator in SHIFT_GENERATORS else "attack")}


def convert_store(source: str | os.PathLike, target: str | Path, backend: str, compression: str | None = None,
                  overwrite: bool = False, progress: bool = True) -> Manifest:
    """Rewrite a store (local or a URL) with another backend or compression; the stored values are unchanged.

    A format version 2 store comes out in the current version, with identical values. The target may not
    be the source, inside it or around it: replacing it (`overwrite`) would delete the source. A conversion
    that fails (a corrupt source shard, a full disk, Ctrl-C) removes what it wrote, and the target directory
    when it made it: no partial store is left behind.
    """
    store = Store.open(source)
    counts = {split: len(record.shards) for split, record in store.manifest.splits.items()}
    writer = StoreWriter(target, backend, compression, store.layout, protect=[store.source.location], splits=counts)
    with writer.writing_whole(overwrite, "advpipe convert"):
        splits = {}
        for split, record in store.manifest.splits.items():
            reader, shards = store.split(split), []
            for index in tqdm(range(len(record.shards)), desc=f"convert {split}", disable=not progress,
                              unit="shard"):
                shards.append(writer.write_shard(shard_name(split, index, backend), reader.shard_data(index)))
                reader.release(index)
            splits[split] = record.model_copy(update={"shards": shards})
        manifest = store.manifest.model_copy(update={"backend": backend, "compression": writer.compression,
                                                     "splits": splits, "format_version": FORMAT_VERSION})
        manifest = Manifest.model_validate(manifest.model_dump())
        writer.publish(manifest)
    return manifest
