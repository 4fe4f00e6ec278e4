"""Generation straight into object storage (s3:// on moto's S3 server), as on a cluster without a shared file system.

Every shard and progress record is an object written by the worker that computed it; the
manifest is the last object; a killed run resumes from the shards whose objects still are the
ones recorded (one HEAD each; re-hashed when the service cannot say); a second writer on the same
URL is refused while the first holds the lock object, and a writer paused past the lock's
time-to-live is fenced off once taken over. The bytes must be those of the same store generated
on local disk (the session's `reference_store`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import boto3
import psutil
import pytest
import s3fs
import yaml
from conftest import (
    S3_TEST_CREDENTIALS,
    dask_processes,
    digits_config,
    shard_file_sums,
    shard_sums,
    wait_for,
)
from distributed import Client

import advpipe.pipeline.job as job_module
import advpipe.stores.lock as lock_module
import advpipe.stores.writer as writer_module
from advpipe.config import config_from_dict
from advpipe.errors import StoreError
from advpipe.pipeline.job import generate
from advpipe.stores import convert_store, open_store, verify_store
from advpipe.stores.lock import LOCK_NAME, store_lock, writer_filesystem

BIN = Path(sys.executable).parent
SECRETS = list(S3_TEST_CREDENTIALS.values())[:2]


def bucket_objects(url: str) -> dict[str, bytes]:
    """Every object under `url` (relative name -> bytes), read with plain boto3 (independent of advpipe)."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    s3 = boto3.session.Session().client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "").get("Contents", [])
    start = len(prefix) + 1 if prefix else 0
    return {o["Key"][start:]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


def object_shard_sums(objects: dict[str, bytes]) -> dict[str, str]:
    """sha256 of every shard object, as stored (the counterpart of conftest.shard_file_sums)."""
    return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(objects.items())
            if name.endswith((".h5", ".tar")) and not Path(name).name.startswith(".")}


def progress_count(url: str) -> int | None:
    found = [name for name in bucket_objects(url) if name.startswith(".progress/")]
    return len(found) or None


def only_the_frozen_worker_busy(observer, pids: dict[str, int], frozen: int, url: str) -> int | None:
    """The number of finished shards once every task is either finished or held by the frozen worker, else None."""
    processing = observer.processing()
    held = sum(len(keys) for address, keys in processing.items() if pids.get(address) == frozen)
    others = sum(len(keys) for address, keys in processing.items() if pids.get(address) != frozen)
    done = progress_count(url) or 0
    return done if others == 0 and held and done + held == 6 else None


def leaked(texts: dict[str, str | bytes]) -> list[tuple[str, str]]:
    """(where, secret) for every test credential found in the given texts."""
    return [(where, secret) for where, text in texts.items() for secret in SECRETS
            if secret.encode() in (text if isinstance(text, bytes) else text.encode())]


def s3_config(root: Path, model: Path, url: str, **generation) -> dict:
    raw = digits_config(root, checkpoint=model)
    raw["store"]["path"] = url
    raw["generation"] = {"batch_size": 32, "cluster": "inline", **generation}
    return raw


def write_config(root: Path, raw: dict) -> Path:
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def stopped(pid: int) -> bool | None:
    return True if psutil.Process(pid).status() == psutil.STATUS_STOPPED else None


