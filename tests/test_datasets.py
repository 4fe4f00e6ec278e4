"""advpipe.datasets: every reader on small files written here, the shared steps, and bad input."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from advpipe.config import SourceConfig
from advpipe.datasets import Source, SourceSplit, fingerprint, load_source
from advpipe.datasets.cifar import LAYOUTS
from advpipe.datasets.idx import CLASS_NAMES, IMAGES_MAGIC, LABELS_MAGIC
from advpipe.datasets.transforms import convert_channels, stratified_split
from advpipe.errors import DataError

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Tests rewrite files under one path, so no test may see another's cached split."""
    load_source.cache_clear()
    yield
    load_source.cache_clear()


def both(config: SourceConfig) -> tuple[SourceSplit, SourceSplit]:
    return load_source(config, "train"), load_source(config, "test")


def pixels(split: Source) -> np.ndarray:
    """Every image of a split, through `read`, the interface every source (whole or lazy) implements."""
    return split.read(np.arange(len(split)))


def assert_well_formed(split: Source) -> None:
    images = pixels(split)
    assert images.dtype == np.uint8 and split.labels.dtype == np.int64
    assert images.ndim == 4 and images.shape[-1] in (1, 3)
    if isinstance(split, SourceSplit):  # held whole: frozen so that no user can change another's copy
        assert split.images.flags.c_contiguous
        assert not split.images.flags.writeable and not split.labels.flags.writeable
    assert len(split) == len(images) == len(split.labels)
    assert split.image_shape == images.shape[1:]
    assert split.num_classes == len(split.class_names)
    assert split.labels.min() >= 0 and split.labels.max() < split.num_classes
    assert len(split.fingerprint) == 64


def rows(split: Source) -> Counter:
    """The multiset of (image bytes, label) pairs, to compare splits regardless of order."""
    return Counter((img.tobytes(), int(lab)) for img, lab in zip(pixels(split), split.labels, strict=True))


# --------------------------------------------------------------------------- file writers


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_file(path: Path, data: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)
    return path


