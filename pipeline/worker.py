"""What runs on a Dask worker: one shard from source images to a published shard file.

A worker process keeps one context per job: the model is loaded once and every
generator built once (an ART classifier wrapper included), then reused by every
shard task that lands on it. Tasks carry only a small spec; the worker reads the
source images itself and writes its shard straight into the store (a directory, or
object storage with credentials from the worker's own environment), so images never
travel through the scheduler and no shared file system is needed.

A worker writing to object storage is fenced with the client's lock token (`JobSpec.fence`): it
checks the lock object before it computes a shard and before each object it writes, and a worker
that finds the lock taken over stops with LockLostError instead of writing (stores/lock.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from advpipe import urls
from advpipe.config import Config, config_from_dict
from advpipe.datasets import load_source
from advpipe.errors import GenerationError, IntegrityError
from advpipe.faults import fault_point
from advpipe.io import sha256_json
from advpipe.pipeline.generators import generator_class
from advpipe.pipeline.generators.base import Generator
from advpipe.pipeline.plan import JobSpec, ShardTask, VariantPlan, image_seeds, store_layout
from advpipe.stores import codec
from advpipe.stores.backends import backend
from advpipe.stores.manifest import ShardRecord
from advpipe.stores.shard import Layout, ShardData
from advpipe.stores.source import ShardSource
from advpipe.stores.stats import Tally
from advpipe.stores.writer import StoreWriter

log = logging.getLogger(__name__)

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
    writer = StoreWriter(config.store.path, config.store.backend, config.store.compression,
                         store_layout(job.variants, config.store.precision),
                         storage_options=urls.config_storage_options(config.store.path, config.store),
                         fence=job.fence)
    writer.check_fence()  # a writer taken over computes nothing more
    source = job.sources.get(task.split) or load_source(config.source, task.split)
    clean = np.ascontiguousarray(source.read(np.arange(task.start, task.stop)).transpose(0, 3, 1, 2))
    labels = np.array(source.labels[task.start : task.stop])  # writable copy for torch
    stored, failed, tallies = {}, {}, {}
    existing = _existing_shard(config, task, job, clean.shape[1:]) if len(task.compute) < len(job.variants) else None
    clean_float = codec.to_float(clean)
    clean_pred = _predict(ctx, clean_float)
    for plan in job.variants:
        name = plan.name
        if name not in task.compute:  # reused from the store being extended, statistics included
            stored[name], failed[name] = existing.stored[name], existing.failed[name]
            continue
        ctx.generator(plan).use_split(source)  # style draws single images from the whole split
        fresh, seconds = _generate(ctx, plan, task, clean_float, labels)
        encoded = codec.encode(clean, fresh, plan.stored_precision(config.store.precision))
        stored[name], failed[name] = encoded.stored, encoded.failed
        tallies[name] = Tally.measure(clean_float, encoded.decoded, encoded.failed, encoded.max_abs_error, clean_pred,
                                      _predict(ctx, encoded.decoded), labels, _predict(ctx, encoded.fresh))
        tallies[name].seconds, tallies[name].timed = seconds, True
        tallies[name].fallbacks = ctx.generator(plan).fallbacks(source.labels, labels)
    shard = ShardData(split=task.split, start=task.start, ids=np.arange(task.start, task.stop), labels=labels,
                      clean=clean, stored=stored, failed=failed)
    fault_point("mid-shard")
    record = writer.write_shard(task.name, shard)
    progress = {"fingerprint": job.fingerprint, "record": record.model_dump(),
                "tallies": {name: tally.to_dict() for name, tally in tallies.items()}}
    if task.name in writer.uploaded:  # the object as stored: a resume checks it with one HEAD
        progress["object"] = writer.uploaded[task.name]
    writer.record_progress(task.split, task.index, progress)
    return progress


def _generate(ctx: WorkerContext, plan: VariantPlan, task: ShardTask, clean_float: np.ndarray,
              labels: np.ndarray) -> tuple[np.ndarray, float]:
    """Run one generator over the shard in fixed batches (fixed batch boundaries keep bytes reproducible).

    Returns the output and the seconds the generator took (model loading and setup excluded).
    """
    generator = ctx.generator(plan)
    started = time.perf_counter()
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
    return out, time.perf_counter() - started


@torch.no_grad()
def _predict(ctx: WorkerContext, images: np.ndarray) -> np.ndarray | None:
    if ctx.model is None or not ctx.config.generation.statistics:
        return None
    batch_size = ctx.config.generation.batch_size
    predictions = [ctx.model(torch.from_numpy(images[i : i + batch_size]).to(ctx.device)).argmax(1).cpu()
                   for i in range(0, len(images), batch_size)]
    return torch.cat(predictions).numpy()


def _existing_shard(config: Config, task: ShardTask, job: JobSpec, image_shape: tuple[int, ...]) -> ShardData:
    """The stored variants of this shard from the store being extended (checked against its old checksum)."""
    previous = job.extra["previous"]
    layout = Layout.build(previous["variants"], previous["precisions"], config.store.precision)
    record = ShardRecord.model_validate(previous["shards"][task.name])
    source = ShardSource(config.store.path, urls.config_storage_options(config.store.path, config.store))
    reader = backend(config.store.backend).reader(source, record, layout, image_shape, "checksum")
    data = reader.shard_data(task.split)
    if not np.array_equal(data.ids, np.arange(task.start, task.stop)):
        raise IntegrityError(f"shard {task.name}: holds other images than expected; regenerate with --force")
    return data
