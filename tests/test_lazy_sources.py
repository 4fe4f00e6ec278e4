"""Lazy sources (image folders, WebDataset shards): the same bytes as loading whole, bounded memory, checked reads.

The fixture writes one small set of digits three ways, in the same order: an .npz (loaded whole), an
image folder and WebDataset tar shards (both read lazily), so every comparison is against the
whole-loading path on the very same images.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import digits_config, shard_file_sums
from PIL import Image

from advpipe.config import SourceConfig, config_from_dict
from advpipe.datasets import LAZY_READERS, load_source
from advpipe.datasets.lazy import CHUNKED_SCHEME, LazySource, index_cache_dir
from advpipe.errors import DataError, SourceChangedError
from advpipe.pipeline.cluster import dask_client, dask_runner, gpu_ids, pinned_workers
from advpipe.pipeline.job import generate

CLASSES = [str(c) for c in range(10)]


def digits_images(count: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` digits at 16x16 (gray), the same number of each class from the class's `offset`-th image on
    (so every class is there), class-sorted as a folder lists them, and their labels."""
    split = load_source(SourceConfig(kind="digits", image_size=16), "train")
    rows = np.concatenate([np.flatnonzero(split.labels == c)[offset: offset + count // 10] for c in range(10)])
    return split.images[rows][..., 0], split.labels[rows]


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def add(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


def write_tar(path: Path, images: np.ndarray, labels: np.ndarray, first: int = 0, label_suffix: str = "cls") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            key = f"sample{first + i:06d}"
            add(archive, f"{key}.png", png(image))
            add(archive, f"{key}.txt", b"a member no sample reader needs")
            text = str(int(label)) if label_suffix == "cls" else json.dumps({"label": int(label)})
            add(archive, f"{key}.{label_suffix}", text.encode())


def write_sources(root: Path, train: int = 60, test: int = 20, per_shard: int = 25) -> dict[str, Path]:
    """The same train/test images as an .npz, an image folder and WebDataset shards (in one order)."""
    parts = {"train": digits_images(train), "test": digits_images(test, offset=train // 10)}
    for split, (images, labels) in parts.items():
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            path = root / "folder" / split / str(label) / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png(image))
    # an image folder lists class folders in sorted order ('0' .. '9'), files sorted within each: the
    # images are class-sorted already, so the listing order is this order, which the others keep
    np.savez(root / "digits.npz", x=parts["train"][0], y=parts["train"][1], x_test=parts["test"][0],
             y_test=parts["test"][1], class_names=np.array(CLASSES))
    for split, (images, labels) in parts.items():
        for shard, start in enumerate(range(0, len(images), per_shard)):
            write_tar(root / "wds" / split / f"{split}-{shard:03d}.tar", images[start: start + per_shard],
                      labels[start: start + per_shard], first=start)
    return {"npz": root / "digits.npz", "imagefolder": root / "folder", "webdataset": root / "wds"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    return write_sources(tmp_path_factory.mktemp("sources"))


def source_config(kind: str, path: Path | str, **extra) -> dict:
    config = {"kind": kind, "path": str(path), **extra}
    if kind == "webdataset":
        config.setdefault("class_names", CLASSES)
    return config


def everything(source) -> np.ndarray:
    return source.read(np.arange(len(source)))


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    """Each test indexes for itself: its own index cache, and no source kept from another test."""
    monkeypatch.setenv("ADVPIPE_CACHE_DIR", str(tmp_path / "cache"))
    load_source.cache_clear()
    yield
    load_source.cache_clear()


# --------------------------------------------------------------------------- same bytes


@pytest.mark.parametrize("kind", sorted(LAZY_READERS))
def test_lazy_sources_read_the_same_images_as_loading_whole(sources, kind) -> None:
    for split in ("train", "test"):
        whole = load_source(SourceConfig(**source_config("npz", sources["npz"])), split)
        lazy = load_source(SourceConfig(**source_config(kind, sources[kind])), split)
        assert isinstance(lazy, LazySource) and lazy.fingerprint_scheme == CHUNKED_SCHEME
        assert lazy.class_names == whole.class_names and lazy.image_shape == whole.image_shape == (16, 16, 1)
        assert np.array_equal(lazy.labels, whole.labels)
        assert np.array_equal(everything(lazy), whole.images)
        picked = np.array([5, 0, 5, len(lazy) - 1])
        assert np.array_equal(lazy.read(picked), whole.images[picked])  # any order, repeats allowed
    # the pool split, the limit and the per-image steps (channels, resize) give the same bytes too
    steps = {"image_size": 12, "channels": 3, "limit": 9, "test_fraction": 0.3}
    pooled = {"npz": sources["npz"], kind: sources[kind] / "train"}
    npz = dict(np.load(sources["npz"]))
    pool_npz = pooled["npz"].parent / "pool.npz"
    np.savez(pool_npz, x=npz["x"], y=npz["y"], class_names=npz["class_names"])
    for split in ("train", "test"):
        whole = load_source(SourceConfig(**source_config("npz", pool_npz, **steps)), split)
        lazy = load_source(SourceConfig(**source_config(kind, pooled[kind], **steps)), split)
        assert np.array_equal(everything(lazy), whole.images) and np.array_equal(lazy.labels, whole.labels)


def test_the_same_store_bytes_from_a_lazy_source_as_from_loading_whole(tmp_path, sources, digits_model) -> None:
    """Generation reads each shard's images from the lazy source (and style images by index): the stores match."""
    variants = {"gaussian": {"sigma": 0.1}, "fgsm": {"eps": 0.1}, "style": {"steps": 1}}
    sums = {}
    for kind in ("npz", "imagefolder", "webdataset"):
        raw = digits_config(tmp_path / kind, checkpoint=digits_model, variants=variants, shard_size=16)
        raw["source"] = source_config(kind, sources[kind])
        manifest = generate(config_from_dict(raw), progress=False).manifest
        sums[kind] = shard_file_sums(tmp_path / kind / "store")
        assert manifest.source["fingerprint_scheme"] == ("whole-v1" if kind == "npz" else CHUNKED_SCHEME)
    assert sums["imagefolder"] == sums["npz"] == sums["webdataset"]
    assert len(sums["npz"]) == 4 + 2  # 60 train images in shards of 16, 20 test


def test_index_is_computed_on_dask_workers_and_reused_without_reading_again(tmp_path, sources) -> None:
    config = SourceConfig(**source_config("webdataset", sources["webdataset"]))
    from advpipe.config import GenerationConfig

    with dask_client(GenerationConfig(threads_per_worker=1), "local:2") as client:
        ran_on = []

        def runner(function, items, what):
            ran_on.append(what)
            return dask_runner(client, progress=False)(function, items, what)

        on_workers = load_source(config, "train", runner)
    assert ran_on and list(index_cache_dir().glob("*.npz"))
    load_source.cache_clear()

    def refuse(function, items, what):
        raise AssertionError(f"indexed again: {what}")

    again = load_source(config, "train", refuse)  # the listing is unchanged: the recorded index is reused
    assert again.fingerprint == on_workers.fingerprint
    assert np.array_equal(everything(again), everything(on_workers))


# --------------------------------------------------------------------------- memory


def test_worker_memory_does_not_grow_with_the_split(tmp_path, digits_model, monkeypatch) -> None:
    """The peak Python/numpy allocation of a shard task is the same for a split 8 times larger."""
    import advpipe.pipeline.job as job

    peaks = {}
    original = job.run_shard
    for count in (64, 512):
        root = tmp_path / str(count)
        images, labels = digits_images(count)
        for start in range(0, len(images), 64):
            write_tar(root / "wds" / f"train-{start // 64:03d}.tar", images[start: start + 64],
                      labels[start: start + 64], first=start)
        raw = digits_config(root, checkpoint=digits_model, variants={"gaussian": {"sigma": 0.1}}, shard_size=32,
                            splits=["train"])
        raw["source"] = {**source_config("webdataset", root / "wds"), "test_path": str(root / "wds")}
        shard_peaks = []

        def measured(task, spec, shard_peaks=shard_peaks):
            tracemalloc.start()
            try:
                return original(task, spec)
            finally:
                shard_peaks.append(tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()

        monkeypatch.setattr(job, "run_shard", measured)
        generate(config_from_dict(raw), progress=False)
        peaks[count] = max(shard_peaks[1:])  # the first task also builds the worker's context
    # 448 more images in the split may cost a few bytes each (labels); reading the split whole costs the
    # 256 bytes of every decoded image and more (measured: 316 bytes per image when the worker did so)
    assert peaks[512] - peaks[64] < 448 * 150, peaks


# --------------------------------------------------------------------------- changed and bad sources


def test_a_source_changed_after_indexing_is_caught_where_it_is_read(tmp_path, sources) -> None:
    folder = tmp_path / "folder"
    shutil.copytree(sources["imagefolder"], folder)
    source = load_source(SourceConfig(**source_config("imagefolder", folder)), "train")
    victim = folder / "train" / "3" / sorted(os.listdir(folder / "train" / "3"))[0]
    victim.write_bytes(same_size_other_image(victim.read_bytes()))
    row = int(np.flatnonzero(source.labels == 3)[0])
    assert source.read([0]).shape == (1, 16, 16, 1)  # other images still read
    with pytest.raises(SourceChangedError, match=f"{victim.name}.*changed since the source was indexed"):
        source.read([row])
    shards = tmp_path / "wds"
    shutil.copytree(sources["webdataset"], shards)
    tar_source = load_source(SourceConfig(**source_config("webdataset", shards)), "test")
    first = shards / "test" / "test-000.tar"
    data = bytearray(first.read_bytes())
    start, length = int(tar_source.index.offset[1]), int(tar_source.index.length[1])
    data[start: start + length] = same_size_other_image(bytes(data[start: start + length]))  # the 2nd image
    first.write_bytes(bytes(data))
    tar_source.read([0])
    with pytest.raises(SourceChangedError, match="test-000.tar, member sample000001.png"):
        tar_source.read([1])


def same_size_other_image(original: bytes) -> bytes:
    """A valid PNG of another image, padded after its end to the original's length: it decodes fine, and
    a listing (names, sizes, times) cannot tell; only the bytes' digest can."""
    other = png(np.zeros((16, 16), np.uint8))
    assert len(other) < len(original)
    return other + bytes(len(original) - len(other))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "advpipe.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_generate_from_a_changed_shard_exits_3_and_writes_nothing_from_it(tmp_path, sources, digits_model) -> None:
    """The listing (names, sizes, times) says nothing changed, so the recorded index is reused; the bytes did."""
    shards = tmp_path / "wds"
    shutil.copytree(sources["webdataset"], shards)
    raw = digits_config(tmp_path, checkpoint=digits_model, variants={"gaussian": {"sigma": 0.1}}, shard_size=25)
    raw["source"] = source_config("webdataset", shards)
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(raw))
    load_source(config_from_dict(raw).source, "train")  # indexed and recorded, as by an earlier run
    victim = shards / "train" / "train-001.tar"  # the second store shard's images
    index = load_source(config_from_dict(raw).source, "train").index
    row = 30  # in store shard 1 (images 25..49)
    stat = victim.stat()
    data = bytearray(victim.read_bytes())
    start, length = int(index.offset[row]), int(index.length[row])
    data[start: start + length] = same_size_other_image(bytes(data[start: start + length]))
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    result = run_cli("generate", str(config), cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "train-001.tar, member sample000030.png" in message and "changed" in message, result.stderr
    manifest = tmp_path / "store" / "manifest.json"
    assert not manifest.exists()
    written = {p.name for p in (tmp_path / "store").rglob("train-*")}
    assert "train-00000.h5" in written and "train-00001.h5" not in written  # nothing from the changed bytes


@pytest.mark.parametrize("case", ["not-an-image", "no-label", "bad-label", "label-out-of-range", "no-image",
                                  "truncated"])
def test_bad_webdataset_shards_name_the_shard_and_member(tmp_path, case) -> None:
    images, labels = (part[:6] for part in digits_images(10))
    shard = tmp_path / "wds" / "train-000.tar"
    shard.parent.mkdir(parents=True)
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as archive:
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            key = f"s{i}"
            payload = png(image)
            if i == 3 and case == "not-an-image":
                payload = b"this is no png"
            if i == 3 and case == "truncated":
                payload = payload[: len(payload) // 2]
            if not (i == 3 and case == "no-image"):
                add(archive, f"{key}.png", payload)
            text = {"bad-label": "three", "label-out-of-range": "12"}.get(case, str(label)) if i == 3 else str(label)
            if not (i == 3 and case in ("no-label", "no-image")):
                add(archive, f"{key}.cls", text.encode())
            if i == 3 and case == "no-image":
                add(archive, f"{key}.txt", b"x")
    config = SourceConfig(kind="webdataset", path=str(shard), test_path=str(shard), class_names=CLASSES)
    expected = {"not-an-image": (DataError, "train-000.tar, member s3.png: cannot read the image"),
                "no-label": (DataError, r"train-000.tar, sample s3: no .cls member"),
                "bad-label": (DataError, "sample s3: label 'three' is not a non-negative integer"),
                "label-out-of-range": (DataError, r"member s3.png: label 12 is outside \[0, 10\)"),
                "no-image": (DataError, "sample s3: no image member"),
                "truncated": (SourceChangedError, "train-000.tar, member s3.png: cannot read the image")}[case]
    with pytest.raises(expected[0], match=expected[1]) as info:
        source = load_source(config, "train")
        source.read(np.arange(len(source)))  # a truncated image is found when it is decoded
    assert info.value.exit_code == (3 if case == "truncated" else 2)
    assert len(str(info.value).splitlines()) == 1


def test_unreachable_and_unlistable_locations_are_data_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="no .tar shards here"):
        load_source(SourceConfig(kind="webdataset", path=str(tmp_path)), "train")
    with pytest.raises(DataError, match="cannot reach this shard"):
        load_source(SourceConfig(kind="webdataset", path=str(tmp_path / "gone-{0..1}.tar")), "train")
    with pytest.raises(DataError, match="cannot be listed"):
        load_source(SourceConfig(kind="webdataset", path="https://127.0.0.1:9/data"), "train")


def test_a_webdataset_source_in_a_bucket_reads_like_the_local_one(s3_bucket, sources) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    remote = f"{s3_bucket}/datasets/digits"
    fs.put(str(sources["webdataset"]) + "/", remote.removeprefix("s3://") + "/", recursive=True)
    pattern = f"{remote}/train/train-{{000..002}}.tar"
    there = load_source(SourceConfig(kind="webdataset", path=pattern, test_path=f"{remote}/test",
                                     class_names=CLASSES), "train")
    here = load_source(SourceConfig(**source_config("webdataset", sources["webdataset"])), "train")
    assert there.index.location == remote + "/train" and len(there) == len(here) == 60
    assert np.array_equal(everything(there), everything(here)) and np.array_equal(there.labels, here.labels)
    assert there.fingerprint == here.fingerprint  # the same shards give the same source wherever they are


# --------------------------------------------------------------------------- one GPU per worker


def test_each_local_worker_sees_one_gpu_of_its_own() -> None:
    """Checked on CPU through each worker's environment: CUDA reads it when a process first touches a GPU."""
    from advpipe.config import GenerationConfig

    with dask_client(GenerationConfig(threads_per_worker=1), "local:2", gpus=["3", "5"]) as client:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
    assert sorted(seen.values()) == ["3", "5"]
    assert pinned_workers("local", ["0", "1", "2"]) == ["0", "1", "2"]
    with pytest.raises(Exception, match="asks for 4 workers but this machine has 2 GPU"):
        pinned_workers("local:4", ["0", "1"])


def test_gpu_ids_follow_the_visible_devices(monkeypatch) -> None:
    import advpipe.pipeline.cluster as cluster

    monkeypatch.setattr(cluster, "_cuda_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert gpu_ids("cuda") == ["4", "6"]
    assert gpu_ids("cuda:1") is None and gpu_ids("cpu") is None  # an explicit GPU, or none, pins nothing
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_ids("cuda") == ["0", "1"]
    monkeypatch.setattr(cluster, "_cuda_count", lambda: 0)
    assert gpu_ids("cuda") is None


def test_slurm_jobs_with_several_gpus_give_each_process_one(monkeypatch) -> None:
    from types import SimpleNamespace

    from advpipe.config import SlurmConfig
    from advpipe.pipeline.cluster import OneGpuPerProcess, slurm_cluster

    script = slurm_cluster(SlurmConfig(cores=8, processes=4, gpus_per_job=4)).job_script()
    assert "#SBATCH --gres=gpu:4" in script and "--nworkers 4" in script
    for name, expected in (("SLURMCluster-0-2", "6"), ("SLURMCluster-3-0", "4")):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # what SLURM gives the job
        OneGpuPerProcess().setup(SimpleNamespace(name=name))
        assert os.environ["CUDA_VISIBLE_DEVICES"] == expected
    with pytest.raises(ValueError, match="must not exceed gpus_per_job"):
        SlurmConfig(cores=8, processes=8, gpus_per_job=4)


def test_train_source_reads_a_lazy_source_through_dataloader_workers(tmp_path, sources) -> None:
    """train-source on an image folder (DataLoader worker processes get the index and decode what they read)
    trains exactly the model the same images loaded whole train."""
    import torch

    from advpipe.trainers.clean import train_source

    weights = {}
    for kind in ("npz", "imagefolder"):
        raw = digits_config(tmp_path / kind, limit=None)
        raw["source"] = source_config(kind, sources[kind])
        raw["train_source"] = {**raw["train_source"], "epochs": 2, "num_workers": 1}
        path, _ = train_source(config_from_dict(raw), progress=False)
        weights[kind] = torch.load(path, weights_only=True)["state_dict"]
    assert weights["npz"].keys() == weights["imagefolder"].keys()
    assert all(torch.equal(weights["npz"][k], weights["imagefolder"][k]) for k in weights["npz"])
