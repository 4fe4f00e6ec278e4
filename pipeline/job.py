"""`advpipe generate`: the client side of a generation run.

The client decides what must be computed, submits one task per missing shard,
and assembles the manifest from the workers' progress records at the end:

1. Fingerprint the run (config, source data, model, library versions).
2. Same fingerprint as the finished store -> nothing to do. A finished store
   whose variants are a subset of the config's -> compute only the new variants.
   Anything else -> refused unless --force.
3. Mark the directory as in progress (`.generation.json`), take any old manifest
   offline, skip shards whose progress record and checksum prove them finished.
4. Run the remaining shards (Dask, or inline), then write the manifest last, assembled only
   from progress records this run accepts (`StoreWriter.accepted_progress`); a shard whose
   record it refuses is computed once more.

The client holds the store's writer lock (advpipe.stores.lock) from before it reads the
directory until the manifest is published: a second writer is refused at once. An existing
Dask scheduler is reached before that, so an unreachable one leaves the store untouched.
In object storage the lock can be taken over from a client paused past its time-to-live, so
the client's fencing token travels with the job (`JobSpec.fence`): the client and every worker
stop with LockLostError once the lock names another holder, and the manifest takes only
records bearing this run's token.

Killing the client, a worker or the whole machine at any point leaves either a
finished store or a directory the next run resumes from. Every write into the store
directory (marker, shards, progress records, manifest) goes through
`advpipe.stores.writer.StoreWriter`; this module decides what to compute.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from advpipe import urls
from advpipe.config import Config
from advpipe.datasets import LAZY_READERS, Source, load_source
from advpipe.datasets.lazy import LazySource, Runner, inline_runner
from advpipe.devices import resolve_device
from advpipe.errors import GenerationError, StoreError
from advpipe.faults import fault_point
from advpipe.pipeline.cluster import dask_runner, map_on
from advpipe.pipeline.plan import (
    JobSpec,
    ShardTask,
    VariantPlan,
    base_fingerprint,
    shard_tasks,
    store_fingerprint,
    store_layout,
    variant_plans,
)
from advpipe.pipeline.worker import run_shard
from advpipe.provenance import library_versions
from advpipe.stores.manifest import FORMAT_VERSION, Manifest, ShardRecord, SplitRecord, VariantRecord, VariantStats
from advpipe.stores.stats import Tally, merge_all
from advpipe.stores.writer import StoreWriter

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    status: str  # "created", "up-to-date", "extended"
    manifest: Manifest
    computed: int
    reused: int


def generate(config: Config, *, cluster: str | None = None, scheduler: str | None = None, force: bool = False,
             device: str | None = None, progress: bool = True) -> Outcome:
    """Fill `config.store.path` with every configured variant; see the module docstring."""
    config = absolute_paths(config)
    device = str(resolve_device(device or config.device))
    _check_cluster(config, cluster, scheduler)
    plans = variant_plans(config)
    writer = StoreWriter(config.store.path, config.store.backend, config.store.compression,
                         store_layout(plans, config.store.precision),
                         protect=[config.source.path] if config.source.path else [],
                         storage_options=urls.config_storage_options(config.store.path, config.store))
    with contextlib.ExitStack() as stack:
        client = _connect(config, scheduler, stack)
        writer.check_writable()
        if client is None and config.source.kind in LAZY_READERS and _uses_workers(config, cluster):
            client = _start(config, cluster, device, stack)  # a lazy source is indexed on the workers that generate
        runner = dask_runner(client, progress) if client is not None else inline_runner(progress)
        sources = {split: _read_source(config, split, runner) for split in config.store.splits}
        model_meta = _model_meta(config, plans, sources)
        source_fps = {split: s.fingerprint for split, s in sources.items()}
        base = base_fingerprint(config, source_fps, model_meta.fingerprint if model_meta else None)
        fingerprint = store_fingerprint(base, plans)
        stack.enter_context(writer.locked())
        finished = writer.existing(force)
        if finished is not None and (finished.fingerprint == fingerprint or _covers(finished, base, plans)):
            return _up_to_date(writer, finished, config, plans)
        previous = _previous_for_extension(writer, finished, base, plans, config, force)
        previous = writer.claim(fingerprint, force, previous)

        job = JobSpec(config=config.model_dump(mode="json"), variants=plans, fingerprint=fingerprint,
                      base_fingerprint=base, model_fingerprint=model_meta.fingerprint if model_meta else None,
                      device=device, extra={"previous": previous} if previous else {},
                      sources={split: s for split, s in sources.items() if isinstance(s, LazySource)},
                      fence=writer.fence)
        tasks = _plan_tasks(config, sources, plans, previous)
        pending = [t for t in tasks if not writer.is_done(t.split, t.index, t.name, fingerprint)]
        log.info("%d shard(s) to compute, %d already finished", len(pending), len(tasks) - len(pending))
        _run(pending, job, config, cluster, progress, client, writer)

        accepted = _accepted(writer, tasks, fingerprint)
        again = [t for t in tasks if (t.split, t.index) not in accepted]
        if again:  # records a stale writer wrote over this run's, or objects changed since: computed once more
            log.warning("%s: %d shard(s) computed again before the manifest is written", writer.shown, len(again))
            _run(again, job, config, cluster, progress, client, writer, attempt=1)
            accepted.update(_accepted(writer, again, fingerprint))
            refused = [t.name for t in again if (t.split, t.index) not in accepted]
            if refused:
                raise GenerationError(f"{writer.shown}: shard(s) {', '.join(refused[:3])} were replaced again after "
                                      "they were computed a second time; make sure no other writer uses this store, "
                                      "then re-run to resume")
        manifest = _assemble(writer, config, job, tasks, accepted, sources, model_meta, plans)
        _warn_lost(manifest)
        writer.publish(manifest)
    status = "extended" if previous else "created"
    computed = {(t.split, t.index) for t in pending + again}
    log.info("%s: store %s (%d shards computed)", writer.shown, status, len(computed))
    return Outcome(status, manifest, len(computed), len(tasks) - len(computed))


def _uses_workers(config: Config, cluster: str | None) -> bool:
    return (cluster or config.generation.cluster) != "inline"


def _start(config: Config, cluster: str | None, device: str, stack: contextlib.ExitStack) -> Any:
    """Start this run's own workers (local or SLURM) now, for the index pass and then the shards."""
    from advpipe.pipeline.cluster import dask_client

    return stack.enter_context(dask_client(config.generation, cluster, device=device))


