"""What a policy would yield on a store, for a person checking it before training (`advpipe sample`).

`describe_policy` runs the sampler alone (no pixels are read) and tabulates expected against realised
frequencies; `sample_grid` reads one batch and draws its images labelled with their variants.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from advpipe.config import Range, SamplerConfig
from advpipe.errors import SamplerError
from advpipe.plotting import image_grid
from advpipe.sampler.mapstyle import VariantBatchSampler, build_sampler, make_loader, resolve_store
from advpipe.stores.store import Store, Verify


def draw_batches(sampler: VariantBatchSampler, batches: int) -> list[np.ndarray]:
    """Variant ids of the first `batches` batches, running on into later epochs as needed."""
    drawn: list[np.ndarray] = []
    epoch = 0
    while len(drawn) < batches:
        sampler.set_epoch(epoch)
        for batch in sampler:
            drawn.append(np.array([variant for _, variant in batch], dtype=np.int64))
            if len(drawn) == batches:
                break
        epoch += 1
    return drawn


def _range_text(value: Range | None) -> str:
    if value is None:
        return "not drawn"
    return f"{value.lo:g}" if value.lo == value.hi else f"[{value.lo:g}, {value.hi:g}]"


def describe_policy(store: Store | str | Path, split: str, sampler_config: SamplerConfig, batches: int, *,
                    batch_size: int | None = None, verify: Verify = "checksum") -> str:
    """A readable table: per variant (clean first) its weight range, expected and realised frequency."""
    if batches < 1:
        raise SamplerError(f"batches must be at least 1, got {batches}")
    store = resolve_store(store, verify)
    sampler = build_sampler(store, split, sampler_config, batch_size=batch_size, world_size=1, rank=0)
    policy = sampler.policy
    drawn = draw_batches(sampler, batches)
    counts = np.bincount(np.concatenate(drawn), minlength=len(store.variants))
    total = int(counts.sum())
    expected = policy.expected_frequencies()
    ranges = dict(zip(policy.names, policy.ranges, strict=True))
    fractions = np.array([(ids > 0).mean() for ids in drawn])
    epochs = -(-batches // len(sampler))
    lines = [
        f"store {store.path}, split '{split}': {sampler.num_samples} images, batch {sampler.batch_size}, "
        f"{len(sampler)} batches per epoch; {batches} batches drawn ({total} samples, {epochs} epoch(s))",
        f"policy: adversarial ratio {_range_text(policy.ratio)}, redraw per {policy.redraw}, seed {policy.seed}, "
        f"adaptive {'on' if policy.adaptive else 'off'}",
        f"{'variant':<16} {'weight':>12} {'expected':>9} {'realised':>9} {'count':>8}",
    ]
    for variant, name in enumerate(store.variants):
        weight = "-" if variant == 0 else _range_text(ranges.get(name))
        lines.append(f"{name:<16} {weight:>12} {expected.get(name, 0.0):>9.3f} "
                     f"{counts[variant] / total:>9.3f} {counts[variant]:>8d}")
    lines.append(f"adversarial fraction per batch: min {fractions.min():.3f}, mean {fractions.mean():.3f}, "
                 f"max {fractions.max():.3f}")
    return "\n".join(lines)


def sample_grid(store: Store | str | Path, split: str, sampler_config: SamplerConfig, out_png: str | Path, *,
                batch_size: int | None = None, limit: int = 64, columns: int = 8,
                verify: Verify = "checksum") -> Path:
    """Draw the first batch of epoch 0 (at most `limit` images), each titled with its variant and class."""
    store = resolve_store(store, verify)
    loader = make_loader(store, split, sampler_config, batch_size=batch_size, rank=0, world_size=1)
    batch = next(iter(loader))
    classes = store.manifest.class_names
    cells = [(image, f"{store.variants[int(variant)]}\n{classes[int(label)]}")
             for image, variant, label in zip(batch.x[:limit].numpy(), batch.variant, batch.y, strict=False)]
    rows = [cells[start:start + columns] for start in range(0, len(cells), columns)]
    return image_grid(rows, out_png, cell_size=(1.6, 1.8))
