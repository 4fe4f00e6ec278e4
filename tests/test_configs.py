"""The shipped configs: every one loads, and the paper-scale ones run what docs/REPRODUCING.md says.

The paper configs cannot run here (no CIFAR-10 or MNIST, no GPU); these tests check everything that
can go wrong before a user spends GPU hours: every key and method parameter is valid, each entry's
architecture builds for its dataset and fits its method, entries that load another entry's model name
one that trains before them, the detector config reproduces the paper's 45k/5k split and Table 1, and
the summary table of docs/REPRODUCING.md agrees with the files.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from advpipe.config import Config, load_config
from advpipe.datasets import load_source
from advpipe.models import build_model
from advpipe.trainers.registry import method_name, validate_method
from advpipe.trainers.weight_map import check_arch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
REPRODUCING = ROOT / "docs" / "REPRODUCING.md"
PAPER_CONFIGS = ("cifar10_detector", "mnist_bang", "cifar10_bang", "mnist_perturbation_bias", "cifar10_weight_map",
                 "cifar10_calibrater")
INPUT_SHAPES = {"cifar10": (3, 32, 32), "mnist": (1, 28, 28)}

#: what each paper config must train: data kind and path, the architectures its entries train, the methods
EXPECTED = {
    "cifar10_detector": ("cifar10", "data/cifar-10-batches-py", {"cifar_resnet34"},
                         {"clean", "adversarial", "detector"}),
    "mnist_bang": ("mnist", "data/mnist", {"caffe_lenet"}, {"clean", "bang"}),
    "cifar10_bang": ("cifar10", "data/cifar-10-batches-py", {"caffe_quick"}, {"clean", "bang"}),
    "mnist_perturbation_bias": ("mnist", "data/mnist", {"lenet"}, {"clean", "perturbation_bias", "adversarial"}),
    "cifar10_weight_map": ("cifar10", "data/cifar-10-batches-py",
                           {f"wm_{s}_{r}" for s in ("resnet", "densenet") for r in ("conv", "smoothing_alt",
                                                                                   "unsharp_alt")},
                           {"clean", "weight_map"}),
    "cifar10_calibrater": ("cifar10", "data/cifar-10-batches-py",
                           {"cifar_resnet18", "mobilenet_v2_cifar", "vgg16_cifar"}, {"clean", "calibrater"}),
}


def paper_config(name: str) -> Config:
    return load_config(ROOT / "configs" / f"{name}.yaml")


def entry_archs(config: Config) -> dict[str, str]:
    return {name: entry.arch or config.model.arch for name, entry in config.methods.items()}


def run_model(config: Config, entry: str) -> Path:
    """Where `advpipe train` writes an entry's model (trainers.run: runs_dir / name / entry)."""
    return config.train.runs_dir / config.name / entry / "model.pt"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_loads_with_every_key_and_parameter_valid(path):
    config = load_config(path)
    assert config.name == path.stem


def test_every_paper_config_is_shipped():
    assert {p.stem for p in CONFIGS} >= set(PAPER_CONFIGS)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_trains_the_papers_data_architectures_and_methods(name):
    config = paper_config(name)
    kind, path, archs, methods = EXPECTED[name]
    assert (config.source.kind, config.source.path) == (kind, Path(path))
    assert set(entry_archs(config).values()) == archs
    assert {method_name(n, e) for n, e in config.methods.items()} == methods
    assert config.source.limit is None and config.source.image_size is None and config.source.channels is None
    assert config.store.path == Path("runs") / name / "store"
    assert config.model.checkpoint.parent == Path("runs") / name


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_every_entry_architecture_builds_for_the_dataset(name):
    config = paper_config(name)
    shape = INPUT_SHAPES[config.source.kind]
    for arch in {config.model.arch, *entry_archs(config).values()}:
        model = build_model(arch, 10, shape)
        assert model.arch == arch


def test_weight_map_entries_train_the_skeleton_their_parameters_name():
    config = paper_config("cifar10_weight_map")
    trained = 0
    for name, entry in config.methods.items():
        if method_name(name, entry) == "weight_map":
            check_arch(validate_method(name, entry), entry.arch)  # raises ConfigError on a mismatch
            trained += 1
    assert trained == 4