def _connect(config: Config, scheduler: str | None, stack: contextlib.ExitStack) -> Any:
    """A client of the existing scheduler (--scheduler or the config's), or None when this run starts its own
    workers. Connected before the store is touched, so an unreachable scheduler changes nothing."""
    address = scheduler or config.generation.scheduler
    if not address:
        return None
    from advpipe.pipeline.cluster import dask_client

    return stack.enter_context(dask_client(config.generation, None, address))


def _up_to_date(writer: StoreWriter, finished: Manifest, config: Config, plans: list[VariantPlan]) -> Outcome:
    _check_layout(finished, config)
    writer.cleanup()
    extra = sorted(set(finished.variant_names) - {p.name for p in plans})
    log.info("%s is up to date (fingerprint %s)%s: nothing to do", writer.shown, finished.fingerprint[:12],
             f"; it also holds {', '.join(extra)}" if extra else "")
    return Outcome("up-to-date", finished, 0, 0)


def absolute_paths(config: Config) -> Config:
    """Workers may run elsewhere (another cwd, another node): send them absolute paths (a URL stays as it is)."""
    def resolve(path: Path | str | None) -> Path | str | None:
        if path is None or urls.is_remote(path):
            return path
        return Path(os.fspath(path).removeprefix("file://")).expanduser().resolve()

    return config.model_copy(update={
        "source": config.source.model_copy(update={"path": resolve(config.source.path)}),
        "model": config.model.model_copy(update={"checkpoint": resolve(config.model.checkpoint),
                                                  "weights": resolve(config.model.weights)}),
        "store": config.store.model_copy(update={"path": resolve(config.store.path)}),
    })


def _read_source(config: Config, split: str, runner: Runner) -> Source:
    """The split as a Source; a lazy one is indexed (every byte read once, no pixel decoded) by `runner`."""
    source = load_source(config.source, split, runner)
    fault_point("source-read")
    return source


def _model_meta(config: Config, plans: list[VariantPlan], sources: dict) -> Any:
    """The source model's metadata, checked against the data; None when no variant needs a model."""
    from advpipe.models.checkpoint import check_compatible, load_checkpoint

    needed = any(p.needs_model for p in plans)
    if not needed and not Path(config.model.checkpoint).is_file():
        return None
    if not Path(config.model.checkpoint).is_file():
        raise GenerationError(f"{config.model.checkpoint}: source model checkpoint not found; "
                              f"train it first with `advpipe train-source CONFIG` (or `advpipe run CONFIG`)")
    _, meta = load_checkpoint(config.model.checkpoint, arch=config.model.arch)
    for source in sources.values():
        check_compatible(meta, source.num_classes, source.image_shape)
    return meta