def make_idx(directory: Path, gz: bool = True, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Four small IDX files (7x5 images) and the arrays they hold."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, n in (("train", 12), ("test", 6)):
        images = rng.integers(0, 256, (n, 7, 5), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_file(directory / IDX_NAMES[split][0], idx_bytes(images, IMAGES_MAGIC), gz)
        write_file(directory / IDX_NAMES[split][1], idx_bytes(labels, LABELS_MAGIC), gz)
        data[split] = (images, labels)
    return data


def cifar_batch(rng: np.random.Generator, n: int, labels_key: str, classes: int) -> dict:
    return {
        b"batch_label": b"fake batch",
        labels_key.encode(): [int(v) for v in rng.integers(0, classes, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img{i}.png".encode() for i in range(n)],
    }


def make_cifar(root: Path, kind: str = "cifar10", seed: int = 0) -> tuple[Path, dict[str, dict]]:
    """The python-version batch files of a tiny CIFAR under root/<layout folder>/."""
    layout = LAYOUTS[kind]
    classes = 10 if kind == "cifar10" else 100
    rng = np.random.default_rng(seed)
    folder = root / layout.folder
    folder.mkdir(parents=True)
    batches = {name: cifar_batch(rng, 3, layout.labels_key, classes) for name in layout.members()[:-1]}
    meta = {layout.names_key.encode(): [f"class{i}".encode() for i in range(classes)]}
    for name, content in {**batches, layout.meta: meta}.items():
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
    return folder, batches


def make_tar(archive: Path, folder: Path, extra: list[tarfile.TarInfo] | None = None) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return archive


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_folder(root: Path, size: tuple[int, int] = (6, 6), per_class: int = 5, gray: bool = False) -> None:
    rng = np.random.default_rng(0)
    shape = size if gray else (*size, 3)
    for name in ("dog", "cat"):  # written out of order: labels must follow sorted names
        for i in range(per_class):
            write_png(root / name / f"{i}.png", rng.integers(0, 256, shape, dtype=np.uint8))


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


# --------------------------------------------------------------------------- digits and shared steps


def test_digits_default_is_a_deterministic_partition_of_all_1797_images():
    from sklearn.datasets import load_digits

    train, test = both(SourceConfig())
    for split in (train, test):
        assert_well_formed(split)
        assert split.image_shape == (8, 8, 1)
        assert split.class_names == tuple("0123456789")
    assert len(train) + len(test) == 1797
    assert len(test) == pytest.approx(0.2 * 1797, abs=10)
    bunch = load_digits()
    everything = Counter(
        (np.rint(img * 255 / 16).astype(np.uint8)[..., None].tobytes(), int(lab))
        for img, lab in zip(bunch.images, bunch.target, strict=True)
    )
    assert rows(train) + rows(test) == everything  # covering and, by the count, disjoint
    assert train.images.max() == 255 and train.images.min() == 0

    load_source.cache_clear()
    again = load_source(SourceConfig(), "train")
    assert again is not train and again.fingerprint == train.fingerprint
    assert np.array_equal(again.images, train.images)
    reseeded = load_source(SourceConfig(split_seed=1), "train")
    assert reseeded.fingerprint != train.fingerprint
    assert train.fingerprint != test.fingerprint


def test_stratified_split_partitions_every_class():
    labels = np.repeat(np.arange(4), [10, 5, 20, 1])
    train, test = stratified_split(labels, 0.2, seed=3)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[test], minlength=4).tolist() == [2, 1, 4, 0]
    again = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert not np.array_equal(test, stratified_split(labels, 0.2, seed=4)[1])


def test_load_source_is_cached_and_checks_the_split_name():
    config = SourceConfig(limit=10)
    assert load_source(config, "train") is load_source(SourceConfig(limit=10), "train")
    with pytest.raises(DataError, match="unknown split 'val'"):
        load_source(config, "val")


def test_channels_image_size_and_limit():
    base_train = load_source(SourceConfig(), "train")
    limited = load_source(SourceConfig(limit=7), "train")
    assert len(limited) == 7
    assert np.array_equal(limited.images, base_train.images[:7])
    assert np.array_equal(limited.labels, base_train.labels[:7])

    rgb = load_source(SourceConfig(channels=3, limit=7), "train")
    assert rgb.image_shape == (8, 8, 3)
    assert np.array_equal(rgb.images, np.repeat(limited.images, 3, axis=-1))

    big = load_source(SourceConfig(image_size=16, channels=3, limit=7), "train")
    assert big.image_shape == (16, 16, 3) and big.images.dtype == np.uint8
    load_source.cache_clear()
    assert load_source(SourceConfig(image_size=16, channels=3, limit=7), "train").fingerprint == big.fingerprint
    assert len({limited.fingerprint, rgb.fingerprint, big.fingerprint}) == 3


def test_luminance_is_rounded_itu_601():
    pixels = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [37, 37, 37]], np.uint8)
    gray = convert_channels(pixels.reshape(1, 1, 5, 3), 1)
    assert gray.shape == (1, 1, 5, 1) and gray.dtype == np.uint8
    assert gray.ravel().tolist() == [76, 150, 29, 255, 37]


def test_source_split_create_and_fingerprint():
    images = np.zeros((2, 3, 3, 1), np.uint8)
    split = SourceSplit.create("npz", "train", images, np.array([0, 1]), ["a", "b"])
    assert_well_formed(split)
    assert split.fingerprint == fingerprint("npz", "train", images, np.array([0, 1]), ("a", "b"))
    images[0, 0, 0, 0] = 1  # the split holds its own copy
    assert split.images.sum() == 0
    assert split.fingerprint != fingerprint("npz", "train", images, np.array([0, 1]), ("a", "b"))
    assert split.fingerprint != fingerprint("npz", "test", split.images, split.labels, ("a", "b"))
    assert split.fingerprint != fingerprint("npz", "train", split.images, split.labels, ("a", "c"))
    with pytest.raises(DataError, match="outside"):
        SourceSplit.create("npz", "train", images, np.array([0, 2]), ["a", "b"])


def test_missing_path_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        load_source(SourceConfig(kind="npz", path=tmp_path / "nowhere.npz"), "train")
    with pytest.raises(DataError, match="not a directory"):
        load_source(SourceConfig(kind="mnist", path=write_npz(tmp_path / "a.npz", x=np.zeros(1))), "train")


# --------------------------------------------------------------------------- MNIST / Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_reads_idx_files(tmp_path, gz):
    data = make_idx(tmp_path, gz=gz)
    train, test = both(SourceConfig(kind="mnist", path=tmp_path))
    for split, name in ((train, "train"), (test, "test")):
        assert_well_formed(split)
        images, labels = data[name]
        assert np.array_equal(split.images, images[..., None])
        assert split.labels.tolist() == labels.tolist()
        assert split.class_names == tuple("0123456789")
    fashion = load_source(SourceConfig(kind="fashion_mnist", path=tmp_path), "train")
    assert fashion.class_names == CLASS_NAMES["fashion_mnist"]
    assert fashion.class_names[0] == "T-shirt/top" and fashion.class_names[-1] == "Ankle boot"
    assert fashion.fingerprint != train.fingerprint  # kind and class names are part of it


def test_mnist_fingerprint_follows_the_data(tmp_path):
    make_idx(tmp_path / "a", seed=0)
    make_idx(tmp_path / "b", seed=0, gz=False)
    make_idx(tmp_path / "c", seed=1)
    prints = [load_source(SourceConfig(kind="mnist", path=tmp_path / d), "train").fingerprint for d in "abc"]
    assert prints[0] == prints[1] != prints[2]


def corrupt_magic(directory: Path) -> Path:
    path = directory / IDX_NAMES["train"][0]
    path.write_bytes(idx_bytes(np.zeros((2, 3, 3), np.uint8), LABELS_MAGIC))
    return path


def corrupt_truncate(directory: Path) -> Path:
    path = directory / IDX_NAMES["test"][0]
    path.write_bytes(idx_bytes(np.zeros((6, 7, 5), np.uint8), IMAGES_MAGIC)[:-3])
    return path


def corrupt_count(directory: Path) -> Path:
    path = directory / IDX_NAMES["train"][1]
    path.write_bytes(idx_bytes(np.zeros(11, np.uint8), LABELS_MAGIC))
    return path


def corrupt_label(directory: Path) -> Path:
    path = directory / IDX_NAMES["train"][1]
    path.write_bytes(idx_bytes(np.full(12, 10, np.uint8), LABELS_MAGIC))
    return path


def corrupt_missing(directory: Path) -> Path:
    path = directory / IDX_NAMES["test"][1]
    path.unlink()
    return path


def corrupt_gzip(directory: Path) -> Path:
    path = directory / IDX_NAMES["train"][0]
    path.write_bytes(b"\x1f\x8b not really gzip")
    return path


@pytest.mark.parametrize(
    ("corrupt", "problem"),
    [
        (corrupt_magic, "magic is 0x00000801"),
        (corrupt_truncate, "truncated"),
        (corrupt_count, "12 images but .* 11 labels"),
        (corrupt_label, r"label 10 .* outside \[0, 10\)"),
        (corrupt_missing, "not found"),
        (corrupt_gzip, "gzipped"),
    ],
)
def test_bad_idx_files_name_the_file(tmp_path, corrupt, problem):
    make_idx(tmp_path, gz=False)
    bad = corrupt(tmp_path)
    with pytest.raises(DataError, match=problem) as info:
        both(SourceConfig(kind="mnist", path=tmp_path))
    assert str(bad) in str(info.value)


# --------------------------------------------------------------------------- CIFAR


def expected_cifar(batches: dict[str, dict], names: tuple[str, ...], key: str) -> tuple:
    data = np.concatenate([batches[n][b"data"] for n in names])
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, [label for n in names for label in batches[n][key.encode()]]


def test_cifar10_from_folder_and_from_tar_gz(tmp_path):
    layout = LAYOUTS["cifar10"]
    folder, batches = make_cifar(tmp_path / "extracted")
    archive = make_tar(tmp_path / "cifar-10-python.tar.gz", folder)
    from_parent, from_folder, from_tar = (
        both(SourceConfig(kind="cifar10", path=path)) for path in (tmp_path / "extracted", folder, archive)
    )
    train, test = from_parent
    for split, members in ((train, layout.train), (test, layout.test)):
        assert_well_formed(split)
        images, labels = expected_cifar(batches, members, "labels")
        assert np.array_equal(split.images, images)
        assert split.labels.tolist() == labels
        assert split.class_names == tuple(f"class{i}" for i in range(10))
    assert len(train) == 15 and train.image_shape == (32, 32, 3)
    # channel-first rows: pixel (y, x) of channel c sits at c * 1024 + y * 32 + x
    assert train.images[0, 2, 5, 1] == batches["data_batch_1"][b"data"][0, 1024 + 2 * 32 + 5]
    for other in (from_folder, from_tar):
        assert [s.fingerprint for s in other] == [train.fingerprint, test.fingerprint]


def test_cifar100_uses_fine_labels(tmp_path):
    folder, batches = make_cifar(tmp_path, kind="cifar100")
    archive = make_tar(tmp_path / "cifar-100-python.tar.gz", folder)
    train = load_source(SourceConfig(kind="cifar100", path=archive), "train")
    assert_well_formed(train)
    assert train.num_classes == 100 and train.class_names[99] == "class99"
    assert train.labels.tolist() == batches["train"][b"fine_labels"]


class Reduce:
    """Pickles to `function(*args)`: what a tampered batch file would make plain pickle call."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def numpy_load_payload(tmp_path: Path, command: str) -> bytes:
    """numpy.load(an .npy of object dtype, allow_pickle=True): the .npy's own pickle runs `command`."""
    npy = tmp_path / "evil.npy"
    np.save(npy, np.array([Reduce(os.system, command)], dtype=object), allow_pickle=True)
    return pickle.dumps({b"data": Reduce(np.load, str(npy), None, True), b"labels": [0]}, protocol=2)


def getattr_chain_payload(command: str) -> bytes:
    """getattr(__import__('os'), 'system')(command), written as opcodes (no class pickles to this)."""
    return (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V" + command.encode()
            + b"\ntR.")


PAYLOADS = {
    "os.system": (r"(posix|os|nt)\.system", lambda tmp, cmd: pickle.dumps({b"data": Reduce(os.system, cmd)})),
    "subprocess": (r"subprocess\.check_call",
                   lambda tmp, cmd: pickle.dumps({b"data": Reduce(subprocess.check_call, cmd.split())})),
    "eval": (r"builtins\.eval",
             lambda tmp, cmd: pickle.dumps({b"data": Reduce(eval, f"__import__('os').system({cmd!r})")})),
    "getattr-chain": (r"builtins\.getattr", lambda tmp, cmd: getattr_chain_payload(cmd)),
    "numpy.load": (r"numpy\.load", numpy_load_payload),
}


def test_cifar_unpickler_allows_exactly_the_array_rebuilders():
    """numpy arrays, dtypes and protocol-2 bytes need these five globals; any other name is refused."""
    from advpipe.datasets.safe_pickle import ALLOWED, _latin1_encode

    reconstruct = np.array([1]).__reduce__()[0]
    assert {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    } == ALLOWED


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_cifar_refuses_a_malicious_pickle_without_running_it(tmp_path, payload):
    refused, build = PAYLOADS[payload]
    live = tmp_path / "plain-pickle-ran-it"
    pickle.loads(build(tmp_path, f"touch {live}"))  # the payload is real: plain pickle runs the command
    assert live.exists()
    folder, _ = make_cifar(tmp_path / "cifar")
    marker = tmp_path / "pwned"
    (folder / "data_batch_3").write_bytes(build(tmp_path, f"touch {marker}"))
    for path in (folder, make_tar(tmp_path / "evil.tar.gz", folder)):
        load_source.cache_clear()
        with pytest.raises(DataError, match=f"refusing to unpickle global '{refused}'") as info:
            load_source(SourceConfig(kind="cifar10", path=path), "train")
        assert "data_batch_3" in str(info.value)
    assert not marker.exists()


def unsafe_member(kind: str) -> tarfile.TarInfo:
    if kind == "link":
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_9")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        return info
    info = tarfile.TarInfo("../escape" if kind == "dotdot" else "/abs/escape")
    info.size = 3
    return info


@pytest.mark.parametrize(("kind", "problem"), [("link", "is a link"), ("dotdot", "'..'"), ("abs", "absolute")])
def test_cifar_refuses_unsafe_tar_members(tmp_path, kind, problem):
    folder, _ = make_cifar(tmp_path)
    archive = make_tar(tmp_path / "bad.tar.gz", folder, [unsafe_member(kind)])
    with pytest.raises(DataError, match=problem) as info:
        load_source(SourceConfig(kind="cifar10", path=archive), "train")
    assert str(archive) in str(info.value)


def test_cifar_bad_files_name_the_file(tmp_path):
    folder, _ = make_cifar(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8)}, protocol=2))
    with pytest.raises(DataError, match=r"\(N, 3072\)") as info:
        load_source(SourceConfig(kind="cifar10", path=folder), "test")
    assert str(folder / "test_batch") in str(info.value)

    (folder / "test_batch").write_bytes(b"\x80\x02 garbage")
    with pytest.raises(DataError, match="not a readable pickle"):
        load_source(SourceConfig(kind="cifar10", path=folder), "test")

    (folder / "batches.meta").unlink()
    with pytest.raises(DataError, match="batches.meta"):
        load_source(SourceConfig(kind="cifar10", path=folder), "test")
    archive = make_tar(tmp_path / "partial.tar.gz", folder)
    with pytest.raises(DataError, match=f"{archive}.*batches.meta"):
        load_source(SourceConfig(kind="cifar10", path=archive), "test")
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(DataError, match="junk.tar.gz"):
        load_source(SourceConfig(kind="cifar10", path=tmp_path / "junk.tar.gz"), "test")