def test_detector_config_is_the_papers_table_1_and_ratio():
    config = paper_config("cifar10_detector")
    variants = {name: dict(v.params()) for name, v in config.variants.items()}
    assert variants["gaussian"] == {"sigma": 0.1}
    assert variants["fgsm"] == {"eps": 0.025}
    assert variants["bim"] == {"eps": 0.03, "eps_step": 0.005, "max_iter": 6}
    assert variants["style"]["lr"] == 0.1 and variants["style"]["steps"] == 10
    assert set(variants) == {"gaussian", "fgsm", "bim", "deepfool", "cw", "style"}
    assert variants["cw"]["initial_const"] == 1.0
    assert config.methods["adversarial"].params() == {"ratio": 0.5}
    detector = config.methods["detector"].params()
    assert (detector["ratio"], detector["levels"], detector["layers"]) == (0.5, "full", 2)
    assert (config.train.epochs, config.train.batch_size) == (150, 64)
    assert all(entry.augment for entry in config.methods.values())


def test_entries_that_load_a_model_load_one_trained_before_them():
    """The detector's P and each calibrater's f come from a clean run listed earlier, of the same architecture."""
    checked = 0
    for name in ("cifar10_detector", "cifar10_calibrater"):
        config = paper_config(name)
        order = list(config.methods)
        archs = entry_archs(config)
        for entry_name, entry in config.methods.items():
            if method_name(entry_name, entry) not in ("detector", "calibrater"):
                continue
            source = Path(entry.params()["checkpoint"])
            earlier = {run_model(config, e): e for e in order[:order.index(entry_name)]}
            assert source in earlier, f"{name}: {entry_name} loads {source}, which no earlier entry writes"
            main = config.methods[earlier[source]]
            assert method_name(earlier[source], main) == "clean" and main.augment
            assert archs[earlier[source]] == archs[entry_name]
            if method_name(entry_name, entry) == "calibrater":
                assert set(entry.params()["variants"]) <= set(config.variants)
            checked += 1
    assert checked == 2 + 8  # the detector on the paper's sampler and on the authors' fixed mix; 8 calibraters


# ------------------------------------------------------------------------------ the 45k/5k split


def write_cifar10(folder: Path, per_batch: int = 20) -> None:
    """A CIFAR-10 python-version folder in miniature; every image's first byte is its global index."""
    folder.mkdir(parents=True)
    for number, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = np.zeros((per_batch, 3072), dtype=np.uint8)
        data[:, 0] = number * per_batch + np.arange(per_batch)
        labels = [int(i % 10) for i in range(per_batch)]
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels}))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))


def test_detector_config_holds_its_test_split_out_of_the_training_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)  # 5 x 20 training images (10 per class), 20 test images (ids 100-119)
    path = ROOT / "configs" / "cifar10_detector.yaml"
    config = load_config(path, overrides={"source.path": str(folder)})
    train, test = (load_source(config.source, split) for split in ("train", "test"))
    train_ids, test_ids = (set(split.images[:, 0, 0, 0].tolist()) for split in (train, test))
    assert (len(train), len(test)) == (90, 10)  # 9/10 and 1/10 of the 100 training images: the paper's 45k/5k
    assert train_ids.isdisjoint(test_ids) and train_ids | test_ids == set(range(100))
    assert sorted(test.labels.tolist()) == list(range(10))  # stratified: one test image per class
    official = load_config(path, overrides={"source.path": str(folder), "source.test_from_train": False})
    assert set(load_source(official.source, "test").images[:, 0, 0, 0].tolist()) == set(range(100, 120))


# ---------------------------------------------------------------------------------- the docs' table


def documented_rows() -> dict[str, list[list[str]]]:
    """The summary table of docs/REPRODUCING.md: config stem -> the backticked names of each cell."""
    rows = {}
    for line in REPRODUCING.read_text().splitlines():
        if line.startswith("| `configs/"):
            cells = [re.findall(r"`([^`]+)`", cell) for cell in line.strip("|").split("|")]
            rows[Path(cells[0][0]).stem] = cells
    return rows


def test_reproducing_table_matches_every_paper_config():
    rows = documented_rows()
    assert set(rows) == {p.stem for p in CONFIGS if not p.stem.startswith("digits") and not p.stem.endswith("_example")}
    for name, (_file, kind, path, archs, methods, *_rest) in rows.items():
        config = paper_config(name)
        assert kind == [config.source.kind] and path == [str(config.source.path)], name
        assert set(archs) == set(entry_archs(config).values()), name
        assert set(methods) == {method_name(n, e) for n, e in config.methods.items()}, name


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_reproducing_gives_each_config_a_section_and_its_command(name):
    section = REPRODUCING.read_text().split(f"### `configs/{name}.yaml`")[1].split("\n### ")[0]
    assert f"advpipe run configs/{name}.yaml --device cuda" in section
