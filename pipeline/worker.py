"""What runs on a Dask worker: one shard from source images to a published shard file.

A worker process keeps one context per job: the model is loaded once and every
generator built once (an ART classifier wrapper included), then reused by every
shard task that lands on it. Tasks carry only a small spec; the worker reads the
source images itself and writes its shard straight into the store, so images
never travel through the scheduler.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from advpipe.config import Config, config_from_dict
from advpipe.datasets import load_source
from advpipe.errors import GenerationError, IntegrityError
from advpipe.faults import fault_point
from advpipe.io import atomic_write_json, sha256_json
from advpipe.pipeline.generators import generator_class
from advpipe.pipeline.generators.base import Generator
from advpipe.pipeline.plan import JobSpec, ShardTask, VariantPlan, image_seeds
from advpipe.stores import codec
from advpipe.stores.hdf5 import HDF5Shard
from advpipe.stores.manifest import ShardRecord
from advpipe.stores.shard import ShardData
from advpipe.stores.stats import Tally
from advpipe.stores.store import check_shard, write_shard
from advpipe.stores.wds import WdsShard

log = logging.getLogger(__name__)

PROGRESS_DIR = ".progress"
_CONTEXTS: dict[str, WorkerContext] = {}


@dataclass
class WorkerContext:
    """Per-process, per-job state: parsed config, the model, built generators."""

    config: Config
    device: torch.device
    model: torch.nn.Module | None
    generators: dict[str, Generator] = field(default_factory=dict)

    def generator(self, plan: VariantPlan) -> Generator:
        if plan.name not in self.generators:
            cls = generator_class(plan.generator)
            self.generators[plan.name] = cls(cls.params_model.model_validate(plan.params), self.model,
                                             backend=plan.backend, device=self.device,
                                             batch_size=self.config.generation.batch_size)
        return self.generators[plan.name]


def context(job: JobSpec) -> WorkerContext:
    """This process's context for the job, built on its first task (the key covers paths too)."""
    key = sha256_json({"fingerprint": job.fingerprint, "config": job.config, "device": job.device})
    if key not in _CONTEXTS:
        from advpipe.models.checkpoint import load_checkpoint

        _CONTEXTS.clear()
        config = config_from_dict(job.config)
        torch.set_num_threads(config.generation.threads_per_worker)
        device = torch.device(job.device)
        model = None
        if job.model_fingerprint is not None:
            model, meta = load_checkpoint(config.model.checkpoint, device=device)
            if meta.fingerprint != job.model_fingerprint:
                raise GenerationError(f"{config.model.checkpoint}: model changed since the job started "
                                      "(fingerprint differs); re-run generate")
            model.requires_grad_(False)
        _CONTEXTS[key] = WorkerContext(config, device, model)
    return _CONTEXTS[key]


def run_shard(task: ShardTask, job: JobSpec) -> dict:
    """Generate, encode, write and record one shard; returns its progress record."""
    ctx = context(job)
    config = ctx.config
    source = load_source(config.source, task.split)
    clean = np.ascontiguousarray(source.images[task.start : task.stop].transpose(0, 3, 1, 2))
    labels = np.array(source.labels[task.start : task.stop])  # writable copy for torch
    stored, failed, tallies = {}, {}, {}
    existing = _existing_shard(config, task, job) if len(task.compute) < len(job.variants) else None
    clean_float = codec.to_float(clean)
    clean_pred = _predict(ctx, clean_float)
    for plan in job.variants:
        name = plan.name
        if name in task.compute:
            encoded = codec.encode(clean, _generate(ctx, plan, task, clean_float, labels), config.store.precision)
            stored[name], failed[name], error, decoded = (encoded.stored, encoded.failed, encoded.max_abs_error,
                                                          encoded.decoded)
        else:  # reused from the store being extended
            stored[name], failed[name] = existing.stored[name], existing.failed[name]
            error = job.extra["previous"]["errors"][task.split][name]
            decoded = codec.decode(clean, stored[name], config.store.precision)
        tallies[name] = Tally.measure(clean_float, decoded, failed[name], error, clean_pred, _predict(ctx, decoded),
                                      labels)
    shard = ShardData(split=task.split, start=task.start, ids=np.arange(task.start, task.stop), labels=labels,
                      clean=clean, stored=stored, failed=failed)
    fault_point("mid-shard")
    record = write_shard(Path(config.store.path), task.name, shard, config.store.backend, config.store.compression)
    progress = {"fingerprint": job.fingerprint, "record": record.model_dump(),
                "tallies": {name: tally.to_dict() for name, tally in tallies.items()}}
    atomic_write_json(progress_path(config.store.path, task), progress)
    return progress


def progress_path(store_dir: str | Path, task: ShardTask) -> Path:
    return Path(store_dir) / PROGRESS_DIR / f"{task.split}-{task.index:05d}.json"


def _generate(ctx: WorkerContext, plan: VariantPlan, task: ShardTask, clean_float: np.ndarray,
              labels: np.ndarray) -> np.ndarray:
    """Run one generator over the shard in fixed batches (fixed batch boundaries keep bytes reproducible)."""
    generator = ctx.generator(plan)
    batch_size = ctx.config.generation.batch_size
    ids = np.arange(task.start, task.stop)
    seeds = image_seeds(ctx.config.seed, task.split, plan.name, ids)
    out = np.empty_like(clean_float)
    for begin in range(0, len(clean_float), batch_size):
        end = begin + batch_size
        x = torch.from_numpy(clean_float[begin:end]).to(ctx.device)
        y = torch.from_numpy(labels[begin:end]).to(ctx.device)
        result = generator.generate(x, y, seeds[begin:end])
        if tuple(result.shape) != tuple(x.shape):
            raise GenerationError(f"generator '{plan.name}' returned shape {tuple(result.shape)} for input "
                                  f"{tuple(x.shape)}")
        out[begin:end] = result.detach().float().cpu().numpy()
    return out


@torch.no_grad()
def _predict(ctx: WorkerContext, images: np.ndarray) -> np.ndarray | None:
    if ctx.model is None or not ctx.config.generation.statistics:
        return None
    batch_size = ctx.config.generation.batch_size
    predictions = [ctx.model(torch.from_numpy(images[i : i + batch_size]).to(ctx.device)).argmax(1).cpu()
                   for i in range(0, len(images), batch_size)]
    return torch.cat(predictions).numpy()


def _existing_shard(config: Config, task: ShardTask, job: JobSpec) -> ShardData:
    """The stored variants of this shard from the store being extended (checked against its old checksum)."""
    previous = job.extra["previous"]
    path = Path(config.store.path) / task.name
    check_shard(Path(config.store.path), ShardRecord.model_validate(previous["shards"][task.name]))
    opener = HDF5Shard if config.store.backend == "hdf5" else WdsShard
    reader = opener(path, previous["variants"], task.stop - task.start)
    rows = np.arange(task.stop - task.start)
    if not np.array_equal(reader.ids, rows + task.start):
        raise IntegrityError(f"shard {task.name}: holds other images than expected; regenerate with --force")
    return ShardData(split=task.split, start=task.start, ids=reader.ids, labels=reader.labels, clean=reader.clean(rows),
                     stored={n: reader.stored(v, rows) for v, n in enumerate(previous["variants"])},
                     failed={n: reader.failed(v) for v, n in enumerate(previous["variants"])})