def frozen_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_dask_workers_write_to_s3_and_a_killed_client_resumes(tmp_path, digits_model, reference_store, s3_bucket,
                                                                  caplog):
    """Two `dask worker` processes write every shard object; the client is SIGKILLed while one worker is frozen in
    its shard and the other has finished every task it could, a second writer is refused meanwhile, and the resume
    computes only what the frozen worker held."""
    caplog.set_level(logging.INFO)
    url = f"{s3_bucket}/stores/digits"
    raw = s3_config(tmp_path, digits_model, url)
    once = tmp_path / "frozen.pid"
    faults = [{"ADVPIPE_FAULT": "mid-shard:stop", "ADVPIPE_FAULT_ONCE": str(once)}] * 2
    log_path = tmp_path / "client.log"
    with dask_processes(tmp_path, workers=2, worker_envs=faults) as (address, _):
        with Client(address, timeout=60) as observer:
            pids = observer.run(os.getpid)  # worker address -> pid of the process that runs tasks
        with open(log_path, "w") as log_file:
            client = subprocess.Popen([str(BIN / "advpipe"), "-v", "generate", str(write_config(tmp_path, raw)),
                                       "--scheduler", address], env={**os.environ, "OMP_NUM_THREADS": "1"},
                                      stdout=log_file, stderr=subprocess.STDOUT)
        try:
            victim = wait_for(lambda: frozen_pid(once), "a worker to freeze in its shard", 300, alive=client)
            wait_for(lambda: stopped(victim), "the frozen worker to stop", 60, alive=client)
            with Client(address, timeout=60) as observer:
                finished = wait_for(lambda: only_the_frozen_worker_busy(observer, pids, victim, url), "the other "
                                    "worker to finish every shard the frozen one does not hold", 300, alive=client)
            assert 1 <= finished <= 5
            with pytest.raises(StoreError, match=rf"another advpipe writer is using this store \(process "
                                                 rf"{client.pid} on host {socket.gethostname()}"):
                generate(config_from_dict(raw), scheduler=address, progress=False)
            with pytest.raises(StoreError, match="not a finished store"):
                open_store(url)  # no manifest: readers refuse the half-written store
        finally:
            client.send_signal(signal.SIGKILL)
            client.wait(timeout=60)
            with_frozen = frozen_pid(once)
            if with_frozen and psutil.pid_exists(with_frozen):
                os.kill(with_frozen, signal.SIGKILL)  # its nanny starts a fresh worker (the fault fired once)
        assert client.returncode == -signal.SIGKILL

        objects = bucket_objects(url)
        shards = object_shard_sums(objects)
        assert len(shards) == finished and "manifest.json" not in objects and LOCK_NAME in objects
        for name, digest in shards.items():  # every object under a shard's name is whole and recorded
            record = json.loads(objects[f".progress/{Path(name).stem}.json"])["record"]
            assert (record["name"], record["bytes"], record["sha256"]) == (name, len(objects[name]), digest)

        outcome = generate(config_from_dict(raw), scheduler=address, progress=False)
    assert (outcome.status, outcome.computed, outcome.reused) == ("created", 6 - finished, finished)
    assert "taking over the writer lock" in caplog.text and "no longer exists on this host" in caplog.text

    objects = bucket_objects(url)
    assert object_shard_sums(objects) == shard_file_sums(reference_store)
    manifest = json.loads(objects["manifest.json"])
    assert {s["name"]: s["sha256"] for split in manifest["splits"].values() for s in split["shards"]} == \
        shard_sums(reference_store)
    assert verify_store(url).ok
    assert sorted(name for name in objects if not name.endswith((".h5", ".tar"))) == ["README.md", "manifest.json"]
    assert not leaked({**objects, "client log": log_path.read_text(), "this process's log": caplog.text})


