"""A careless flag never costs a user their files, and one writer per store.

`--force` replaces only an advpipe store or an interrupted generation: never another directory,
the working or home directory, or a conversion's source (nor anything around or inside it).
Every writer holds the store's lock; a second one is refused at once, naming the first, and a
killed writer's lock does not outlive it. Writers are real `advpipe` processes, held at an exact
moment with the fault points of advpipe/faults.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import CLASSES, digits_config, make_arrays, wait_for, write_test_store

from advpipe.config import config_from_dict
from advpipe.errors import ConfigError, IntegrityError, StoreError
from advpipe.pipeline import cluster
from advpipe.pipeline.job import generate
from advpipe.stores import build_store, convert_store, open_store, read_manifest, verify_store
from advpipe.stores.lock import HOLDER_NAME, LOCK_NAME
from advpipe.stores.writer import check_target, ownership

BIN = Path(sys.executable).parent
NOISE = {"gaussian": {"sigma": 0.1}}  # no attack and no source model: a run takes seconds
OTHER_NOISE = {"gaussian": {"sigma": 0.3}}


def user_files(root: Path) -> dict[str, bytes]:
    """A user's directory: files that no advpipe command may delete."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "thesis.tex").write_text("three years of work")
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "results.csv").write_text("a,b\n1,2\n")
    return contents(root)


def contents(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def advpipe(*args: str, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "advpipe"), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **popen)


# --------------------------------------------------------------------------- --force and output paths


def test_convert_refuses_a_target_around_or_inside_its_source(tmp_path):
    source = tmp_path / "parent" / "store"
    write_test_store(source)
    before = contents(tmp_path / "parent")
    for target, relation in ((tmp_path / "parent", "holds the source"), (source, "is the source"),
                             (source / "train", "is inside the source"), (tmp_path, "holds the source")):
        with pytest.raises(StoreError, match=relation):
            convert_store(source, target, "webdataset", overwrite=True, progress=False)
    assert contents(tmp_path / "parent") == before
    assert verify_store(source).ok
    result = advpipe("convert", str(source), str(tmp_path / "parent"), "--to", "webdataset", "--force")
    assert result.returncode == 2, result.stderr
    assert f"holds the source {source}" in result.stderr and "Traceback" not in result.stderr
    assert contents(tmp_path / "parent") == before