# --------------------------------------------------------------------------- image folders


def test_imagefolder_pool_is_split_by_sorted_class(tmp_path):
    make_folder(tmp_path)
    train, test = both(SourceConfig(kind="imagefolder", path=tmp_path, test_fraction=0.4))
    for split in (train, test):
        assert_well_formed(split)
        assert split.class_names == ("cat", "dog") and split.image_shape == (6, 6, 3)
    assert np.bincount(test.labels).tolist() == [2, 2] and len(train) == 6
    cat0 = np.asarray(Image.open(tmp_path / "cat" / "0.png"))
    found = rows(train) + rows(test)
    assert found[(cat0.tobytes(), 0)] == 1


def test_imagefolder_train_test_subfolders_gray_and_resize(tmp_path):
    make_folder(tmp_path / "train", gray=True)
    make_folder(tmp_path / "test", gray=True, per_class=2)
    train, test = both(SourceConfig(kind="imagefolder", path=tmp_path))
    assert (len(train), len(test)) == (10, 4)
    assert train.image_shape == (6, 6, 1)
    assert test.labels.tolist() == [0, 0, 1, 1]
    resized = load_source(SourceConfig(kind="imagefolder", path=tmp_path, image_size=4, channels=3), "test")
    assert resized.image_shape == (4, 4, 3)