def _check_cluster(config: Config, cluster: str | None, scheduler: str | None) -> None:
    """Refuse a bad --cluster spec before the store directory is touched."""
    if not (scheduler or config.generation.scheduler):
        from advpipe.pipeline.cluster import check_spec

        check_spec(cluster or config.generation.cluster)


def _check_layout(manifest: Manifest, config: Config) -> None:
    if (manifest.backend, manifest.compression) != (config.store.backend, config.store.compression):
        raise StoreError(f"{urls.redact(config.store.path)}: the store holds the same data as a {manifest.backend} "
                         f"store (compression {manifest.compression}); use `advpipe convert` for another layout")


def _previous_for_extension(writer: StoreWriter, finished: Manifest | None, base: str, plans: list[VariantPlan],
                            config: Config, force: bool) -> dict | None:
    """Decide what an existing store means for this run: extend it, replace it (--force) or refuse."""
    if finished is None:
        saved = writer.saved_previous()  # an interrupted extension
        return _extension(saved) if saved is not None else None
    wanted = {p.name: p.fingerprint for p in plans}
    extendable = (finished.generation.get("base_fingerprint") == base
                  and all(wanted.get(v.name) == v.fingerprint for v in finished.variants)
                  and (finished.backend, finished.compression) == (config.store.backend, config.store.compression))
    if extendable:
        writer.take_offline(finished)  # the store is offline until the new manifest is written
        log.info("extending %s with variant(s): %s", writer.shown,
                 ", ".join(n for n in wanted if n not in finished.variant_names))
        return _extension(finished)
    if not force:
        raise StoreError(f"{writer.shown}: a store made with a different configuration exists here "
                         f"({'; '.join(_differences(finished, base, plans))}); use another store.path, "
                         "or --force to replace it (this discards the store)")
    log.warning("--force: replacing the store at %s", writer.shown)
    writer.wipe()
    return None


def _extension(finished: Manifest) -> dict:
    """What workers and the manifest need of the store being extended: its variants, shards and statistics."""
    return {
        "variants": finished.variant_names,
        "precisions": [v.precision for v in finished.variants],
        "shards": {s.name: s.model_dump() for split in finished.splits.values() for s in split.shards},
        "stats": {name: {v: s.model_dump(mode="json") for v, s in split.stats.items()}
                  for name, split in finished.splits.items()},
    }


def _covers(finished: Manifest, base: str, plans: list[VariantPlan]) -> bool:
    """The store already holds every variant of this config, made from the same data and model."""
    held = {v.name: v.fingerprint for v in finished.variants}
    return finished.generation.get("base_fingerprint") == base and all(held.get(p.name) == p.fingerprint
                                                                        for p in plans)


def _differences(finished: Manifest, base: str, plans: list[VariantPlan]) -> list[str]:
    """What separates the config from the store, in words."""
    held = {v.name: v.fingerprint for v in finished.variants}
    wanted = {p.name: p.fingerprint for p in plans}
    found = []
    if finished.generation.get("base_fingerprint") != base:
        found.append("source data, model, precision, shard size, seed, batch size or library versions differ")
    changed = [n for n in wanted if n in held and held[n] != wanted[n]]
    if changed:
        found.append(f"variant(s) with other parameters: {', '.join(changed)}")
    dropped = [n for n in held if n not in wanted]
    if dropped and found:
        found.append(f"the store also holds: {', '.join(dropped)}")
    return found or ["the variant order differs"]


def _plan_tasks(config: Config, sources: dict, plans: list[VariantPlan], previous: dict | None) -> list[ShardTask]:
    known = set(previous["variants"]) if previous else set()
    compute = tuple(p.name for p in plans if p.name not in known)
    tasks = []
    for split, source in sources.items():
        if len(source) == 0:
            raise GenerationError(f"source split '{split}' is empty; nothing to generate")
        tasks += shard_tasks(split, len(source), config.store.shard_size, config.store.backend, compute)
    return tasks


def _run(tasks: list[ShardTask], job: JobSpec, config: Config, cluster: str | None, progress: bool,
         client: Any = None, writer: StoreWriter | None = None, attempt: int = 0) -> None:
    """Run the shard tasks: on `client` (an existing scheduler), inline, or on workers started here. `writer`: the
    client's, asked after each finished task whether its lock was taken over meanwhile (then LockLostError);
    `attempt` > 0 when shards are computed again (new task keys)."""
    if not tasks:
        return
    if client is None and (cluster or config.generation.cluster) == "inline":
        with tqdm(total=len(tasks), desc="shards", unit="shard", disable=not progress) as bar:
            for task in tasks:
                run_shard(task, job)
                bar.update()
                fault_point("between-shards")
        return
    if client is not None:
        _run_on(client, tasks, job, config, progress, writer, attempt)
        return
    from advpipe.pipeline.cluster import dask_client

    with dask_client(config.generation, cluster, device=job.device) as started:
        _run_on(started, tasks, job, config, progress, writer, attempt)


