"""What a generation run must do: fingerprints, the shard plan, per-image seeds.

Everything here is a pure function of (config, source fingerprints, model
fingerprint, library versions), so a shard's bytes depend only on those and its
shard id, never on the workers that happen to compute it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from advpipe.config import Config
from advpipe.errors import ConfigError
from advpipe.io import sha256_json
from advpipe.pipeline.generators import generator_class, generator_name, validate_variant, variant_backend
from advpipe.provenance import library_versions
from advpipe.stores.backends import shard_name
from advpipe.stores.lock import Fence
from advpipe.stores.shard import Layout

SPLIT_CODES = {"train": 1, "test": 2}


@dataclass(frozen=True)
class VariantPlan:
    name: str
    generator: str
    backend: str
    params: dict[str, Any]
    needs_model: bool
    kind: str = "attack"  # the generator class's kind: 'attack', or 'shift' (left out of the default mix)
    precision: str | None = None  # the variant's own stored precision, when it differs from the store's

    @property
    def fingerprint(self) -> str:
        """What identifies the variant's stored values (docs/FORMAT.md section 2.4), given the store's precision."""
        identity = {"name": self.name, "generator": self.generator, "backend": self.backend, "params": self.params}
        if self.precision is not None:
            identity["precision"] = self.precision
        return sha256_json(identity)

    def stored_precision(self, store_precision: str) -> str:
        return self.precision or store_precision


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: a fixed image range of one split; `compute` are the variants to generate now."""

    split: str
    index: int
    start: int
    stop: int
    name: str
    compute: tuple[str, ...]


@dataclass
class JobSpec:
    """Everything a worker needs, small enough to send with every task (no images, no weights)."""

    config: dict[str, Any]
    variants: list[VariantPlan]
    fingerprint: str
    base_fingerprint: str
    model_fingerprint: str | None
    device: str
    extra: dict[str, Any] = field(default_factory=dict)
    #: lazy sources by split (their index: where each image's bytes are and their sha256), so that a worker
    #: reads its shard's images without listing or indexing the source again; small formats load themselves
    sources: dict[str, Any] = field(default_factory=dict)
    #: the client's lock fencing token for a store in object storage (None for a local store): workers check the
    #: lock object against it before they write, and stamp it into their progress records
    fence: Fence | None = None


def variant_plans(config: Config) -> list[VariantPlan]:
    plans = []
    store_precision = config.store.precision
    for name, variant in config.variants.items():
        params = validate_variant(name, variant)
        generator = generator_name(name, variant)
        cls = generator_class(generator)
        own = variant.precision if variant.precision != store_precision else None
        plans.append(VariantPlan(name=name, generator=generator, backend=variant_backend(name, variant),
                                 params=params.model_dump(mode="json"), needs_model=cls.needs_model,
                                 kind=cls.kind, precision=own))
    store_layout(plans, store_precision)
    return plans


def store_layout(plans: list[VariantPlan], store_precision: str) -> Layout:
    """Where each planned variant will be stored; refuses a variant precision the store cannot hold."""
    try:
        return Layout.build([p.name for p in plans], [p.stored_precision(store_precision) for p in plans],
                            store_precision)
    except ValueError as exc:
        raise ConfigError(f"variants: {exc}; remove the variant's `precision` or set store.precision to "
                          "float16") from None


def base_fingerprint(config: Config, source_fingerprints: dict[str, str], model_fingerprint: str | None) -> str:
    """What every variant of the store shares: data, model, precision, sharding, seed, library versions."""
    return sha256_json({
        "source": source_fingerprints, "model": model_fingerprint, "precision": config.store.precision,
        "shard_size": config.store.shard_size, "seed": config.seed, "splits": list(config.store.splits),
        "generation_batch_size": config.generation.batch_size, "libraries": library_versions(),
    })


def store_fingerprint(base: str, variants: list[VariantPlan]) -> str:
    return sha256_json({"base": base, "variants": [v.fingerprint for v in variants]})


def shard_tasks(split: str, count: int, shard_size: int, backend: str, compute: tuple[str, ...]) -> list[ShardTask]:
    return [ShardTask(split, index, start, min(start + shard_size, count), shard_name(split, index, backend), compute)
            for index, start in enumerate(range(0, count, shard_size))]


def image_seeds(seed: int, split: str, variant: str, ids: np.ndarray) -> np.ndarray:
    """One 64-bit seed per (run seed, split, variant, image id): independent streams, reproducible anywhere."""
    tag = zlib.crc32(variant.encode())
    return np.array([np.random.SeedSequence([seed, SPLIT_CODES.get(split, 0), tag, int(i)]).generate_state(
        1, np.uint64)[0] for i in ids], dtype=np.uint64)