def test_imagefolder_mixed_sizes(tmp_path):
    make_folder(tmp_path)
    odd = tmp_path / "dog" / "odd.png"
    write_png(odd, np.zeros((9, 6, 3), np.uint8))
    with pytest.raises(DataError, match="9x6 .* 6x6.*image_size") as info:
        load_source(SourceConfig(kind="imagefolder", path=tmp_path), "train")
    assert str(odd) in str(info.value)
    fixed = load_source(SourceConfig(kind="imagefolder", path=tmp_path, image_size=5), "train")
    assert fixed.image_shape == (5, 5, 3)


def test_imagefolder_mixed_modes_become_rgb(tmp_path):
    make_folder(tmp_path)
    write_png(tmp_path / "cat" / "gray.png", np.full((6, 6), 7, np.uint8))
    Image.new("RGBA", (6, 6), (1, 2, 3, 4)).save(tmp_path / "dog" / "alpha.png")
    train, test = both(SourceConfig(kind="imagefolder", path=tmp_path))
    assert train.image_shape == (6, 6, 3)
    found = rows(train) + rows(test)
    assert found[(np.full((6, 6, 3), 7, np.uint8).tobytes(), 0)] == 1
    assert found[(np.tile(np.array([1, 2, 3], np.uint8), (6, 6, 1)).tobytes(), 1)] == 1


