"""Where shard tasks run: a LocalCluster, an existing scheduler, or SLURM via dask-jobqueue.

The same job runs unchanged on each; only the Dask client differs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator

from advpipe.config import GenerationConfig, SlurmConfig
from advpipe.errors import ConfigError

log = logging.getLogger(__name__)

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


@contextlib.contextmanager
def dask_client(generation: GenerationConfig, cluster: str | None = None,
                scheduler: str | None = None) -> Iterator[object]:
    """Yield a connected `distributed.Client`, closing whatever this call started."""
    from distributed import Client, LocalCluster

    scheduler = scheduler or generation.scheduler
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
            started = LocalCluster(n_workers=local_workers(spec), threads_per_worker=generation.threads_per_worker,
                                   processes=True, dashboard_address=":0",  # a free port: never "8787 in use"
                                   silence_logs=logging.WARNING)
    with started, Client(started) as client:
        _announce(client, spec)
        try:
            yield client
        except KeyboardInterrupt:
            # the user's Ctrl-C has its one-line answer; closing busy workers is not news
            logging.getLogger("distributed").setLevel(logging.CRITICAL)
            raise


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


def slurm_cluster(slurm: SlurmConfig):
    """A dask-jobqueue SLURMCluster built from the config (its `job_script()` is what gets submitted)."""
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(
        queue=slurm.queue, account=slurm.account, cores=slurm.cores, processes=slurm.processes,
        memory=slurm.memory, walltime=slurm.walltime, job_extra_directives=slurm.job_extra_directives,
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
