"""Full verification of a store: manifest, checksums, counts, shapes, values."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from advpipe.errors import AdvpipeError
from advpipe.stores.codec import STORED_DTYPE
from advpipe.stores.manifest import read_manifest
from advpipe.stores.store import Store, check_shard


@dataclass
class Report:
    store: Path
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(path: str | Path, progress: bool = False) -> Report:
    """Check every shard against the manifest; collect every problem rather than stop at the first."""
    path = Path(path)
    report = Report(store=path)
    try:
        manifest = read_manifest(path)
    except AdvpipeError as exc:
        report.problems.append(str(exc))
        return report
    store = Store(path, manifest, verify="none")
    shape = tuple(manifest.image_shape)
    for split_name, split in manifest.splits.items():
        reader = store.split(split_name)
        for index, record in enumerate(tqdm(split.shards, desc=f"verify {split_name}", disable=not progress)):
            report.shards += 1
            try:
                check_shard(path, record)
                _check_contents(reader.shard_data(index), record, shape, manifest)
                report.samples += record.count
            except AdvpipeError as exc:
                report.problems.append(str(exc))
            except Exception as exc:  # a corrupt file can fail inside h5py or numpy in many ways
                report.problems.append(f"shard {record.name}: unreadable ({type(exc).__name__}: {exc})")
    return report


def _check_contents(data, record, shape, manifest) -> None:
    def bad(message: str) -> AdvpipeError:
        return AdvpipeError(f"shard {record.name}: {message}")

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
    for name, stored in data.stored.items():
        if stored.dtype != STORED_DTYPE[manifest.precision]:
            raise bad(f"variant '{name}' is {stored.dtype}, precision '{manifest.precision}' needs "
                      f"{np.dtype(STORED_DTYPE[manifest.precision])}")
        if stored.dtype.kind == "f" and not np.isfinite(stored).all():
            raise bad(f"variant '{name}' contains NaN or inf")
