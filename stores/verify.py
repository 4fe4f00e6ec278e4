"""Full verification of a store, local or behind a URL: manifest, checksums, counts, shapes, values."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from advpipe.errors import AdvpipeError, IntegrityError, shorten
from advpipe.stores.manifest import Manifest, ShardRecord
from advpipe.stores.shard import ShardData
from advpipe.stores.source import ShardSource
from advpipe.stores.store import Store


@dataclass
class Report:
    store: Path | str
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(location: str | os.PathLike, progress: bool = False,
                 storage_options: dict[str, Any] | None = None) -> Report:
    """Check every shard against the manifest; collect every problem rather than stop at the first."""
    source = ShardSource(location, storage_options, verify="checksum")
    report = Report(store=source.display)
    try:
        manifest = source.manifest()
    except AdvpipeError as exc:
        report.problems.append(str(exc))
        return report
    store = Store(source, manifest, verify="checksum")
    for split_name, split in manifest.splits.items():
        reader = store.split(split_name)
        for index, record in enumerate(tqdm(split.shards, desc=f"verify {split_name}", disable=not progress)):
            report.shards += 1
            try:
                _check_contents(reader.shard_data(index), record, manifest)
                report.samples += record.count
            except AdvpipeError as exc:
                report.problems.append(str(exc))
            except Exception as exc:  # a corrupt file can fail inside h5py or numpy in many ways
                report.problems.append(f"shard {record.name}: unreadable ({type(exc).__name__}: {shorten(str(exc))})")
            finally:
                reader.release(index)  # one shard in memory at a time
    return report


def _check_contents(data: ShardData, record: ShardRecord, manifest: Manifest) -> None:
    def bad(message: str) -> IntegrityError:
        return IntegrityError(f"shard {record.name}: {message}")

    shape = tuple(manifest.image_shape)
    if len(data) != record.count:
        raise bad(f"holds {len(data)} samples, manifest says {record.count}")
    if not np.array_equal(data.ids, np.arange(record.start, record.stop)):
        raise bad(f"sample ids are not {record.start}..{record.stop - 1}")
    if data.clean.shape[1:] != shape:
        raise bad(f"images have shape {data.clean.shape[1:]}, manifest says {shape}")
    if len(data.labels) and (data.labels.min() < 0 or data.labels.max() >= manifest.num_classes):
        raise bad(f"labels outside [0, {manifest.num_classes})")
    if list(data.stored) != manifest.variant_names:
        raise bad(f"variants {list(data.stored)} differ from the manifest's {manifest.variant_names}")
    layout = manifest.layout
    for index, (name, stored) in enumerate(data.stored.items()):
        expected = np.dtype(layout.arrays[layout.array_of[index]].dtype)
        if stored.dtype != expected:
            raise bad(f"variant '{name}' is {stored.dtype}, its precision '{layout.precision(index)}' needs {expected}")
        if stored.dtype.kind == "f" and not np.isfinite(stored).all():
            raise bad(f"variant '{name}' contains NaN or inf")
