"""Shared test fixtures: small real stores written from test-made arrays."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from advpipe.pipeline.generators.base import Generator
from advpipe.stores import SplitArrays, build_store

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Remote stores are cached locally: tests must not fill the user's ~/.cache (inherited by subprocesses).
os.environ.setdefault("ADVPIPE_CACHE_DIR", __import__("tempfile").mkdtemp(prefix="advpipe-test-cache-"))

CLASSES = [f"c{i}" for i in range(10)]


def make_arrays(count: int = 70, shape=(3, 8, 8), seed: int = 0, variants=("noise", "tiny")) -> SplitArrays:
    """Clean uint8 images plus float variants: a visible one and a sub-1/255 one that uint8 would erase."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, *shape), dtype=np.uint8)
    base = images.astype(np.float32) / 255
    arrays = {
        "noise": np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1).astype(np.float32),
        "tiny": np.clip(base + 0.001 * np.sign(rng.normal(size=base.shape)), 0, 1).astype(np.float32),
    }
    return SplitArrays(images=images, labels=rng.integers(0, 10, count), source_fingerprint=f"test-{seed}",
                       variants={name: arrays[name] for name in variants})


def write_test_store(path: Path, backend: str = "hdf5", precision: str = "float16", shard_size: int = 32,
                     compression: str | None = None, count: int = 70) -> dict[str, SplitArrays]:
    splits = {"train": make_arrays(count, seed=0), "test": make_arrays(count // 2 + 1, seed=1)}
    build_store(path, splits, class_names=CLASSES, backend=backend, precision=precision, shard_size=shard_size,
                compression=compression, progress=False)
    return splits


@pytest.fixture
def hdf5_store(tmp_path: Path) -> tuple[Path, dict[str, SplitArrays]]:
    path = tmp_path / "store-h5"
    return path, write_test_store(path)


@pytest.fixture
def wds_store(tmp_path: Path) -> tuple[Path, dict[str, SplitArrays]]:
    path = tmp_path / "store-wds"
    return path, write_test_store(path, backend="webdataset")


DIGITS_MODEL_SETTINGS = {"epochs": 6, "batch_size": 32, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0}


def digits_config(root: Path, *, variants: dict | None = None, limit: int | None = 96, shard_size: int = 32,
                  checkpoint: Path | None = None, **store) -> dict:
    """A plain-dict config for generation tests on digits (16x16), writing under `root`."""
    return {
        "name": "test", "seed": 0, "device": "cpu",
        "source": {"kind": "digits", "image_size": 16, "limit": limit},
        "model": {"arch": "lenet", "checkpoint": str(checkpoint or root / "model.pt")},
        "train_source": dict(DIGITS_MODEL_SETTINGS),
        "store": {"path": str(root / "store"), "shard_size": shard_size, **store},
        "variants": variants if variants is not None else {"gaussian": {"sigma": 0.1}, "fgsm": {"eps": 0.1}},
        "generation": {"batch_size": 32, "cluster": "inline"},
    }


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory) -> Path:
    """A LeNet trained on digits 16x16 (all images), shared by the generation tests."""
    from advpipe.config import config_from_dict
    from advpipe.trainers.clean import train_source

    root = tmp_path_factory.mktemp("digits-model")
    config = config_from_dict(digits_config(root, limit=None))
    path, metrics = train_source(config, progress=False)
    assert metrics["test_acc"] > 0.9
    return path


class FlakyGenerator(Generator):
    """A test generator that fails (NaN) on every third image of a batch, like a diverging C&W run."""

    needs_model = False

    def generate(self, x, y, seeds):
        out = (x + 0.01).clamp(0, 1)
        out[torch.arange(len(x)) % 3 == 0] = float("nan")
        return out


def config_at(root: Path, model: Path, **kwargs):
    from advpipe.config import config_from_dict

    return config_from_dict(digits_config(root, checkpoint=model, **kwargs))


def shard_sums(store: Path) -> dict[str, str]:
    import json

    manifest = json.loads((store / "manifest.json").read_text())
    return {s["name"]: s["sha256"] for split in manifest["splits"].values() for s in split["shards"]}


@pytest.fixture(scope="session")
def reference_store(tmp_path_factory, digits_model) -> Path:
    """An uninterrupted inline run: the store every other run of the same config must reproduce byte for byte."""
    from advpipe.pipeline.job import generate

    root = tmp_path_factory.mktemp("reference")
    generate(config_at(root, digits_model), progress=False)
    return root / "store"


def shard_file_sums(store: Path) -> dict[str, str]:
    """sha256 of every shard file as it is on disk (the manifest's sums come from the writers' own records)."""
    import hashlib

    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.suffix in (".h5", ".tar") and not p.name.startswith(".")}