def test_generate_refuses_a_store_inside_its_source_data(tmp_path):
    """A store written into an image folder would become one more class folder of the data it came from."""
    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    for index in range(10):
        (images / f"c{index % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 12 * index, dtype=np.uint8)).save(images / f"c{index % 2}" / f"{index}.png")
    before = contents(images)
    raw = digits_config(tmp_path, variants=NOISE)
    raw["source"] = {"kind": "imagefolder", "path": str(images), "image_size": 8}
    raw["store"]["path"] = str(images / "store")
    with pytest.raises(StoreError, match=f"is inside the source {images}"):
        generate(config_from_dict(raw), force=True, progress=False)
    assert contents(images) == before and not (images / "store").exists()


def test_force_never_replaces_a_directory_that_is_not_a_store(tmp_path):
    source = tmp_path / "store"
    write_test_store(source)
    mine = tmp_path / "mine"
    before = user_files(mine)
    with pytest.raises(StoreError, match=r"not empty and is not a store \(data, thesis\.tex\)"):
        convert_store(source, mine, "webdataset", overwrite=True, progress=False)
    with pytest.raises(StoreError, match="not empty and is not a store"):
        build_store(mine, {"train": make_arrays(8)}, class_names=CLASSES, overwrite=True, progress=False)
    raw = digits_config(tmp_path, variants=NOISE)
    raw["store"]["path"] = str(mine)
    with pytest.raises(StoreError, match="not empty and is not a store"):
        generate(config_from_dict(raw), force=True, progress=False)
    assert contents(mine) == before  # not one file added, changed or removed
    (mine / "manifest.json").write_text('{"name": "my web app"}')  # someone else's manifest
    with pytest.raises(StoreError, match="not an advpipe store manifest"):
        convert_store(source, mine, "webdataset", overwrite=True, progress=False)
    assert (mine / "thesis.tex").read_text() == "three years of work"


def test_no_store_at_the_working_or_home_directory(tmp_path, monkeypatch):
    work, home = tmp_path / "work", tmp_path / "home"
    work_files, home_files = user_files(work), user_files(home)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    arrays = {"train": make_arrays(8)}
    for path, what in ((".", "the working directory"), (work, "the working directory"),
                       (tmp_path, "the working directory or a directory holding it"),
                       ("~", "your home directory"), (home, "your home directory")):
        with pytest.raises(StoreError, match=what):
            build_store(path, arrays, class_names=CLASSES, overwrite=True, progress=False)
    empty = tmp_path / "empty-cwd"
    empty.mkdir()
    monkeypatch.chdir(empty)  # even an empty working directory is nobody's store
    with pytest.raises(StoreError, match="the working directory"):
        build_store(".", arrays, class_names=CLASSES, progress=False)
    assert list(empty.iterdir()) == []
    with pytest.raises(StoreError, match="a directory holding it"):
        check_target("/")
    assert (contents(work), contents(home)) == (work_files, home_files)
    raw = digits_config(tmp_path, variants=NOISE)  # a store path that resolves to the working directory
    raw["store"]["path"] = str(empty)
    with pytest.raises(StoreError, match="the working directory"):
        generate(config_from_dict(raw), force=True, progress=False)
    assert list(empty.iterdir()) == []


def test_force_replaces_a_store_and_an_interrupted_conversion(tmp_path):
    source, target = tmp_path / "store", tmp_path / "copy"
    write_test_store(source)
    write_test_store(target, count=20)
    convert_store(source, target, "webdataset", overwrite=True, progress=False)
    assert read_manifest(target).backend == "webdataset" and verify_store(target).ok
    (target / "manifest.json").unlink()  # as a conversion killed before its manifest leaves it...
    (target / ".generation.json").write_text(json.dumps({"fingerprint": None, "writer": "advpipe convert"}))
    with pytest.raises(StoreError, match="interrupted generation or conversion"):
        convert_store(source, target, "hdf5", progress=False)
    convert_store(source, target, "hdf5", overwrite=True, progress=False)  # ...and --force replaces it
    assert read_manifest(target).backend == "hdf5" and verify_store(target).ok
    assert not list(target.rglob("*.tar")), "the replaced store's shards were left behind"
    assert (target / LOCK_NAME).exists() and not (target / HOLDER_NAME).exists()
    assert open_store(target).split("train").read([0, 1], 1).shape[0] == 2  # the lock file is no store content


def with_refused_member(store: Path, shard: str, member: str) -> None:
    """Put a member a tar reader refuses (a hard link, an absolute name) before the shard's records, and re-sign
    the shard in the manifest, as a hostile store's author could: only reading the shard finds it (exit 3)."""
    info = tarfile.TarInfo("000000000.cls" if member == "hard link" else "/etc/000000000.cls")
    if member == "hard link":
        info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
    path = store / shard
    path.write_bytes(info.tobuf(tarfile.USTAR_FORMAT) + path.read_bytes())
    data = path.read_bytes()
    manifest = json.loads((store / "manifest.json").read_text())
    for record in (r for split in manifest["splits"].values() for r in split["shards"] if r["name"] == shard):
        record["bytes"], record["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (store / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("member", ["hard link", "absolute name"])
def test_a_failed_conversion_leaves_nothing_behind(tmp_path, member):
    """The test split converts before train (sorted): the refused member in train's second shard came after
    finished shards of both splits, which stayed in the target."""
    source = tmp_path / "store"
    write_test_store(source, backend="webdataset")
    with_refused_member(source, "train/train-00001.tar", member)
    before = contents(source)
    target = tmp_path / "new" / "copy"  # two folders this run creates
    result = advpipe("convert", str(source), str(target), "--to", "hdf5")
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stderr.startswith("advpipe convert: error: shard train/train-00001.tar: member "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "new").exists()
    assert contents(source) == before


@pytest.mark.parametrize("existing", ["empty directory", "store replaced with --force"])
def test_a_failed_conversion_into_an_existing_directory_leaves_no_store(tmp_path, existing):
    """A directory that was there stays, without a shard, a marker or a manifest: no reader takes it for a store,
    and the next conversion needs no --force."""
    source, target = tmp_path / "store", tmp_path / "copy"
    write_test_store(source, backend="webdataset")
    if existing == "empty directory":
        target.mkdir()
    else:
        write_test_store(target, count=20)
    with_refused_member(source, "train/train-00001.tar", "hard link")
    with pytest.raises(IntegrityError, match="member '000000000.cls' is not a regular file"):
        convert_store(source, target, "hdf5", overwrite=True, progress=False)
    assert sorted(p.name for p in target.rglob("*")) == [LOCK_NAME]
    assert ownership(target) == "empty"
    with pytest.raises(StoreError, match="no manifest.json"):
        read_manifest(target)
    good = tmp_path / "good"
    write_test_store(good)
    convert_store(good, target, "webdataset", progress=False)
    assert verify_store(target).ok


def test_replacing_a_run_clears_only_an_advpipe_run_directory(tmp_path):
    """The main job retrains a run directory made with other settings: only one `advpipe train` wrote."""
    from advpipe.errors import TrainingError
    from advpipe.trainers.run import _claim_run_dir

    settings = {"fingerprint": "new", "method": "clean", "status": "running"}
    theirs = tmp_path / "theirs"
    user_files(theirs)
    (theirs / "evaluation").mkdir()
    (theirs / "evaluation" / "figures.pdf").write_text("someone else's evaluation")
    (theirs / "model.pt").write_text("someone else's model")
    (theirs / "run.json").write_text(json.dumps({"experiment": "mine"}))  # another tool's run.json
    before = contents(theirs)
    with pytest.raises(TrainingError, match="not a run directory of `advpipe train`"):
        _claim_run_dir(theirs, settings, resume=False, replace=True)
    assert contents(theirs) == before
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "run.json").write_text(json.dumps({"fingerprint": "old", "method": "clean", "status": "finished"}))
    (ours / "model.pt").write_text("the old run's model")
    (ours / "notes.txt").write_text("kept: advpipe did not write it")
    assert _claim_run_dir(ours, settings, resume=False, replace=True) == "new"
    assert sorted(p.name for p in ours.iterdir()) == ["notes.txt", "run.json"]


# --------------------------------------------------------------------------- one writer per store


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def stopped(pid: int) -> bool | None:
    return True if psutil.Process(pid).status() == psutil.STATUS_STOPPED else None


def held_generate(config: Path, log: Path, once: Path, *args: str) -> subprocess.Popen:
    """`advpipe generate`, frozen (SIGSTOP) after its first shard while it holds the store."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADVPIPE_FAULT": "between-shards:stop",
           "ADVPIPE_FAULT_ONCE": str(once)}
    with open(log, "w") as handle:
        writer = subprocess.Popen([str(BIN / "advpipe"), "generate", str(config), *args], env=env, stdout=handle,
                                  stderr=subprocess.STDOUT)
    wait_for(lambda: stopped(writer.pid), "the writer to stop after its first shard", timeout=120, alive=writer)
    return writer


def assert_refused_naming(result: subprocess.CompletedProcess, holder: subprocess.Popen, seconds: float) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "another advpipe writer is using this store" in result.stderr, result.stderr
    assert f"process {holder.pid} on host {socket.gethostname()}, started 20" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert seconds < 30, f"the second writer took {seconds:.0f} s to be refused"


@pytest.mark.parametrize("holder_forces", [False, True], ids=["plain-run-holds", "force-run-holds"])
def test_a_second_writer_is_refused_at_once_naming_the_first(tmp_path, holder_forces):
    """Both orders: the plain run holds and a --force run with other settings is refused, and the reverse."""
    plain = write_config(tmp_path / "plain.yaml", digits_config(tmp_path, variants=NOISE))
    other = write_config(tmp_path / "other.yaml", digits_config(tmp_path, variants=OTHER_NOISE))
    first, first_args, second = (other, ["--force"], plain) if holder_forces else (plain, [], other)
    if holder_forces:  # the --force run replaces an existing store
        assert generate(config_from_dict(yaml.safe_load(plain.read_text())), progress=False).status == "created"
    holder = held_generate(first, tmp_path / "first.log", tmp_path / "frozen.pid", *first_args)
    try:
        for args in ([], ["--force"]):
            started = time.monotonic()
            refused = advpipe("generate", str(second), *args)
            assert_refused_naming(refused, holder, time.monotonic() - started)
        assert not (tmp_path / "store" / "manifest.json").exists()
        holder.send_signal(signal.SIGCONT)
        assert holder.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    store = tmp_path / "store"
    assert verify_store(store).ok
    sigma = yaml.safe_load(first.read_text())["variants"]["gaussian"]["sigma"]
    assert read_manifest(store).variants[0].params["sigma"] == sigma  # the holder's settings, in every shard
    assert not (store / HOLDER_NAME).exists()
    assert generate(config_from_dict(yaml.safe_load(first.read_text())), progress=False).status == "up-to-date"


def test_a_killed_writer_does_not_block_the_next_run(tmp_path):
    config = write_config(tmp_path / "config.yaml", digits_config(tmp_path, variants=NOISE))
    holder = held_generate(config, tmp_path / "first.log", tmp_path / "frozen.pid")
    holder.kill()  # SIGKILL: no chance to release anything
    holder.wait()
    store = tmp_path / "store"
    assert json.loads((store / HOLDER_NAME).read_text())["pid"] == holder.pid  # its record is left behind
    resumed = advpipe("generate", str(config))
    assert resumed.returncode == 0, resumed.stderr
    assert "1 reused" in resumed.stdout, resumed.stdout  # it resumed the killed run, not started over
    assert verify_store(store).ok and not (store / HOLDER_NAME).exists()


# --------------------------------------------------------------------------- schedulers and Ctrl-C


def test_an_unreachable_scheduler_leaves_the_store_untouched(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(cluster, "SCHEDULER_TIMEOUT", "1s")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    config = config_from_dict(digits_config(tmp_path, variants=NOISE))
    with pytest.raises(ConfigError, match=f"cannot reach the Dask scheduler at {address}"):
        generate(config, scheduler=address, progress=True)
    assert not (tmp_path / "store").exists()  # checked before the store was claimed (or even created)
    assert "shards" not in capfd.readouterr().err  # no progress bar started for the error to end up on


def test_ctrl_c_with_local_workers_exits_130_with_one_line(tmp_path):
    """Ctrl-C reaches the client and its worker processes (one process group): one line, no tracebacks."""
    raw = digits_config(tmp_path, variants=NOISE)
    raw["generation"]["cluster"] = "local:2"
    config = write_config(tmp_path / "config.yaml", raw)
    frozen = tmp_path / "frozen.pid"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADVPIPE_FAULT": "mid-shard:stop", "ADVPIPE_FAULT_ONCE": str(frozen)}
    client = subprocess.Popen([str(BIN / "advpipe"), "generate", str(config)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)  # as a terminal's job
    try:
        worker = int(wait_for(lambda: frozen.read_text() if frozen.exists() and frozen.read_text().endswith("\n")
                              else None, "a worker to start a shard", timeout=120, alive=client))
        wait_for(lambda: stopped(worker), "the worker to stop mid-shard", timeout=60, alive=client)
        os.kill(worker, signal.SIGCONT)  # busy again when Ctrl-C comes
        os.killpg(client.pid, signal.SIGINT)
        _, err = client.communicate(timeout=120)
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait()
    assert client.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and "shards:" not in line and " INFO " not in line]
    assert lines == ["advpipe generate: interrupted; re-run the same command to resume"], err
    wait_for(lambda: True if not _group_alive(client.pid) else None, "the worker processes to end", timeout=60)
    resumed = advpipe("generate", str(config), "--cluster", "inline")
    assert resumed.returncode == 0, resumed.stderr  # the interrupted run released the store
    assert verify_store(tmp_path / "store").ok


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