def test_a_killed_inline_run_resumes_only_from_shards_that_rehash(tmp_path, digits_model, reference_store,
                                                                   s3_bucket):
    """A shard object changed since its progress record (same size, one bit) is computed again: its ETag is no longer
    the one recorded at upload, so the resume reads it back and hashes it, trusting neither the record nor the
    object's size."""
    url = f"{s3_bucket}/digits"
    raw = s3_config(tmp_path, digits_model, url)
    killed = subprocess.run([str(BIN / "advpipe"), "generate", str(write_config(tmp_path, raw))],
                            env={**os.environ, "OMP_NUM_THREADS": "1", "ADVPIPE_FAULT": "between-shards"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    objects = bucket_objects(url)
    assert list(object_shard_sums(objects)) == ["train/train-00000.h5"] and "manifest.json" not in objects
    with pytest.raises(StoreError, match="not a finished store"):
        open_store(url)

    data = bytearray(objects["train/train-00000.h5"])
    data[len(data) // 2] ^= 0x01
    s3fs.S3FileSystem(skip_instance_cache=True).pipe_file(f"{url}/train/train-00000.h5", bytes(data))
    outcome = generate(config_from_dict(raw), progress=False)
    assert (outcome.computed, outcome.reused) == (6, 0)
    assert object_shard_sums(bucket_objects(url)) == shard_file_sums(reference_store)
    assert not leaked({"stdout": killed.stdout, "stderr": killed.stderr})


def test_the_manifest_is_the_last_object_written(tmp_path, digits_model, reference_store, s3_bucket, monkeypatch):
    """Every write and delete an inline generation makes, in order: the card, then the manifest, then only run
    state is deleted; the manifest never exists before every shard does."""
    url = f"{s3_bucket}/ordered"
    events: list[tuple[str, str]] = []

    def spied(location, storage_options=None):
        fs, root = writer_filesystem(location, storage_options)
        for method, kind, where in (("pipe_file", "write", 0), ("put_file", "write", 1), ("rm", "delete", 0),
                                    ("rm_file", "delete", 0)):
            def spy(*args, _original=getattr(fs, method), _kind=kind, _where=where, **kwargs):
                target = args[_where]
                for one in target if isinstance(target, list) else [target]:
                    events.append((_kind, str(one).split("/ordered/", 1)[-1]))
                return _original(*args, **kwargs)

            setattr(fs, method, spy)
        return fs, root

    monkeypatch.setattr(writer_module, "writer_filesystem", spied)
    monkeypatch.setattr(lock_module, "writer_filesystem", spied)
    outcome = generate(config_from_dict(s3_config(tmp_path, digits_model, url)), progress=False)
    assert outcome.status == "created"
    writes = [name for kind, name in events if kind == "write" and not name.startswith(".tmp-write")]
    shards = [name for name in writes if name.endswith(".h5")]
    assert sorted(shards) == sorted(shard_file_sums(reference_store))
    published = writes.index("manifest.json")
    assert writes[published - 1] == "README.md"
    assert all(writes.index(name) < published for name in shards)
    assert [name for name in writes[published + 1:] if name != LOCK_NAME] == []
    deleted_after = [name for kind, name in events[events.index(("write", "manifest.json")):] if kind == "delete"]
    assert deleted_after and all(name.startswith((".progress/", ".generation.json", LOCK_NAME))
                                 for name in deleted_after)
    assert object_shard_sums(bucket_objects(url)) == shard_file_sums(reference_store)


def test_the_lock_object_refuses_a_live_writer_and_takes_over_a_dead_one(s3_bucket, monkeypatch, caplog):
    url = f"{s3_bucket}/locked"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    with store_lock(url) as holder:
        assert json.loads(fs.cat_file(f"{url}/{LOCK_NAME}"))["pid"] == os.getpid() == holder["pid"]
        assert json.loads(fs.cat_file(f"{url}/{LOCK_NAME}"))["fence"] == 1  # a lock created afresh
        with pytest.raises(StoreError, match=rf"another advpipe writer .*process {os.getpid()} on host"), \
                store_lock(url):
            pass
    assert not fs.exists(f"{url}/{LOCK_NAME}")  # released: deleted

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = {"host": socket.gethostname(), "pid": dead.pid, "started": "then", "command": "advpipe generate x",
            "token": "dead", "fence": 4, "heartbeat": time.time()}
    elsewhere = {**here, "host": "another-node", "pid": 1, "token": "far"}
    fs.pipe_file(f"{url}/{LOCK_NAME}", json.dumps(here).encode())
    with caplog.at_level(logging.WARNING), store_lock(url):
        assert "no longer exists on this host" in caplog.text
        assert json.loads(fs.cat_file(f"{url}/{LOCK_NAME}"))["fence"] == 5  # every takeover: one more
    fs.pipe_file(f"{url}/{LOCK_NAME}", json.dumps(elsewhere).encode())
    with pytest.raises(StoreError, match="process 1 on host another-node"), store_lock(url):
        pass
    fs.pipe_file(f"{url}/{LOCK_NAME}", json.dumps({**elsewhere, "heartbeat": time.time() - 120}).encode())
    monkeypatch.setenv("ADVPIPE_LOCK_TTL", "60")
    with caplog.at_level(logging.WARNING), store_lock(url):
        assert "no heartbeat for more than 60 s" in caplog.text
    monkeypatch.setenv("ADVPIPE_LOCK_TTL", "0")
    with pytest.raises(StoreError, match="ADVPIPE_LOCK_TTL='0': must be a positive number"), store_lock(url):
        pass


def test_only_advpipe_objects_are_replaced_a_missing_bucket_is_named_and_http_is_read_only(tmp_path, digits_model,
                                                                                          s3_bucket):
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    url = f"{s3_bucket}/team-data"
    fs.pipe_file(f"{url}/results.csv", b"a,b\n1,2\n")
    raw = s3_config(tmp_path, digits_model, url)
    for force in (False, True):
        with pytest.raises(StoreError, match=r"prefix is not empty and is not a store \(results.csv\)"):
            generate(config_from_dict(raw), force=force, progress=False)
    assert sorted(bucket_objects(url)) == ["results.csv"]

    raw["store"]["path"] = f"{s3_bucket}-absent/digits"
    with pytest.raises(StoreError, match=r"-absent/digits: cannot list the store \(The specified bucket does not"):
        generate(config_from_dict(raw), progress=False)

    raw["store"]["path"] = "https://127.0.0.1:9/stores/digits"
    with pytest.raises(StoreError, match=r"'https://' is read-only for advpipe"):
        generate(config_from_dict(raw), progress=False)


def test_convert_writes_to_s3_the_bytes_it_writes_locally(tmp_path, reference_store, s3_bucket):
    url = f"{s3_bucket}/converted"
    convert_store(reference_store, url, "webdataset", progress=False)
    convert_store(reference_store, tmp_path / "converted", "webdataset", progress=False)
    objects = bucket_objects(url)
    assert object_shard_sums(objects) == shard_file_sums(tmp_path / "converted")
    assert json.loads(objects["manifest.json"]) == json.loads((tmp_path / "converted" / "manifest.json").read_text())
    assert verify_store(url).ok and "README.md" in objects
    with pytest.raises(StoreError, match="is the source"):
        convert_store(url, url, "hdf5", overwrite=True, progress=False)
    with pytest.raises(StoreError, match="is inside the source"):
        convert_store(url, f"{url}/nested", "hdf5", overwrite=True, progress=False)


def test_adding_a_variant_extends_a_store_in_s3(tmp_path, digits_model, reference_store, s3_bucket):
    """The store in the bucket goes offline (manifest saved aside) while the new variant is added to every shard,
    and comes back with the bytes of the two-variant store generated at once on local disk."""
    url = f"{s3_bucket}/extended"
    raw = s3_config(tmp_path, digits_model, url)
    fgsm = raw["variants"].pop("fgsm")
    assert generate(config_from_dict(raw), progress=False).status == "created"
    raw["variants"]["fgsm"] = fgsm
    outcome = generate(config_from_dict(raw), progress=False)
    assert (outcome.status, outcome.computed) == ("extended", 6)
    objects = bucket_objects(url)
    assert object_shard_sums(objects) == shard_file_sums(reference_store)
    assert sorted(name for name in objects if not name.endswith(".h5")) == ["README.md", "manifest.json"]
    assert generate(config_from_dict(raw), progress=False).status == "up-to-date"


def lock_heartbeat_age(url: str) -> float | None:
    lock = json.loads(bucket_objects(url)[LOCK_NAME])
    return time.time() - lock["heartbeat"]


def test_a_writer_paused_past_the_lock_ttl_is_fenced_off(tmp_path, digits_model, reference_store, s3_bucket,
                                                        monkeypatch, caplog):
    """The first writer freezes (SIGSTOP) after its first shard, longer than ADVPIPE_LOCK_TTL; a second takes its lock
    over (fence 2), keeps the verified shard and finishes the store; the first, continued, writes nothing more and
    exits with one line naming the takeover. The store is the second writer's, whole and verified."""
    url = f"{s3_bucket}/fenced"
    raw = s3_config(tmp_path, digits_model, url)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADVPIPE_FAULT": "between-shards:stop", "ADVPIPE_LOCK_TTL": "2",
           "ADVPIPE_FAULT_ONCE": str(tmp_path / "frozen.pid")}  # continued, it would go on to the end unfenced
    first = subprocess.Popen([str(BIN / "advpipe"), "generate", str(write_config(tmp_path, raw))], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: stopped(first.pid), "the first writer to freeze after its first shard", 300, alive=first)
        lock = json.loads(bucket_objects(url)[LOCK_NAME])
        assert (lock["pid"], lock["fence"]) == (first.pid, 1)
        wait_for(lambda: True if lock_heartbeat_age(url) > 2.5 else None, "the frozen writer's lock to go stale", 30)

        monkeypatch.setenv("ADVPIPE_LOCK_TTL", "2")
        with caplog.at_level(logging.WARNING):
            outcome = generate(config_from_dict(raw), progress=False)
        assert (outcome.status, outcome.computed, outcome.reused) == ("created", 5, 1)
        assert f"taking over the writer lock of process {first.pid} on host" in caplog.text
        assert "no heartbeat for more than 2 s (ADVPIPE_LOCK_TTL) (fence 2;" in caplog.text
        published = bucket_objects(url)

        first.send_signal(signal.SIGCONT)
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("advpipe generate:")]
    assert errors == [stderr.rstrip("\n").splitlines()[-1]] and "Traceback" not in stderr
    assert errors[0].startswith(f"advpipe generate: error: {url}: this writer's lock (fence 1) was taken over by "
                                "another writer, which has since released it; this writer stops without writing more")

    assert bucket_objects(url) == published  # the first writer wrote (and deleted) nothing after it was continued
    assert sorted(name for name in published if not name.endswith(".h5")) == ["README.md", "manifest.json"]
    assert object_shard_sums(published) == shard_file_sums(reference_store)
    manifest = json.loads(published["manifest.json"])
    assert {s["name"]: s["sha256"] for split in manifest["splits"].values() for s in split["shards"]} == \
        shard_sums(reference_store)
    assert verify_store(url).ok


def test_the_manifest_takes_only_this_writers_records_of_unchanged_objects(tmp_path, digits_model, reference_store,
                                                                         s3_bucket, monkeypatch, caplog):
    """After the shards are written, a stale writer (fence 4, taken over by this run: fence 5) lands a progress record
    with a wrong checksum over this run's, and a shard object changes under its record: neither reaches the manifest;
    both shards are reported and computed again, and the store is the reference's."""
    url = f"{s3_bucket}/assembled"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_fence = {"number": 4, "holder": "4" * 32}
    fs.pipe_file(f"{url}/{LOCK_NAME}", json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "then",
                                                  "command": "advpipe generate x", "token": stale_fence["holder"],
                                                  "fence": 4, "heartbeat": time.time()}).encode())
    run = job_module._run
    rounds: list[list[str]] = []

    def run_then_overwrite(tasks, job, *args, **kwargs):
        run(tasks, job, *args, **kwargs)
        rounds.append(sorted(t.name for t in tasks))
        if len(rounds) == 1:  # the stale writer's late writes, after every shard of this run is recorded
            key = f"{url}/.progress/train-00001.json"
            progress = json.loads(fs.cat_file(key))
            assert progress["fence"]["number"] == 5 and progress["object"]["etag"]
            stale = {**progress, "fence": stale_fence, "record": {**progress["record"], "sha256": "0" * 64}}
            fs.pipe_file(key, json.dumps(stale).encode())
            shard = bytearray(fs.cat_file(f"{url}/test/test-00000.h5"))
            shard[len(shard) // 2] ^= 0x01
            fs.pipe_file(f"{url}/test/test-00000.h5", bytes(shard))

    monkeypatch.setattr(job_module, "_run", run_then_overwrite)
    with caplog.at_level(logging.WARNING):
        outcome = generate(config_from_dict(s3_config(tmp_path, digits_model, url)), progress=False)
    assert rounds[1:] == [["test/test-00000.h5", "train/train-00001.h5"]] and outcome.computed == 6
    assert (f"{url}: ignoring .progress/train-00001.json, written by a stale writer (fence 4, holder 44444444; this "
            "writer holds fence 5)") in caplog.text
    assert "shard test/test-00000.h5: its object is no longer the one its record names" in caplog.text

    objects = bucket_objects(url)
    manifest = json.loads(objects["manifest.json"])
    assert {s["name"]: s["sha256"] for split in manifest["splits"].values() for s in split["shards"]} == \
        shard_sums(reference_store)
    assert object_shard_sums(objects) == shard_file_sums(reference_store)
    assert verify_store(url).ok


class BucketReads:
    """Counts what s3fs asks of the bucket, in this process, by key: bytes of GET responses, HEAD and PUT requests."""

    def __init__(self, monkeypatch) -> None:
        self.got: Counter[str] = Counter()
        self.heads: Counter[str] = Counter()
        self.puts: Counter[str] = Counter()
        call = s3fs.S3FileSystem._call_s3

        async def counted(fs, method, *args, **kwargs):
            out = await call(fs, method, *args, **kwargs)
            if method == "get_object":
                self.got[kwargs["Key"]] += int(out["ContentLength"])
            elif method == "head_object":
                self.heads[kwargs["Key"]] += 1
            elif method in ("put_object", "create_multipart_upload"):
                self.puts[kwargs["Key"]] += 1
            return out

        monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)

    @staticmethod
    def on_shards(counts: Counter[str]) -> int:
        return sum(n for key, n in counts.items() if key.endswith(".h5"))