def wait_for(condition, what: str, timeout: float = 600.0, alive=None):
    """Poll `condition()` until it returns a value other than None; fail (never hang) after `timeout` seconds.

    `alive`, a Popen, must keep running meanwhile: its exit is a failure stated at once.
    """
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value is not None:
            return value
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"process {alive.args[:2]} exited ({alive.returncode}) while waiting for {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def complete_json(path: Path, key: str):
    """The value of `key` in the JSON file at `path` once the file is complete, else None (absent or half-written)."""
    import json

    try:
        return json.loads(path.read_text())[key]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def dask_processes(root: Path, workers: int = 2, worker_envs: list[dict[str, str]] | None = None):
    """`dask scheduler` and `dask worker` processes (each with its nanny) on 127.0.0.1, as on a cluster.

    Yields (address, worker Popens). The scheduler binds port 0 itself and the address is read
    from its scheduler file once that file is complete JSON. `worker_envs[i]` is added to worker
    i's environment (e.g. a fault point).
    """
    import subprocess
    import sys

    dask = str(Path(sys.executable).parent / "dask")
    scheduler_file = root / "scheduler.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    processes = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                   "--scheduler-file", str(scheduler_file)], env=env, **quiet)]
    try:
        address = wait_for(lambda: complete_json(scheduler_file, "address"), "the scheduler file", 300,
                           alive=processes[0])
        for index in range(workers):
            extra = worker_envs[index] if worker_envs else {}
            processes.append(subprocess.Popen(
                [dask, "worker", address, "--nthreads", "1", "--no-dashboard", "--name", f"w{index}",
                 "--local-directory", str(root / f"w{index}")], cwd=root, env={**env, **extra}, **quiet))
        from distributed import Client

        with Client(address, timeout=120) as client:
            client.wait_for_workers(workers, timeout=300)  # generous: CI machines can be slow to import torch
        yield address, processes[1:]
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@contextlib.contextmanager
def http_server(directory: Path):
    """`python -m http.server` on 127.0.0.1 serving `directory`; yields its base URL.

    The server binds port 0 itself and reports the port it got, so no other process can take
    the port between choosing and binding it.
    """
    import re
    import subprocess
    import sys

    server = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
                               "--directory", str(directory)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    try:
        line = server.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
        port = re.search(r"port (\d+)", line)
        assert port, f"http.server did not start: {line!r}"
        yield f"http://127.0.0.1:{port.group(1)}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and two threads crawl when another process shares the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def saved_model(tmp_path: Path, arch: str, shape=(3, 8, 8), classes: int = 10, seed: int = 0) -> Path:
    """A freshly initialised (seeded) registry model saved as an advpipe checkpoint."""
    from advpipe.models import build_model, save_checkpoint

    torch.manual_seed(seed)
    path = tmp_path / f"{arch}-{seed}.pt"
    save_checkpoint(path, build_model(arch, classes, shape), CLASSES[:classes], {"test": True})
    return path


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3-protocol server (server mode) in its own process on 127.0.0.1; yields its endpoint URL.

    A real HTTP server speaking the S3 protocol: clients in this process, in Dask worker
    processes and in SLURM jobs reach it as they would reach AWS, MinIO or Ceph.
    """
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as probe:  # moto_server cannot report a port it chose itself
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"

    def answering() -> bool | None:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            return True
        except OSError:
            return None

    try:
        wait_for(answering, "moto's S3 server to start", timeout=60, alive=server)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


#: Fake, recognisable credentials: tests search every file and log a run leaves for these strings.
S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIATESTKEYADVPIPE01",
                       "AWS_SECRET_ACCESS_KEY": "test-secret-advpipe-0123456789", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch, request):
    """A fresh, empty bucket on the moto server; yields `s3://<bucket>`.

    Credentials and the endpoint come from the standard AWS environment variables (set here for
    this test and inherited by any process it starts), as a user's would.
    """
    import re

    import boto3

    for key, value in {**S3_TEST_CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    bucket = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + f"-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"


SLURM_ONE_NODE = Path(__file__).resolve().parents[1] / "bench" / "slurm_one_node.sh"


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """A real single-node SLURM cluster (munged, slurmctld, slurmd) on this machine; yields its partition.

    bench/slurm_one_node.sh installs and starts it; a cluster already up is used and left running,
    one started here is stopped at the end. Where SLURM cannot be installed or started the tests
    skip with the script's reason (and fail in CI, ADVPIPE_CI=1, which must run them).
    """
    import subprocess

    def script(action: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SLURM_ONE_NODE), action], capture_output=True, text=True, timeout=600)

    def unavailable(reason: str) -> None:
        if os.environ.get("ADVPIPE_CI"):
            pytest.fail(f"{reason}; CI (ADVPIPE_CI=1) must run the SLURM tests: give the CI job root and apt-get")
        pytest.skip(reason)

    if script("status").returncode == 0:
        yield "debug"
        return
    started = script("start")
    if started.returncode != 0:
        script("stop")  # whatever part of it did start
        unavailable(f"no single-node SLURM cluster here: {started.stderr.strip() or started.stdout.strip()}")
    try:
        yield "debug"
    finally:
        script("stop")


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail (rather than hang) when the block runs past `seconds`: SIGALRM raises inside whatever is running."""
    def over(signum: int, frame: object) -> None:
        raise AssertionError(f"still running after the {seconds:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, over)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
