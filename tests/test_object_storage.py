"""Stores on object storage (s3:// against moto's S3 server): reading, the shard cache, publish and fetch, the card,
credentials and the read-only guarantee.

Stores are uploaded with plain boto3 for the reading tests, so they do not depend on `publish`.
The bucket has versioning on: every write (a PUT, a copy, a delete marker) adds a version, so
comparing the bucket's versions before and after a read path proves that it wrote nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import urllib.request
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
from conftest import S3_TEST_CREDENTIALS, write_test_store

from advpipe import urls
from advpipe.cli import main
from advpipe.config import SamplerConfig, StoreConfig
from advpipe.errors import ConfigError, IntegrityError, StoreError
from advpipe.sampler import make_loader, open_loader
from advpipe.stores import open_store, read_manifest, verify_store
from advpipe.stores.cache import ShardCache
from advpipe.stores.card import CARD_NAME, render_card
from advpipe.stores.manifest import Manifest
from advpipe.stores.source import ShardSource
from advpipe.stores.transfer import fetch, publish

MIXED = SamplerConfig(ratio=(0.6, 0.6), seed=3, batch_size=16)


def client():
    """A client with the credentials in the environment now (boto3's default session would keep the first ones)."""
    return boto3.session.Session().client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def split_url(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key


def upload(local: Path, url: str) -> None:
    """Copy a local store into the bucket with boto3 (independent of advpipe's own publish)."""
    bucket, prefix = split_url(url)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            client().upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


def versions(url: str) -> list[tuple]:
    """Every version and delete marker in the bucket: any write changes this list."""
    bucket, _ = split_url(url)
    listing = client().list_object_versions(Bucket=bucket)
    return sorted((v["Key"], v["VersionId"], v.get("ETag", "delete-marker"))
                  for v in listing.get("Versions", []) + listing.get("DeleteMarkers", []))


def object_bytes(url: str, name: str) -> bytes:
    bucket, prefix = split_url(url)
    return client().get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()


def put_object(url: str, name: str, data: bytes) -> None:
    bucket, prefix = split_url(url)
    client().put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)


def delete_object(url: str, name: str) -> None:
    bucket, prefix = split_url(url)
    client().delete_object(Bucket=bucket, Key=f"{prefix}/{name}")


def set_moto_auth(endpoint: str, free_requests: str) -> None:
    """moto checks IAM permissions after `free_requests` more requests ('inf': never, its default)."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=free_requests.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request, timeout=10).close()


@contextlib.contextmanager
def read_only_credentials(monkeypatch: pytest.MonkeyPatch, bucket: str):
    """The environment holds the keys of an IAM user with docs/OBJECT_STORAGE.md's reader policy; moto enforces IAM."""
    import s3fs

    endpoint = os.environ["AWS_ENDPOINT_URL"]
    iam = boto3.session.Session().client("iam", endpoint_url=endpoint)
    user = f"reader-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17", "Statement": [  # exactly the reader policy of docs/OBJECT_STORAGE.md
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/*"},
        {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}"}]}
    iam.put_user_policy(UserName=user, PolicyName="read-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    set_moto_auth(endpoint, "0")
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        s3fs.S3FileSystem.clear_instance_cache()  # filesystems keep the credentials they were made with
        yield
    finally:
        set_moto_auth(endpoint, "inf")
        for name, value in S3_TEST_CREDENTIALS.items():
            monkeypatch.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "store"
    write_test_store(path)
    return path


@pytest.fixture
def stored(s3_bucket: str, tmp_path: Path, template: Path) -> tuple[Path, str]:
    """(local HDF5 store, the same store in a versioned bucket): train 70 images in 3 shards, test 36 in 2."""
    bucket, _ = split_url(s3_bucket)
    client().put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    local = tmp_path / "store"
    shutil.copytree(template, local)
    url = f"{s3_bucket}/stores/h5"
    upload(local, url)
    return local, url


def test_open_verify_and_inspect_a_store_in_s3(stored: tuple[Path, str], capsys: pytest.CaptureFixture) -> None:
    local, url = stored
    before = versions(url)
    here, there = open_store(local), open_store(url)
    assert there.path == url and there.manifest == here.manifest
    for split in here.manifest.splits:
        ids = np.random.default_rng(1).permutation(len(here.split(split)))
        variants = np.arange(len(ids)) % 3
        assert np.array_equal(there.split(split).read(ids, variants), here.split(split).read(ids, variants))
    report = verify_store(url)
    assert report.ok and (report.shards, report.samples) == (5, 106)
    assert main(["verify", url]) == 0 and main(["inspect", url]) == 0
    out = capsys.readouterr().out
    assert f"{url}: OK, 5 shards, 106 samples verified" in out and f"store        {url}\n" in out
    assert versions(url) == before  # read-only: not one object written, replaced or deleted


def test_map_style_loader_through_the_shard_cache_cold_then_warm(stored: tuple[Path, str], tmp_path: Path) -> None:
    local, url = stored
    before = versions(url)
    train = read_manifest(local).splits["train"].shards
    cache = ShardCache(tmp_path / "cache", max_bytes=2**30)
    expected = [(b.index.numpy(), b.variant.numpy(), b.x.numpy()) for b in make_loader(local, "train", MIXED)]

    def epoch(num_workers: int) -> tuple[list, dict]:
        loader = make_loader(url, "train", MIXED, cache=cache, num_workers=num_workers)
        batches = [(b.index.numpy(), b.variant.numpy(), b.x.numpy()) for b in loader]
        return batches, loader.metrics()

    for batches, metrics, cold in (*epoch(0), True), (*epoch(2), False):
        assert len(batches) == len(expected) == 5
        for (i, v, x), (ei, ev, ex) in zip(batches, expected, strict=True):
            assert np.array_equal(i, ei) and np.array_equal(v, ev) and np.array_equal(x, ex)
        if cold:  # each shard fetched once (checking the split), then found by the epoch's reader
            assert metrics["store/cache_misses"] == 3 and metrics["store/cache_hits"] == 3
            assert metrics["store/bytes_fetched"] == sum(s.bytes for s in train)
        else:  # nothing fetched; the hits include the two workers' (the main process alone opens 3 shards)
            assert metrics["store/cache_misses"] == 0 and metrics["store/bytes_fetched"] == 0
            assert metrics["store/cache_hits"] > 3
    assert {p.name for p in (tmp_path / "cache" / "objects").rglob("*") if p.is_file()} == {s.sha256 for s in train}
    assert versions(url) == before


def test_shard_cache_keeps_its_bound_and_evicts_the_least_recently_used(stored: tuple[Path, str],
                                                                          tmp_path: Path) -> None:
    local, url = stored
    first, second, last = read_manifest(local).splits["train"].shards  # 37520, 37520 and 12092 bytes
    cache = ShardCache(tmp_path / "cache", max_bytes=first.bytes + second.bytes)
    source = ShardSource(url, verify="checksum", cache=cache)

    def held() -> set[str]:
        return {p.name for p in (tmp_path / "cache" / "objects").rglob("*") if p.is_file()}

    for record in (first, second, last):
        source.fetch(record)
    assert held() == {second.sha256, last.sha256} and cache.size() <= cache.max_bytes  # the oldest went
    source.fetch(second)  # a hit: now the most recently used
    source.fetch(first)  # a miss: the least recently used (last) goes
    assert held() == {first.sha256, second.sha256}
    assert source.metrics() == {"store/cache_hits": 1, "store/cache_misses": 4,
                                "store/bytes_fetched": 2 * first.bytes + second.bytes + last.bytes}
    assert bytes(source.fetch(first)) == (local / first.name).read_bytes()


def _read_every_shard(source: ShardSource, local: Path) -> None:
    """In a child process: fetch every shard through the shared cache; exit 1 if any differs from the original."""
    records = [r for split in read_manifest(local).splits.values() for r in split.shards]
    os._exit(0 if all(bytes(source.fetch(r)) == (local / r.name).read_bytes() for r in records) else 1)


def test_every_read_path_works_with_read_only_credentials(stored: tuple[Path, str], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    local, url = stored
    wds = tmp_path / "wds"
    write_test_store(wds, backend="webdataset", shard_size=16)
    upload(wds, f"{url}-wds")
    before = versions(url)
    with read_only_credentials(monkeypatch, split_url(url)[0]):
        assert verify_store(url).ok and main(["inspect", url]) == 0
        there, here = open_store(url).split("test"), open_store(local).split("test")
        assert np.array_equal(there.read([0, 5], 2), here.read([0, 5], 2))
        assert sum(len(b.index) for b in make_loader(url, "train", MIXED, cache=ShardCache(tmp_path / "c"))) == 70
        assert sum(len(b.index) for b in open_loader(f"{url}-wds", "train", MIXED, batch_size=16)) == 70
        assert fetch(url, tmp_path / "copy").copied
        with pytest.raises(StoreError, match="the credentials in use may not do this"):  # IAM is enforced
            publish(local, f"{url}-copy")
    assert versions(url) == before  # listed with the admin keys: the reader policy grants no version listing


def test_processes_sharing_a_cache_fetch_each_shard_once(stored: tuple[Path, str], tmp_path: Path) -> None:
    import multiprocessing

    local, url = stored
    records = [r for split in read_manifest(local).splits.values() for r in split.shards]
    source = ShardSource(url, verify="checksum", cache=ShardCache(tmp_path / "cache"))
    children = [multiprocessing.get_context("fork").Process(target=_read_every_shard, args=(source, local))
                for _ in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    assert [child.exitcode for child in children] == [0, 0, 0]
    assert source.metrics() == {"store/cache_hits": 2 * len(records), "store/cache_misses": len(records),
                                "store/bytes_fetched": sum(r.bytes for r in records)}
    assert not list((tmp_path / "cache" / "tmp").iterdir())  # no temporary file left behind


def _count_a_fetch(source: ShardSource) -> None:
    source.counters.add(misses=1, fetched=1000)


def test_fetch_counts_of_spawned_workers_reach_the_main_process() -> None:
    """DataLoader workers may be spawned, not forked (multiprocessing_context='spawn'): their counts still add up."""
    import multiprocessing

    source = ShardSource("s3://bucket/store")
    child = multiprocessing.get_context("spawn").Process(target=_count_a_fetch, args=(source,))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0
    assert source.metrics() == {"store/cache_hits": 0, "store/cache_misses": 1, "store/bytes_fetched": 1000}


def test_streaming_loader_reads_a_webdataset_store_in_s3(s3_bucket: str, tmp_path: Path) -> None:
    local = tmp_path / "wds"
    write_test_store(local, backend="webdataset", shard_size=16)
    url = f"{s3_bucket}/stores/wds"
    upload(local, url)
    here = [b for b in open_loader(local, "train", MIXED, batch_size=16)]
    loader = open_loader(url, "train", MIXED, batch_size=16)
    there = [b for b in loader]
    assert len(there) == len(here) > 1
    for a, b in zip(here, there, strict=True):
        assert np.array_equal(a.index.numpy(), b.index.numpy()) and np.array_equal(a.x.numpy(), b.x.numpy())
    assert loader.metrics()["store/bytes_fetched"] == sum(s.bytes for s in read_manifest(local).splits["train"].shards)


def test_a_flipped_byte_or_a_missing_object_is_named(stored: tuple[Path, str], tmp_path: Path) -> None:
    local, url = stored
    bad, gone = read_manifest(local).splits["train"].shards[1], read_manifest(local).splits["test"].shards[0]
    intact = object_bytes(url, bad.name)
    put_object(url, bad.name, intact[:500] + bytes([intact[500] ^ 0x01]) + intact[501:])
    report = verify_store(url)
    assert len(report.problems) == 1 and f"shard {bad.name}: sha256 does not match" in report.problems[0]
    cache = ShardCache(tmp_path / "cache")
    with pytest.raises(IntegrityError, match=f"shard {bad.name}: sha256 does not match the manifest"):
        make_loader(url, "train", MIXED, cache=cache)
    assert not cache.entry_path(bad.sha256).exists()  # a corrupt object never becomes a cache entry
    with pytest.raises(IntegrityError, match=f"shard {bad.name}: the object in .* does not match"):
        fetch(url, tmp_path / "copy")
    assert not (tmp_path / "copy" / "manifest.json").exists()
    delete_object(url, gone.name)
    report = verify_store(url)
    assert any(f"shard {gone.name}: missing" in problem for problem in report.problems)
    with pytest.raises(IntegrityError, match=f"shard {gone.name}: missing from {url}"):
        open_store(url)
    assert main(["verify", f"{url}-nowhere"]) == 2


def test_publish_then_fetch_round_trips_a_store(stored: tuple[Path, str], tmp_path: Path) -> None:
    local, stored_url = stored
    url = f"{stored_url}-published"
    names = sorted(str(p.relative_to(local)) for p in local.rglob("[!.]*") if p.is_file())  # not a writer's lock
    assert CARD_NAME in names and "manifest.json" in names
    report = publish(local, url)
    assert sorted(report.copied) == names and not report.kept
    assert all(object_bytes(url, name) == (local / name).read_bytes() for name in names)
    copy = tmp_path / "copy"
    report = fetch(url, copy)
    assert sorted(report.copied) == names
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file()) == names
    assert all((copy / name).read_bytes() == (local / name).read_bytes() for name in names)
    assert verify_store(copy).ok


def test_publish_and_fetch_resume_and_replace_only_what_does_not_verify(stored: tuple[Path, str],
                                                                         tmp_path: Path) -> None:
    local, url = stored
    records = {s.name: s for split in read_manifest(local).splits.values() for s in split.shards}
    shards = sorted(records)
    publish(local, url)  # the bucket already holds an identical copy: everything verifies, nothing is sent
    before = versions(url)
    report = publish(local, url)
    assert not report.copied and versions(url) == before
    delete_object(url, shards[0])
    put_object(url, shards[3], b"not the shard")
    delete_object(url, "manifest.json")  # as an interrupted publish leaves it
    report = publish(local, url)
    assert sorted(report.copied) == sorted([shards[0], shards[3], "manifest.json"])
    assert verify_store(url).ok
    copy = tmp_path / "copy"
    fetch(url, copy)
    (copy / shards[1]).unlink()
    (copy / shards[2]).write_bytes(b"x" * records[shards[2]].bytes)  # the right size, the wrong bytes
    report = fetch(url, copy)
    assert sorted(report.copied) == sorted([shards[1], shards[2]])
    assert verify_store(copy).ok


def test_publish_checks_before_sending_and_writes_the_manifest_last(stored: tuple[Path, str], tmp_path: Path,
                                                                     s3_bucket: str) -> None:
    local, _ = stored
    url = f"{s3_bucket}/stores/other"
    record = read_manifest(local).splits["test"].shards[1]
    intact = (local / record.name).read_bytes()
    (local / record.name).write_bytes(intact[:-1] + bytes([intact[-1] ^ 0x01]))
    with pytest.raises(IntegrityError, match=f"shard {record.name}: sha256 does not match"):
        publish(local, url)
    bucket, _prefix = split_url(url)
    keys = {o["Key"] for o in client().list_objects_v2(Bucket=bucket, Prefix="stores/other/").get("Contents", [])}
    assert f"stores/other/{record.name}" not in keys and "stores/other/manifest.json" not in keys
    (local / record.name).write_bytes(intact)
    publish(local, url)
    other = tmp_path / "other"
    write_test_store(other, shard_size=20)
    with pytest.raises(StoreError, match="already holds a different store"):
        publish(other, url)
    assert main(["publish", str(other), url, "--force"]) == 0
    assert read_manifest(other) == open_store(url).manifest and verify_store(url).ok
    with pytest.raises(StoreError, match="read-only"):
        publish(local, "https://example.invalid/stores/x")


def test_no_credential_reaches_the_store_the_cache_or_the_logs(stored: tuple[Path, str], tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture,
                                                               capsys: pytest.CaptureFixture) -> None:
    local, url = stored
    caplog.set_level(logging.DEBUG)
    target = f"{url}-cli"
    assert main(["-v", "publish", str(local), target]) == 0
    assert main(["-v", "fetch", target, str(tmp_path / "copy")]) == 0
    assert main(["-v", "verify", target]) == 0 and main(["-v", "inspect", target]) == 0
    loader = make_loader(target, "train", MIXED, cache=ShardCache(tmp_path / "cache"))
    assert sum(len(b.index) for b in loader) == 70
    assert main(["verify", "http://someone:pw-advpipe-secret@127.0.0.1:9/stores/x?X-Amz-Signature=sig-0123"]) == 2
    out, err = capsys.readouterr()
    assert "http://***@127.0.0.1:9/stores/x?X-Amz-Signature=***" in err
    secrets = [*S3_TEST_CREDENTIALS.values()][:2] + ["pw-advpipe-secret", "sig-0123"]
    bucket, _ = split_url(url)
    texts = {"stdout": out, "stderr": err, "logs": caplog.text}
    texts |= {o["Key"]: client().get_object(Bucket=bucket, Key=o["Key"])["Body"].read().decode("latin-1")
              for o in client().list_objects_v2(Bucket=bucket)["Contents"]}
    texts |= {str(p): p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()}
    assert len(texts) > 20 and "DEBUG" in caplog.text
    assert not [(where, s) for where, text in texts.items() for s in secrets if s in text]


def test_credentials_are_refused_as_options_and_the_endpoint_may_come_from_the_config(
        stored: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    local, url = stored
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    options = urls.config_storage_options(url, StoreConfig(endpoint_url=endpoint))
    assert options == {"endpoint_url": endpoint}
    assert open_store(url, storage_options=options).manifest == read_manifest(local)
    with pytest.raises(ConfigError, match="'secret' looks like a credential"):
        open_store(url, storage_options={"secret": S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]})
    with pytest.raises(ValueError, match="'key' looks like a credential"):
        StoreConfig(storage_options={"key": "AKIA"})
    assert urls.redact("s3 said: https://u:p@h/b?sig=abc&x=1 and Credential=AKIA/2026") == \
        "s3 said: https://***@h/b?sig=***&x=1 and Credential=***"


def test_the_card_describes_the_store_and_its_python_reads_it(stored: tuple[Path, str]) -> None:
    local, url = stored
    raw = read_manifest(local).model_dump(mode="json")
    raw["splits"]["train"]["stats"]["noise"] = {"count": 70, "clean_correct": 60, "fooled": 27, "success_rate": 0.45}
    manifest = Manifest.model_validate(raw)
    card = render_card(manifest)
    assert "| noise | noise | attack | float16 | `-` | 45.0% | - | 0 |" in card
    assert f"- store fingerprint: `{manifest.fingerprint}`" in card and "| train | 70 | 3 |" in card
    assert (local / CARD_NAME).read_text() == render_card(read_manifest(local))  # the writer wrote it
    code = card.split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(code.replace("s3://BUCKET/PATH/TO/THIS/STORE", url), namespace)  # the card's own lines read the store
    assert namespace["x"].shape == (3, 3, 8, 8)
    assert np.array_equal(namespace["x"], open_store(local).split("train").read([0, 1, 2], 1))
