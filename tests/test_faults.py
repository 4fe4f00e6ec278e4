"""Fault injection with real processes and real signals: kills, a dying worker, a full disk, corruption."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from conftest import config_at, dask_processes, digits_config, shard_sums, write_test_store

from advpipe.config import SamplerConfig, config_from_dict
from advpipe.errors import IntegrityError, StoreError
from advpipe.pipeline.job import generate
from advpipe.stores import open_store, verify_store

BIN = Path(sys.executable).parent
POINTS = ["source-read", "mid-shard", "between-shards", "manifest-write", "after-manifest"]


def run_generate(config_path: Path, fault: str | None = None, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fault:
        env["ADVPIPE_FAULT"] = fault
    return subprocess.run([str(BIN / "advpipe"), "generate", str(config_path), *extra], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_of_the_client_then_resume(tmp_path, digits_model, reference_store, point):
    raw = digits_config(tmp_path, checkpoint=digits_model)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    killed = run_generate(config_path, point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    store = tmp_path / "store"
    finished = point == "after-manifest"
    assert (store / "manifest.json").exists() == finished
    if not finished:
        with pytest.raises(StoreError, match="not a finished store|no such store"):
            open_store(store)  # a reader is refused until the manifest is complete
    outcome = generate(config_from_dict(raw), progress=False)
    assert outcome.status == ("up-to-date" if finished else "created")
    assert shard_sums(store) == shard_sums(reference_store)
    assert verify_store(store).ok
    leftovers = [p.name for p in store.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_kill_9_of_one_dask_worker_during_generation(tmp_path, digits_model):
    """Two real workers under a real scheduler; one worker process is SIGKILLed mid-run."""
    with dask_processes(tmp_path, workers=2) as (address, workers):
        slow = {"gaussian": {"sigma": 0.1}, "deepfool": {"max_iter": 50}}
        config = config_at(tmp_path, digits_model, variants=slow, shard_size=16)
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(outcome=generate(config, scheduler=address,
                                                                                progress=False)))
        runner.start()
        progress = tmp_path / "store" / ".progress"
        while runner.is_alive() and not list(progress.glob("*.json")):
            time.sleep(0.05)
        assert runner.is_alive(), "generation finished before a worker could be killed"
        victim = psutil.Process(workers[0].pid).children(recursive=True)[0]
        victim.send_signal(signal.SIGKILL)
        runner.join(timeout=600)
    assert result["outcome"].status == "created"
    assert verify_store(tmp_path / "store").ok
    assert not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE


def test_disk_full_while_writing_a_shard(tmp_path, digits_model):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        raw = digits_config(tmp_path, checkpoint=digits_model)
        raw["store"]["path"] = str(mount / "store")
        with pytest.raises(StoreError, match="could not be written") as error:
            generate(config_from_dict(raw), progress=False)
        assert "free space" in str(error.value)
        store = mount / "store"
        assert not (store / "manifest.json").exists()
        assert not list(store.rglob(".tmp-*")), "a half-written temp file was left behind"
        for shard in [p for p in store.rglob("*") if p.suffix == ".h5"]:
            record = json.loads((store / ".progress" / f"{shard.stem}.json").read_text())["record"]
            assert record["bytes"] == shard.stat().st_size  # every shard under a final name is complete
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        outcome = generate(config_from_dict(raw), progress=False)
        assert outcome.status == "created" and verify_store(store).ok
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_shard_is_named_by_verify_and_by_the_sampler(tmp_path, damage):
    from advpipe.sampler import make_loader

    write_test_store(tmp_path / "store")
    shard = tmp_path / "store" / "train" / "train-00001.h5"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    shard.write_bytes(bytes(data))
    report = verify_store(tmp_path / "store")
    assert not report.ok and "train-00001.h5" in " ".join(report.problems)
    with pytest.raises(IntegrityError, match="train-00001.h5"):
        loader = make_loader(tmp_path / "store", "train", SamplerConfig(batch_size=8))
        next(iter(loader))


def test_reader_refuses_a_store_while_generate_is_writing_it(tmp_path, digits_model):
    raw = digits_config(tmp_path, checkpoint=digits_model, variants={"gaussian": {}, "deepfool": {"max_iter": 50}})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    writer = subprocess.Popen([str(BIN / "advpipe"), "generate", str(config_path)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        store = tmp_path / "store"
        refusals = 0
        while writer.poll() is None:
            if (store / ".progress").exists() and not (store / "manifest.json").exists():
                with pytest.raises(StoreError, match="not a finished store"):
                    open_store(store)
                refusals += 1
            time.sleep(0.1)
        assert writer.returncode == 0 and refusals > 0
        assert open_store(store).split("train").read(np.arange(4), 2).shape == (4, 1, 16, 16)
    finally:
        if writer.poll() is None:
            writer.kill()
        shutil.rmtree(tmp_path / "store", ignore_errors=True)