def interrupted(self, manifest):
    raise KeyboardInterrupt("stopped before the manifest")


def test_a_resume_checks_finished_shards_without_reading_them(tmp_path, digits_model, s3_bucket, monkeypatch,
                                                            capsys):
    """A resume of a finished but unpublished 16-shard store reads no shard byte: each shard is checked with HEAD
    requests against the ETag recorded at upload. Where the service gives no ETag or version id (simulated), the
    resume falls back to reading every shard back and hashing it: the whole store once, as every resume did
    before."""
    url = f"{s3_bucket}/resumed"
    raw = s3_config(tmp_path, digits_model, url, batch_size=12)
    raw["store"]["shard_size"] = 12  # 96 images per split: 8 + 8 shards
    raw["variants"] = {"gaussian": {"sigma": 0.1}}  # no attack: the shards, not the variants, are measured here
    with pytest.MonkeyPatch.context() as patch:  # every shard and progress record written, no manifest
        patch.setattr(writer_module.StoreWriter, "publish", interrupted)
        with pytest.raises(KeyboardInterrupt):
            generate(config_from_dict(raw), progress=False)
    objects = bucket_objects(url)
    shards = {name: data for name, data in objects.items() if name.endswith(".h5")}
    assert len(shards) == 16 and "manifest.json" not in objects
    assert len([name for name in objects if name.startswith(".progress/")]) == 16
    progress = json.loads(objects[".progress/train-00000.json"])
    assert progress["object"]["etag"].strip('"') == hashlib.md5(shards["train/train-00000.h5"]).hexdigest()

    with pytest.MonkeyPatch.context() as patch:  # resumed up to the manifest again
        patch.setattr(writer_module.StoreWriter, "publish", interrupted)
        reads = BucketReads(patch)
        with pytest.raises(KeyboardInterrupt):
            generate(config_from_dict(raw), progress=False)
    after, heads = reads.on_shards(reads.got), reads.on_shards(reads.heads)
    assert after == 0 and reads.on_shards(reads.puts) == 0 and heads <= 2 * 16

    info = s3fs.S3FileSystem._info

    async def anonymous(fs, path, *args, **kwargs):  # a service that names no object version
        out = await info(fs, path, *args, **kwargs)
        return {k: v for k, v in out.items() if k not in ("ETag", "VersionId")}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(s3fs.S3FileSystem, "_info", anonymous)
        reads = BucketReads(patch)
        outcome = generate(config_from_dict(raw), progress=False)
    before = reads.on_shards(reads.got)
    assert (outcome.status, outcome.computed, outcome.reused) == ("created", 0, 16)
    assert before == sum(len(data) for data in shards.values()) and reads.on_shards(reads.puts) == 0
    assert verify_store(url).ok
    with capsys.disabled():
        print(f"\n16-shard resume: shard bytes read re-hashing every shard (every resume before; now only where the "
              f"service gives no ETag or version id) {before}, with the recorded ETag {after} ({heads} HEAD requests "
              "on shards)")