def _run_on(client: Any, tasks: list[ShardTask], job: JobSpec, config: Config, progress: bool,
            writer: StoreWriter | None = None, attempt: int = 0) -> None:
    """Submit the tasks to a connected client; the bar starts only once workers are there."""
    again = f"-again{attempt}" if attempt else ""
    keys = [f"shard-{t.split}-{t.index:05d}-{job.fingerprint[:8]}{again}" for t in tasks]
    # sent once to each worker, not with every task: a lazy source's index grows with the split
    shared = client.scatter(job, broadcast=True, hash=False) if job.sources else job
    check = (lambda: writer.check_fence(quick=True)) if writer is not None else None  # the lock was taken over: stop
    map_on(client, run_shard, tasks, "shards", failure="a shard task failed", progress=progress, unit="shard",
           after_each=check, job=shared, key=keys, retries=config.generation.retries)


def _accepted(writer: StoreWriter, tasks: list[ShardTask], fingerprint: str) -> dict[tuple[str, int], dict]:
    """(split, index) -> progress record, for every task whose record the writer accepts for the manifest (this
    run's configuration and fencing token, its object unchanged); the others are logged and left out."""
    found = {}
    for task in tasks:
        progress = writer.accepted_progress(task.split, task.index, task.name, fingerprint)
        if progress is not None:
            found[(task.split, task.index)] = progress
    return found


def _assemble(writer: StoreWriter, config: Config, job: JobSpec, tasks: list[ShardTask],
              accepted: dict[tuple[str, int], dict], sources: dict, model_meta: Any,
              plans: list[VariantPlan]) -> Manifest:
    """Build the manifest from the workers' progress records as `_accepted` took them (the client never reads
    images back).

    Variants reused from the store being extended keep that store's statistics.
    """
    previous = job.extra.get("previous", {}).get("stats", {})
    splits = {}
    for split, source in sources.items():
        records, tallies = [], {p.name: [] for p in plans if p.name not in previous.get(split, {})}
        for task in (t for t in tasks if t.split == split):
            progress = accepted[(task.split, task.index)]
            records.append(ShardRecord.model_validate(progress["record"]))
            for name in tallies:
                tallies[name].append(Tally.from_dict(progress["tallies"][name]))
        stats = {n: merge_all(t).summary() for n, t in tallies.items()}
        stats.update({n: VariantStats.model_validate(s) for n, s in previous.get(split, {}).items()})
        splits[split] = SplitRecord(count=len(source), source_fingerprint=source.fingerprint, shards=records,
                                    stats={p.name: stats[p.name] for p in plans})
    layout = writer.layout
    first = next(iter(sources.values()))
    height, width, channels = first.image_shape
    model = None
    if model_meta is not None:
        model = {"arch": model_meta.arch, "fingerprint": model_meta.fingerprint,
                 "checkpoint": str(config.model.checkpoint), "training": model_meta.training}
    return Manifest(
        format_version=FORMAT_VERSION, fingerprint=job.fingerprint, backend=config.store.backend,
        precision=config.store.precision, compression=config.store.compression,
        image_shape=(channels, height, width), class_names=list(first.class_names), seed=config.seed,
        source={"kind": config.source.kind, "config": config.source.model_dump(mode="json"),
                "fingerprint_scheme": first.fingerprint_scheme},
        model=model, library_versions=library_versions(),
        variants=[VariantRecord(name=p.name, generator=p.generator, backend=p.backend, params=p.params,
                                fingerprint=p.fingerprint, kind=p.kind, precision=layout.precision(i),
                                array=layout.placement(i)[0], column=layout.placement(i)[1])
                  for i, p in enumerate(plans)],
        splits=splits, created_by="advpipe generate",
        generation={"base_fingerprint": job.base_fingerprint, "shard_size": config.store.shard_size,
                    "batch_size": config.generation.batch_size, "device": job.device},
    )


def _warn_lost(manifest: Manifest) -> None:
    """Say so when storage undid successful adversarials (boundary-minimal attacks in float16)."""
    for split, record in manifest.splits.items():
        for variant in manifest.variants:
            stats = record.stats.get(variant.name)
            if stats is not None and stats.lost:
                log.warning("%s/%s: %d of %d successful adversarial images no longer fool the source model after "
                            "the %s storage round trip; set `precision: float32` on this variant to store it exactly",
                            variant.name, split, stats.lost, stats.fooled_fresh, variant.precision)