def test_imagefolder_bad_input(tmp_path):
    with pytest.raises(DataError, match="no class folders"):
        load_source(SourceConfig(kind="imagefolder", path=tmp_path), "train")
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError, match="no .png"):
        load_source(SourceConfig(kind="imagefolder", path=tmp_path), "train")
    make_folder(tmp_path)
    broken = tmp_path / "cat" / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read the image") as info:
        load_source(SourceConfig(kind="imagefolder", path=tmp_path), "train")
    assert str(broken) in str(info.value)

    make_folder(tmp_path / "split" / "train")
    make_folder(tmp_path / "split" / "test")
    write_png(tmp_path / "split" / "test" / "cow" / "0.png", np.zeros((6, 6, 3), np.uint8))
    with pytest.raises(DataError, match="'cow' is not among"):
        load_source(SourceConfig(kind="imagefolder", path=tmp_path / "split"), "test")


# --------------------------------------------------------------------------- npz


def test_npz_pool_uint8_3d(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 5, 5), dtype=np.uint8)
    y = np.arange(20) % 3
    path = write_npz(tmp_path / "d.npz", x=x, y=y)
    train, test = both(SourceConfig(kind="npz", path=path, test_fraction=0.25))
    assert train.class_names == ("0", "1", "2") and train.image_shape == (5, 5, 1)
    assert (len(train), len(test)) == (14, 6)  # classes of 7, 7, 6 each give round(n / 4) = 2
    whole = Counter((img[..., None].tobytes(), int(lab)) for img, lab in zip(x, y, strict=True))
    assert rows(train) + rows(test) == whole

    load_source.cache_clear()
    assert load_source(SourceConfig(kind="npz", path=path, test_fraction=0.25), "test").fingerprint == (
        test.fingerprint
    )
    other = write_npz(tmp_path / "e.npz", x=x[::-1], y=y)
    assert load_source(SourceConfig(kind="npz", path=other, test_fraction=0.25), "test").fingerprint != (
        test.fingerprint
    )


