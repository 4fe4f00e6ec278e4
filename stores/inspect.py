"""Human-readable views of a store: a text card and a picture grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from advpipe.plotting import image_grid
from advpipe.stores.manifest import Manifest
from advpipe.stores.store import Store


def card(manifest: Manifest, path: Path | str) -> str:
    """A short, readable summary of what a store holds, how it was made and what generating it cost.

    Per variant and split: success on what a reader gets back, the successes lost to the
    storage round trip, norms, failures, encoding error, and generation speed (images per
    second of generator time, summed over workers) and time.
    """
    c, h, w = manifest.image_shape
    total = sum(s.bytes for split in manifest.splits.values() for s in split.shards)
    lines = [
        f"store        {path}",
        f"fingerprint  {manifest.fingerprint[:16]}  (format v{manifest.format_version}, {manifest.backend}, "
        f"precision {manifest.precision}, compression {manifest.compression or 'none'})",
        f"images       {c}x{h}x{w}, {len(manifest.class_names)} classes: {_preview(manifest.class_names)}",
        f"source       {manifest.source.get('kind', '?')}  "
        + "  ".join(f"{s}={r.count}" for s, r in manifest.splits.items()),
        f"model        {_model_line(manifest)}",
        f"seed         {manifest.seed}",
        f"size         {total / 2**20:.1f} MiB in {sum(len(s.shards) for s in manifest.splits.values())} shards",
        "",
        f"{'variant':<16}{'generator':<11}{'kind':<7}{'stored':<9}{'split':<7}{'success':>8}{'lost':>6}"
        f"{'mean L2':>9}{'max Linf':>9}{'failed':>7}{'max err':>10}{'img/s':>9}{'time':>9}  parameters",
    ]
    for variant in manifest.variants:
        params = ", ".join(f"{k}={v}" for k, v in sorted(variant.params.items()))
        for split, record in manifest.splits.items():
            stats = record.stats.get(variant.name)
            if stats is None:
                continue
            lines.append(
                f"{variant.name:<16}{variant.generator:<11}{variant.kind:<7}{variant.precision:<9}{split:<7}"
                f"{_pct(stats.success_rate):>8}{_count(stats.lost if stats.success_rate is not None else None):>6}"
                f"{_num(stats.mean_l2):>9}{_num(stats.max_linf):>9}{stats.failed:>7}{stats.max_abs_error:>10.2e}"
                f"{_rate(stats.images_per_second):>9}{_duration(stats.seconds):>9}  {params}"
            )
    return "\n".join(lines)


def _preview(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _model_line(manifest: Manifest) -> str:
    if not manifest.model:
        return "none (no attacks against a model)"
    return f"{manifest.model.get('arch', '?')}  fingerprint {str(manifest.model.get('fingerprint', '?'))[:16]}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def grid(store: Store, out: Path, split: str = "train", count: int = 8, amplify: float | None = None) -> Path:
    """Draw `count` images (rows) by every variant, each followed by its amplified perturbation."""
    reader = store.split(split)
    indices = np.linspace(0, len(reader) - 1, num=min(count, len(reader))).astype(np.int64)
    clean = reader.read(indices, 0)
    names = store.variants
    labels = reader.labels[indices]
    rows = []
    for row in range(len(indices)):
        cells: list = [(clean[row], names[0] if row == 0 else None)]
        for v, name in enumerate(names[1:], start=1):
            image = reader.read(indices[row : row + 1], v)[0]
            delta = image - clean[row]
            gain = amplify or 0.5 / max(float(np.abs(delta).max()), 1e-6)
            cells.append((image, name if row == 0 else None))
            cells.append((np.clip(0.5 + gain * delta, 0, 1), f"x{gain:.0f} diff" if row == 0 else None))
        rows.append(cells)
    row_labels = [f"#{index} {store.manifest.class_names[label]}" for index, label in zip(indices, labels, strict=True)]
    return image_grid(rows, out, row_labels=row_labels)
