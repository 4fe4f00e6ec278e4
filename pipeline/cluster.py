"""Where shard tasks run: a LocalCluster, an existing scheduler, or SLURM via dask-jobqueue.

The same job runs unchanged on each; only the Dask client differs.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from advpipe.config import GenerationConfig, SlurmConfig
from advpipe.errors import ConfigError

log = logging.getLogger(__name__)

#: The variable CUDA reads, once per process, for the GPUs that process may see.
VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
#: How long the client tries to reach an existing scheduler before giving up.
SCHEDULER_TIMEOUT = "20s"
#: The variable Dask reads, when a process imports it, for the level of its `distributed` loggers.
WORKER_LOGGING = "DASK_LOGGING__DISTRIBUTED"


def local_workers(spec: str) -> int:
    """'local' -> one worker process per core; 'local:N' -> N worker processes."""
    if spec == "local":
        return max(1, os.cpu_count() or 1)
    try:
        kind, count = spec.split(":", 1)[0], int(spec.split(":", 1)[1])
    except (IndexError, ValueError):
        kind, count = spec, 0
    if kind != "local":
        count = 0
    if count < 1:
        raise ConfigError(f"cluster '{spec}' is not valid: use local, local:N (N >= 1), inline or slurm")
    return count


def check_spec(spec: str) -> None:
    """Refuse a cluster spec that cannot work here, before anything is started or written."""
    if spec == "inline":
        return
    if spec == "slurm":
        if shutil.which("sbatch") is None:
            raise ConfigError("--cluster slurm needs SLURM's `sbatch` on this machine's PATH; run the client on a "
                              "SLURM login node, or use --scheduler ADDRESS / --cluster local:N")
        return
    local_workers(spec)


def gpu_ids(device: str | None) -> list[str] | None:
    """The GPUs to give one worker each for `device`, or None when workers are not pinned.

    Only a plain `cuda` pins (a worker per GPU, as dask-cuda's LocalCUDACluster does); `cuda:K`
    is an explicit choice and puts every worker on GPU K. The ids are those this process sees:
    its own CUDA_VISIBLE_DEVICES when set (a SLURM allocation sets it), else 0 .. count - 1.
    """
    if device not in ("cuda", "cuda:0") or not _cuda_count():
        return None
    visible = os.environ.get(VISIBLE_DEVICES)
    if visible:
        return [part.strip() for part in visible.split(",") if part.strip()]
    return [str(i) for i in range(_cuda_count())]


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pinned_workers(spec: str, gpus: list[str]) -> list[str]:
    """The GPU of each local worker: `local` -> one worker per GPU; `local:N` -> the first N (N <= GPUs)."""
    count = len(gpus) if spec == "local" else local_workers(spec)
    if count > len(gpus):
        raise ConfigError(f"cluster '{spec}' with --device cuda asks for {count} workers but this machine has "
                          f"{len(gpus)} GPU(s), one per worker; use local:{len(gpus)} (or fewer)")
    return gpus[:count]


@contextlib.contextmanager
def dask_client(generation: GenerationConfig, cluster: str | None = None,
                scheduler: str | None = None, device: str | None = None,
                gpus: list[str] | None = None) -> Iterator[object]:
    """Yield a connected `distributed.Client`, closing whatever this call started.

    With `device` "cuda" (or explicit `gpus`), each worker this call starts sees one GPU of its own.
    """
    from distributed import Client

    scheduler = scheduler or generation.scheduler
    gpus = gpus if gpus is not None else gpu_ids(device)
    spec = cluster or generation.cluster
    if scheduler:
        try:
            client = Client(scheduler, timeout=SCHEDULER_TIMEOUT)
        except OSError as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {scheduler} ({exc}); is it running?") from None
        _announce(client, f"scheduler {scheduler}")
        with contextlib.closing(client):
            yield client
        return
    if spec == "slurm":
        started = slurm_cluster(generation.slurm)
        started.scale(jobs=generation.slurm.jobs)
    else:
        with _quiet_workers():
            started = local_cluster(spec, generation.threads_per_worker, gpus)
    with started, Client(started) as client:
        if spec == "slurm" and generation.slurm.gpus_per_job:
            client.register_plugin(OneGpuPerProcess(), name="advpipe-one-gpu-per-process")
        _announce(client, spec)
        try:
            yield client
        except KeyboardInterrupt:
            # the user's Ctrl-C has its one-line answer; closing busy workers is not news
            logging.getLogger("distributed").setLevel(logging.CRITICAL)
            raise


def local_cluster(spec: str, threads: int, gpus: list[str] | None):
    """A LocalCluster of worker processes; with `gpus`, worker i sees only GPU gpus[i]."""
    from distributed import LocalCluster

    options = {"threads_per_worker": threads, "processes": True, "silence_logs": logging.WARNING,
               "dashboard_address": ":0"}  # a free port: never "8787 in use"
    if gpus is None:
        return LocalCluster(n_workers=local_workers(spec), **options)
    cluster = LocalCluster(n_workers=0, **options)
    for gpu in pinned_workers(spec, gpus):
        worker = copy.deepcopy(cluster.new_spec)
        worker["options"]["env"] = {**worker["options"].get("env", {}), VISIBLE_DEVICES: gpu}
        cluster.worker_spec[f"gpu-{gpu}"] = worker  # the environment is set before the worker process starts
    cluster.scale(len(cluster.worker_spec))  # starts the workers just specified
    cluster.wait_for_workers(len(cluster.worker_spec))
    log.info("dask: one worker per GPU (%s)", ", ".join(f"{VISIBLE_DEVICES}={g}" for g in pinned_workers(spec, gpus)))
    return cluster


class OneGpuPerProcess:
    """A worker plugin for SLURM jobs with several GPUs and as many worker processes: process i of a job
    keeps only the i-th of the job's GPUs in its CUDA_VISIBLE_DEVICES (set before any task touches CUDA)."""

    def setup(self, worker) -> None:
        visible = [part for part in os.environ.get(VISIBLE_DEVICES, "").split(",") if part]
        match = re.search(r"-(\d+)$", str(worker.name))
        if len(visible) > 1 and match:
            os.environ[VISIBLE_DEVICES] = visible[int(match.group(1)) % len(visible)]

    def teardown(self, worker) -> None:
        """Nothing to undo: the process ends with its worker."""

    def transition(self, key, start, finish, **kwargs) -> None:
        """Not used: the plugin acts once, at setup."""


@contextlib.contextmanager
def _quiet_workers() -> Iterator[None]:
    """Start local worker processes with SIGINT ignored and, unless logging is verbose, Dask's worker
    warnings off (both inherited), then restore this process's settings.

    Ctrl-C reaches every process of the terminal's process group: the client answers it (one line,
    exit 130) and closes its workers, which would otherwise each print a KeyboardInterrupt traceback
    and a warning for every task the close cancels. Task errors still reach the client.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = os.environ.get(WORKER_LOGGING)
    if logging.getLogger("distributed").getEffectiveLevel() >= logging.WARNING:
        os.environ[WORKER_LOGGING] = "error"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if saved is None:
            os.environ.pop(WORKER_LOGGING, None)
        else:
            os.environ[WORKER_LOGGING] = saved


def map_on(client: Any, function: Callable[..., Any], items: Sequence[Any], what: str, *, failure: str,
           progress: bool = True, unit: str = "task", after_each: Callable[[], None] | None = None,
           **options: Any) -> list:
    """Run `function` over `items` on `client`'s workers with a progress bar; the results in order.

    advpipe's own errors reach the caller as they are; any other failure becomes a GenerationError
    starting with `failure`. `after_each` runs as each task finishes; `options` go to client.map.
    """
    from distributed import as_completed

    from advpipe.errors import AdvpipeError, GenerationError

    futures = client.map(function, list(items), pure=False, **options)
    try:
        with tqdm(total=len(futures), desc=what, unit=unit, disable=not progress) as bar:
            for future in as_completed(futures):
                future.result()
                bar.update()
                if after_each is not None:
                    after_each()
        return [future.result() for future in futures]
    except AdvpipeError:
        raise
    except Exception as exc:
        raise GenerationError(f"{failure}: {type(exc).__name__}: {exc}") from exc
    finally:
        with contextlib.suppress(Exception):
            client.cancel(futures)


def dask_runner(client: Any, progress: bool = True) -> Callable[[Callable[..., Any], Sequence[Any], str], list]:
    """A Runner (advpipe.datasets.lazy) that maps tasks over `client`'s workers, results in order."""
    def run(function: Callable[..., Any], items: Sequence[Any], what: str) -> list:
        return map_on(client, function, items, what, failure=f"{what}: a task failed",
                      progress=progress and len(items) > 1)

    return run


def slurm_cluster(slurm: SlurmConfig):
    """A dask-jobqueue SLURMCluster built from the config (its `job_script()` is what gets submitted)."""
    from dask_jobqueue import SLURMCluster

    gres = [f"--gres=gpu:{slurm.gpus_per_job}"] if slurm.gpus_per_job else []
    return SLURMCluster(
        queue=slurm.queue, account=slurm.account, cores=slurm.cores, processes=slurm.processes,
        memory=slurm.memory, walltime=slurm.walltime, job_extra_directives=[*slurm.job_extra_directives, *gres],
        job_script_prologue=slurm.job_script_prologue, local_directory=slurm.local_directory,
        python=slurm.python or sys.executable, interface=slurm.interface, log_directory=slurm.log_directory,
        scheduler_options={"dashboard_address": ":0"},  # a free port, as for a LocalCluster; the log names it
    )


def _has_dashboard() -> bool:
    return importlib.util.find_spec("bokeh") is not None


def _announce(client, where: str) -> None:
    workers = len(client.scheduler_info().get("workers", {}))
    log.info("dask: %s, %d worker(s) connected", where, workers)
    if _has_dashboard() and client.dashboard_link:
        log.info("dask dashboard: %s", client.dashboard_link)