def test_npz_float_predefined_split_and_class_names(tmp_path):
    x = np.linspace(0, 1, 4 * 2 * 2 * 3).reshape(4, 2, 2, 3).astype(np.float32)
    path = write_npz(
        tmp_path / "f.npz",
        x=x,
        y=np.array([[0], [1], [1], [0]]),
        x_test=x[:2],
        y_test=np.array([1, 0]),
        class_names=np.array(["neg", "pos"]),
    )
    train, test = both(SourceConfig(kind="npz", path=path))
    assert train.class_names == ("neg", "pos") and train.image_shape == (2, 2, 3)
    assert np.array_equal(train.images, np.rint(x.astype(np.float64) * 255).astype(np.uint8))
    assert train.labels.tolist() == [0, 1, 1, 0] and test.labels.tolist() == [1, 0]
    assert train.images.max() == 255 and train.images.min() == 0


X = np.zeros((4, 3, 3), np.uint8)
Y = np.array([0, 1, 0, 1])


@pytest.mark.parametrize(
    ("arrays", "problem"),
    [
        ({"x": np.full((4, 3, 3), np.nan), "y": Y}, "NaN"),
        ({"x": np.full((4, 3, 3), 2.0), "y": Y}, r"must lie in \[0, 1\]"),
        ({"x": X.astype(np.int32), "y": Y}, "dtype int32"),
        ({"x": np.zeros((4, 3), np.uint8), "y": Y}, "has shape"),
        ({"x": np.zeros((4, 3, 3, 3, 3), np.uint8), "y": Y}, "has shape"),
        ({"x": X, "y": Y[:3]}, "4 images but 3 labels"),
        ({"x": X, "y": Y.astype(float)}, "integer class indices"),
        ({"x": X, "y": np.array([0, 1, 0, -1])}, r"label -1 .* outside"),
        ({"x": X, "y": Y, "class_names": np.array(["only"])}, r"label 1 .* outside \[0, 1\)"),
        ({"x": X, "y": Y, "x_tset": X}, r"unexpected \['x_tset'\]"),
        ({"x": X}, r"missing \['y'\]"),
        ({"x": X, "y": Y, "x_test": X}, "must be given together"),
        ({"x": X[:0], "y": Y[:0]}, "no images"),
    ],
)
def test_bad_npz_names_the_file(tmp_path, arrays, problem):
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=problem) as info:
        load_source(SourceConfig(kind="npz", path=path), "train")
    assert str(path) in str(info.value)


def test_npz_refuses_object_arrays_and_non_npz(tmp_path):
    path = write_npz(tmp_path / "obj.npz", x=np.array([None, 1], dtype=object), y=Y)
    with pytest.raises(DataError, match="obj.npz"):
        load_source(SourceConfig(kind="npz", path=path), "train")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(DataError, match="text.npz: cannot load"):
        load_source(SourceConfig(kind="npz", path=tmp_path / "text.npz"), "train")
