"""Bad-input table: every case fails cleanly, names the problem, and leaves nothing half-written.

Each case builds its own small inputs under tmp_path and is then run either through the
`advpipe` command line (a subprocess: exit code 2, or 3 for a corrupt store; a message on
stderr naming the file, key or shard; no traceback) or through the Python API (a specific
AdvpipeError subclass whose message names the problem and whose exit_code is the CLI's).
Afterwards no file may have appeared under tmp_path: no manifest, no `.tmp-*` file, no
checkpoint, no shard.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import digits_config, write_test_store
from PIL import Image

from advpipe.config import SamplerConfig, config_from_dict, load_config
from advpipe.datasets import load_source
from advpipe.datasets.cifar import LAYOUTS
from advpipe.datasets.idx import IMAGES_MAGIC, LABELS_MAGIC
from advpipe.errors import (
    AdvpipeError,
    ConfigError,
    DataError,
    GenerationError,
    IntegrityError,
    ModelError,
    SamplerError,
    StoreError,
)
from advpipe.models import build_model, save_checkpoint
from advpipe.models.checkpoint import CHECKPOINT_FORMAT
from advpipe.pipeline.job import generate
from advpipe.sampler import make_loader
from advpipe.stores import convert_store
from advpipe.trainers.clean import train_source

ADVPIPE = str(Path(sys.executable).parent / "advpipe")
DIGITS = [str(digit) for digit in range(10)]


@dataclass
class Case:
    """One bad input: either `cli` (advpipe arguments) or `call` (a Python API call), never both."""

    cli: list[str] | None = None
    call: Callable[[], object] | None = None
    error: type[AdvpipeError] = AdvpipeError  # API cases: the exception type expected
    code: int = 2  # the exit code (CLI) or the exception's exit_code (API)
    match: str = ""  # a regex the message must match
    names: list[str] = field(default_factory=list)  # literal strings (files, keys, shards) it must name
    absent: list[Path] = field(default_factory=list)  # paths the failed command must not have created


# --------------------------------------------------------------------------- input writers


def write_config(root: Path, raw: dict, name: str = "config.yaml") -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def config_with(root: Path, checkpoint: Path | None = None, **changes) -> dict:
    """The digits test config with top-level sections replaced or patched (dicts are merged)."""
    raw = digits_config(root, checkpoint=checkpoint)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict) and key != "variants":
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


def outputs(raw: dict) -> list[Path]:
    """What a successful run of this config would have written: the manifest and the checkpoint."""
    return [Path(raw["store"]["path"]) / "manifest.json", Path(raw["model"]["checkpoint"])]


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()


def write_mnist(folder: Path, images: int = 12, labels: int = 12, magic: int = IMAGES_MAGIC,
                cut: int = 0) -> Path:
    """The four IDX files; the training images file can get a wrong magic, a count or be cut short."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n_images, n_labels, image_magic in (("train", images, labels, magic), ("t10k", 6, 6, IMAGES_MAGIC)):
        data = idx_bytes(rng.integers(0, 256, (n_images, 16, 16), dtype=np.uint8), image_magic)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(data[: len(data) - cut] if prefix == "train" else data)
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
            idx_bytes((np.arange(n_labels) % 10).astype(np.uint8), LABELS_MAGIC))
    return folder


class RunsAShellCommand:
    """What a malicious pickle looks like: loading it would run `touch marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_cifar(root: Path, labels: list[int] | None = None, payload: object = None) -> Path:
    """A tiny CIFAR-10 python folder; data_batch_1 gets `labels`, or is replaced by `payload`."""
    layout = LAYOUTS["cifar10"]
    folder = root / layout.folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in layout.members()[:-1]:
        batch_labels = labels if labels is not None and name == "data_batch_1" else [0, 1, 2]
        batch = {b"labels": batch_labels, b"data": rng.integers(0, 256, (len(batch_labels), 3072), dtype=np.uint8)}
        content = payload if payload is not None and name == "data_batch_1" else batch
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)]}
    (folder / layout.meta).write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def write_png(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width), 128, dtype=np.uint8)).save(path)


def corrupt(shard: Path) -> Path:
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard


def generating(raw: dict) -> Callable[[], object]:
    return lambda: generate(config_from_dict(raw), progress=False)


def training(raw: dict) -> Callable[[], object]:
    return lambda: train_source(config_from_dict(raw), progress=False)


def loading(path: Path) -> Callable[[], object]:
    return lambda: load_config(path)


# --------------------------------------------------------------------------- CLI cases


def cli_unknown_config_key(tmp: Path, model: Path) -> Case:
    raw = config_with(tmp, model, variantz={"fgsm": {"eps": 0.1}})
    return Case(cli=["generate", str(write_config(tmp, raw))], match=r"unknown key 'variantz'",
                names=["config.yaml"], absent=outputs(raw))


def cli_wrong_type(tmp: Path, model: Path) -> Case:
    raw = config_with(tmp, model, store={"shard_size": "big"})
    return Case(cli=["generate", str(write_config(tmp, raw))], match=r"key 'store\.shard_size'.*integer",
                names=["config.yaml", "'big'"], absent=outputs(raw))


def cli_negative_eps(tmp: Path, model: Path) -> Case:
    raw = config_with(tmp, model, variants={"fgsm": {"eps": -0.1}})
    return Case(cli=["generate", str(write_config(tmp, raw))], match=r"variants\.fgsm: parameter 'eps'",
                names=["config.yaml", "-0.1"], absent=outputs(raw))


def cli_ratio_lo_above_hi(tmp: Path, model: Path) -> Case:
    write_test_store(tmp / "st")
    config = write_config(tmp, {"sampler": {"ratio": [0.8, 0.2]}})
    return Case(cli=["sample", str(tmp / "st"), "--config", str(config)], match=r"lo > hi",
                names=["config.yaml", "sampler.ratio"])


def cli_sampler_group_names_missing_variant(tmp: Path, model: Path) -> Case:
    write_test_store(tmp / "st")
    config = write_config(tmp, {"sampler": {"groups": {"attacks": ["noise", "fgsm"]}, "weights": {"attacks": 1}}})
    return Case(cli=["sample", str(tmp / "st"), "--config", str(config)],
                match=r"group 'attacks' names variant\(s\) the store does not have: fgsm", names=["noise, tiny"])


def cli_bad_device(tmp: Path, model: Path) -> Case:
    raw = config_with(tmp, None, device="gpu0")
    return Case(cli=["train-source", str(write_config(tmp, raw))], match=r"device 'gpu0' is not a torch device",
                absent=outputs(raw))


def cli_bad_cluster_flag(tmp: Path, model: Path) -> Case:
    raw = config_with(tmp, model, variants={"gaussian": {"sigma": 0.1}})
    return Case(cli=["generate", str(write_config(tmp, raw)), "--cluster", "local:0"],
                match=r"cluster 'local:0' is not valid", absent=[Path(raw["store"]["path"])])


def cli_idx_wrong_magic(tmp: Path, model: Path) -> Case:
    folder = write_mnist(tmp / "mnist", magic=0x00000801)
    raw = config_with(tmp, model, source={"kind": "mnist", "path": str(folder)})
    return Case(cli=["generate", str(write_config(tmp, raw))], match=r"IDX magic is 0x00000801, expected 0x00000803",
                names=[str(folder / "train-images-idx3-ubyte")], absent=outputs(raw))


def cli_cifar_malicious_pickle(tmp: Path, model: Path) -> Case:
    marker = tmp / "pwned"
    folder = write_cifar(tmp / "cifar", payload={b"data": RunsAShellCommand(marker)})
    raw = config_with(tmp, model, source={"kind": "cifar10", "path": str(tmp / "cifar")})
    return Case(cli=["generate", str(write_config(tmp, raw))],
                match=r"refusing to unpickle global '(posix|os)\.system'", names=[str(folder / "data_batch_1")],
                absent=[*outputs(raw), marker])


def cli_checkpoint_of_another_architecture(tmp: Path, model: Path) -> Case:
    other = build_model("caffe_quick", 10, (1, 16, 16))
    save_checkpoint(tmp / "caffe.pt", other, DIGITS, {})
    raw = config_with(tmp, tmp / "caffe.pt")
    return Case(cli=["generate", str(write_config(tmp, raw))],
                match=r"holds a 'caffe_quick' model but 'lenet' is expected", names=[str(tmp / "caffe.pt")],
                absent=[outputs(raw)[0]])


def cli_unwritable_store(tmp: Path, model: Path) -> Case:
    (tmp / "file").write_text("a regular file, so nothing can be created under it (not even by root)")
    raw = config_with(tmp, model, store={"path": str(tmp / "file" / "store")})
    return Case(cli=["generate", str(write_config(tmp, raw))], match=r"cannot write the store here",
                names=[str(tmp / "file" / "store"), "store.path"])


def cli_unwritable_checkpoint(tmp: Path, model: Path) -> Case:
    (tmp / "file").write_text("a regular file")
    raw = config_with(tmp, tmp / "file" / "model.pt")
    return Case(cli=["train-source", str(write_config(tmp, raw))], match=r"cannot write the checkpoint here",
                names=[str(tmp / "file" / "model.pt"), "model.checkpoint"])


def cli_store_without_manifest(tmp: Path, model: Path) -> Case:
    write_test_store(tmp / "st")
    (tmp / "st" / "manifest.json").unlink()
    return Case(cli=["inspect", str(tmp / "st")], match=r"not a finished store \(no manifest\.json\)",
                names=[str(tmp / "st"), "advpipe generate"])


def cli_manifest_not_json(tmp: Path, model: Path) -> Case:
    write_test_store(tmp / "st")
    (tmp / "st" / "manifest.json").write_text('{"format": "advpipe-store", ')
    return Case(cli=["inspect", str(tmp / "st")], match=r"manifest is not valid JSON",
                names=[str(tmp / "st" / "manifest.json")])


def cli_verify_corrupt_shard(tmp: Path, model: Path) -> Case:
    write_test_store(tmp / "st")
    corrupt(tmp / "st" / "test" / "test-00000.h5")
    return Case(cli=["verify", str(tmp / "st")], code=3, match=r"sha256 does not match",
                names=["test/test-00000.h5", "1 problem(s)"])


def cli_verify_not_a_store(tmp: Path, model: Path) -> Case:
    return Case(cli=["verify", str(tmp / "nowhere")], match=r"no such store directory", names=[str(tmp / "nowhere")],
                absent=[tmp / "nowhere"])


def cli_convert_to_unwritable_target(tmp: Path, model: Path) -> Case:
    write_test_store(tmp / "st")
    (tmp / "file").write_text("a regular file")
    return Case(cli=["convert", str(tmp / "st"), str(tmp / "file" / "wds"), "--to", "webdataset"],
                match=r"cannot write a store here", names=[str(tmp / "file" / "wds")])


def cli_convert_onto_a_store(tmp: Path, model: Path) -> Case:
    write_test_store(tmp / "st")
    write_test_store(tmp / "other")
    return Case(cli=["convert", str(tmp / "st"), str(tmp / "other"), "--to", "webdataset"],
                match=r"a store already exists here.*--force", names=[str(tmp / "other")])


# --------------------------------------------------------------------------- config cases (Python API)


def api_absurd_eps(tmp: Path, model: Path) -> Case:
    path = write_config(tmp, config_with(tmp, model, variants={"fgsm": {"eps": 5.0}}))
    return Case(call=loading(path), error=ConfigError, match=r"variants\.fgsm: parameter 'eps'", names=["config.yaml"])


def api_negative_weight(tmp: Path, model: Path) -> Case:
    path = write_config(tmp, config_with(tmp, model, sampler={"weights": {"fgsm": -1}}))
    return Case(call=loading(path), error=ConfigError,
                match=r"key 'sampler\.weights\.fgsm': range must not be negative", names=["config.yaml"])


def api_ratio_above_one(tmp: Path, model: Path) -> Case:
    path = write_config(tmp, config_with(tmp, model, sampler={"ratio": [0.5, 1.5]}))
    return Case(call=loading(path), error=ConfigError,
                match=r"key 'sampler\.ratio': adversarial ratio must lie in \[0, 1\]", names=["config.yaml"])


def api_unknown_generator(tmp: Path, model: Path) -> Case:
    path = write_config(tmp, config_with(tmp, model, variants={"mim": {"eps": 0.1}}))
    return Case(call=loading(path), error=ConfigError, match=r"variants\.mim: unknown generator 'mim' \(known: ",
                names=["config.yaml"])


def api_unknown_variant_parameter(tmp: Path, model: Path) -> Case:
    path = write_config(tmp, config_with(tmp, model, variants={"fgsm_small": {"generator": "fgsm", "epz": 0.1}}))
    return Case(call=loading(path), error=ConfigError, match=r"variants\.fgsm_small: unknown parameter 'epz'",
                names=["config.yaml"])


def api_bad_cluster_spec(tmp: Path, model: Path) -> Case:
    path = write_config(tmp, config_with(tmp, model, generation={"cluster": "locale:4"}))
    return Case(call=loading(path), error=ConfigError, match=r"key 'generation\.cluster'", names=["'locale:4'"])


def api_reserved_variant_name(tmp: Path, model: Path) -> Case:
    path = write_config(tmp, config_with(tmp, model, variants={"clean": {"generator": "gaussian"}}))
    return Case(call=loading(path), error=ConfigError, match=r"variant name 'clean' is reserved", names=["config.yaml"])


def api_source_without_path(tmp: Path, model: Path) -> Case:
    path = write_config(tmp, config_with(tmp, model, source={"kind": "npz", "image_size": None, "limit": None}))
    return Case(call=loading(path), error=ConfigError, match=r"source\.kind 'npz' needs source\.path",
                names=["config.yaml"])


def api_config_not_a_mapping(tmp: Path, model: Path) -> Case:
    path = tmp / "list.yaml"
    path.write_text("- source\n- store\n")
    return Case(call=loading(path), error=ConfigError, match=r"top level must be a mapping", names=["list.yaml"])


def api_config_not_yaml(tmp: Path, model: Path) -> Case:
    path = tmp / "broken.yaml"
    path.write_text("store: {path: [unclosed\n")
    return Case(call=loading(path), error=ConfigError, match=r"not valid YAML", names=["broken.yaml"])


# --------------------------------------------------------------------------- data cases (Python API)


def api_idx_truncated(tmp: Path, model: Path) -> Case:
    folder = write_mnist(tmp / "mnist", cut=100)
    raw = config_with(tmp, model, source={"kind": "mnist", "path": str(folder)})
    return Case(call=generating(raw), error=DataError, match=r"truncated: .* download it again",
                names=[str(folder / "train-images-idx3-ubyte")], absent=outputs(raw)[:1])


def api_idx_count_mismatch(tmp: Path, model: Path) -> Case:
    folder = write_mnist(tmp / "mnist", images=12, labels=11)
    raw = config_with(tmp, model, source={"kind": "fashion_mnist", "path": str(folder)})
    return Case(call=generating(raw), error=DataError, match=r"holds 12 images but .* holds 11 labels",
                names=["train-images-idx3-ubyte", "train-labels-idx1-ubyte"], absent=outputs(raw)[:1])


def api_cifar_labels_out_of_range(tmp: Path, model: Path) -> Case:
    folder = write_cifar(tmp / "cifar", labels=[0, 12, 3])
    raw = config_with(tmp, model, source={"kind": "cifar10", "path": str(tmp / "cifar")})
    return Case(call=generating(raw), error=DataError,
                match=r"label 12 \(at index 1, 1 bad in all\) is outside \[0, 10\)",
                names=[str(folder / "data_batch_1")], absent=outputs(raw)[:1])


def api_npz_nan_images(tmp: Path, model: Path) -> Case:
    x = np.random.default_rng(0).random((20, 16, 16))
    x[3, 4, 5] = np.nan
    path = write_npz(tmp / "nan.npz", x=x, y=np.arange(20) % 10)
    raw = config_with(tmp, None, source={"kind": "npz", "path": str(path)})
    return Case(call=training(raw), error=DataError, match=r"'x' contains NaN", names=[str(path)], absent=outputs(raw))


def api_npz_wrong_ndim(tmp: Path, model: Path) -> Case:
    path = write_npz(tmp / "flat.npz", x=np.zeros((20, 256), np.uint8), y=np.arange(20) % 10)
    raw = config_with(tmp, model, source={"kind": "npz", "path": str(path)})
    return Case(call=generating(raw), error=DataError, match=r"'x' has shape \(20, 256\); expected \(N, H, W\)",
                names=[str(path)], absent=outputs(raw)[:1])


def api_npz_labels_out_of_range(tmp: Path, model: Path) -> Case:
    path = write_npz(tmp / "labels.npz", x=np.zeros((20, 16, 16), np.uint8), y=np.arange(20) % 5,
                     class_names=np.array(["a", "b", "c"]))
    raw = config_with(tmp, model, source={"kind": "npz", "path": str(path)})
    return Case(call=generating(raw), error=DataError, match=r"label 3 .* is outside \[0, 3\)",
                names=[str(path)], absent=outputs(raw)[:1])


def api_imagefolder_mixed_sizes(tmp: Path, model: Path) -> Case:
    for name, (height, width) in {"cat/1.png": (16, 16), "cat/2.png": (16, 16), "dog/1.png": (9, 6)}.items():
        write_png(tmp / "images" / name, height, width)
    raw = config_with(tmp, None, source={"kind": "imagefolder", "path": str(tmp / "images"), "image_size": None})
    return Case(call=training(raw), error=DataError, match=r"image is 9x6 .* is 16x16; .*source\.image_size",
                names=[str(tmp / "images" / "dog" / "1.png")], absent=outputs(raw))


def api_imagefolder_empty(tmp: Path, model: Path) -> Case:
    for name in ("cat", "dog"):
        (tmp / "images" / name).mkdir(parents=True)
        (tmp / "images" / name / "README.txt").write_text("not an image")
    raw = config_with(tmp, model, source={"kind": "imagefolder", "path": str(tmp / "images")})
    return Case(call=generating(raw), error=DataError, match=r"no \.png/\.jpg/\.jpeg images .* the source is empty",
                names=[str(tmp / "images")], absent=outputs(raw)[:1])


def api_imagefolder_unreadable_image(tmp: Path, model: Path) -> Case:
    write_png(tmp / "images" / "cat" / "1.png", 16, 16)
    (tmp / "images" / "dog").mkdir()
    (tmp / "images" / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
    raw = config_with(tmp, model, source={"kind": "imagefolder", "path": str(tmp / "images")})
    return Case(call=generating(raw), error=DataError, match=r"cannot read the image .* replace or remove it",
                names=[str(tmp / "images" / "dog" / "1.png")], absent=outputs(raw)[:1])


def api_source_path_missing(tmp: Path, model: Path) -> Case:
    raw = config_with(tmp, model, source={"kind": "cifar100", "path": str(tmp / "cifar-100-python")})
    return Case(call=generating(raw), error=DataError, match=r"not found; set source\.path",
                names=[str(tmp / "cifar-100-python")], absent=outputs(raw)[:1])


# --------------------------------------------------------------------------- model cases (Python API)


def api_model_shape_mismatch(tmp: Path, model: Path) -> Case:
    raw = config_with(tmp, model, source={"image_size": 12})
    return Case(call=generating(raw), error=ModelError, match=r"\(1, 16, 16\) but the images are \(1, 12, 12\)",
                names=["source.image_size"], absent=outputs(raw)[:1])


def api_model_class_mismatch(tmp: Path, model: Path) -> Case:
    path = write_npz(tmp / "three.npz", x=np.zeros((30, 16, 16), np.uint8), y=np.arange(30) % 3)
    raw = config_with(tmp, model, source={"kind": "npz", "path": str(path)})
    return Case(call=generating(raw), error=ModelError, match=r"has 10 classes but the data has 3",
                names=["lenet", "retrain"], absent=outputs(raw)[:1])


def api_weights_of_another_architecture(tmp: Path, model: Path) -> Case:
    """The file claims 'lenet' but holds caffe_quick weights (e.g. a hand-edited or mixed-up checkpoint)."""
    lenet = torch.load(model, weights_only=True)
    state = {k: v.clone() for k, v in build_model("caffe_quick", 10, (1, 16, 16)).state_dict().items()}
    torch.save({"format": CHECKPOINT_FORMAT, "meta": lenet["meta"], "state_dict": state}, tmp / "mixed.pt")
    raw = config_with(tmp, tmp / "mixed.pt")
    return Case(call=generating(raw), error=ModelError,
                match=r"weights do not fit a 'lenet' model .*another architecture", names=[str(tmp / "mixed.pt")],
                absent=outputs(raw)[:1])


def api_checkpoint_not_a_checkpoint(tmp: Path, model: Path) -> Case:
    (tmp / "junk.pt").write_bytes(b"PK\x03\x04 definitely not a torch file")
    raw = config_with(tmp, tmp / "junk.pt")
    return Case(call=generating(raw), error=ModelError, match=r"not a model checkpoint", names=[str(tmp / "junk.pt")],
                absent=outputs(raw)[:1])


def api_checkpoint_missing(tmp: Path, model: Path) -> Case:
    raw = config_with(tmp, tmp / "never-trained.pt")
    return Case(call=generating(raw), error=GenerationError, match=r"checkpoint not found; train it first with "
                r"`advpipe train-source CONFIG`", names=[str(tmp / "never-trained.pt")], absent=outputs(raw))


def api_unknown_architecture(tmp: Path, model: Path) -> Case:
    raw = config_with(tmp, None, model={"arch": "lenet5"})
    return Case(call=training(raw), error=ModelError, match=r"unknown model architecture 'lenet5' \(known: lenet, ",
                absent=outputs(raw))


def api_checkpoint_path_is_a_directory(tmp: Path, model: Path) -> Case:
    (tmp / "models").mkdir()
    raw = config_with(tmp, tmp / "models")
    return Case(call=training(raw), error=ModelError, match=r"cannot write the checkpoint here",
                names=[str(tmp / "models"), "model.checkpoint"])


# --------------------------------------------------------------------------- store and sampler cases (Python API)


def api_store_path_holds_other_files(tmp: Path, model: Path) -> Case:
    (tmp / "store").mkdir()
    (tmp / "store" / "notes.txt").write_text("my notes")
    raw = config_with(tmp, model, variants={"gaussian": {"sigma": 0.1}})
    return Case(call=generating(raw), error=StoreError,
                match=r"directory is not empty and is not a store \(notes\.txt\)",
                names=[str(tmp / "store"), "--force"], absent=outputs(raw)[:1])


def api_loader_corrupt_shard(tmp: Path, model: Path) -> Case:
    write_test_store(tmp / "st")
    corrupt(tmp / "st" / "train" / "train-00001.h5")
    return Case(call=lambda: make_loader(tmp / "st", "train", SamplerConfig(batch_size=8)), error=IntegrityError,
                code=3, match=r"sha256 does not match the manifest", names=["train/train-00001.h5"])


def api_loader_weight_for_missing_variant(tmp: Path, model: Path) -> Case:
    write_test_store(tmp / "st")
    sampler = SamplerConfig(weights={"noise": 1, "fgsm": [0.5, 1]})
    return Case(call=lambda: make_loader(tmp / "st", "train", sampler), error=SamplerError,
                match=r"weight for unknown variant or group 'fgsm' \(store has: noise, tiny")


def api_loader_unknown_split(tmp: Path, model: Path) -> Case:
    write_test_store(tmp / "st")
    return Case(call=lambda: make_loader(tmp / "st", "val", SamplerConfig()), error=StoreError,
                match=r"store has no split 'val' \(it has: (test, train|train, test)\)", names=[str(tmp / "st")])


def api_convert_unwritable_target(tmp: Path, model: Path) -> Case:
    write_test_store(tmp / "st")
    (tmp / "file").write_text("a regular file")
    target = tmp / "file" / "h5"
    return Case(call=lambda: convert_store(tmp / "st", target, "hdf5", progress=False), error=StoreError,
                match=r"cannot write a store here", names=[str(target)])


CASES = [pytest.param(build, id=build.__name__.replace("_", "-")) for build in (
    cli_unknown_config_key, cli_wrong_type, cli_negative_eps, cli_ratio_lo_above_hi,
    cli_sampler_group_names_missing_variant, cli_bad_device, cli_bad_cluster_flag, cli_idx_wrong_magic,
    cli_cifar_malicious_pickle, cli_checkpoint_of_another_architecture, cli_unwritable_store,
    cli_unwritable_checkpoint, cli_store_without_manifest, cli_manifest_not_json, cli_verify_corrupt_shard,
    cli_verify_not_a_store, cli_convert_to_unwritable_target, cli_convert_onto_a_store,
    api_absurd_eps, api_negative_weight, api_ratio_above_one, api_unknown_generator, api_unknown_variant_parameter,
    api_bad_cluster_spec, api_reserved_variant_name, api_source_without_path, api_config_not_a_mapping,
    api_config_not_yaml,
    api_idx_truncated, api_idx_count_mismatch, api_cifar_labels_out_of_range, api_npz_nan_images, api_npz_wrong_ndim,
    api_npz_labels_out_of_range, api_imagefolder_mixed_sizes, api_imagefolder_empty,
    api_imagefolder_unreadable_image, api_source_path_missing,
    api_model_shape_mismatch, api_model_class_mismatch, api_weights_of_another_architecture,
    api_checkpoint_not_a_checkpoint, api_checkpoint_missing, api_unknown_architecture,
    api_checkpoint_path_is_a_directory,
    api_store_path_holds_other_files, api_loader_corrupt_shard, api_loader_weight_for_missing_variant,
    api_loader_unknown_split, api_convert_unwritable_target,
)]


def files_under(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if not path.is_dir()}


@pytest.mark.parametrize("build", CASES)
def test_bad_input_fails_cleanly(build, tmp_path, digits_model):
    load_source.cache_clear()  # no case may see another's cached source
    case = build(tmp_path, digits_model)
    assert (case.cli is None) != (case.call is None)
    before = files_under(tmp_path)
    absent_before = {path for path in case.absent if path.exists()}

    if case.cli is not None:
        result = subprocess.run([ADVPIPE, *case.cli], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        message = result.stderr
        assert result.returncode == case.code, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
        assert "Traceback" not in message, message
        assert f"advpipe {case.cli[0]}: error: " in message or (case.code == 3 and "FAIL " in message), message
    else:
        with pytest.raises(case.error) as info:
            case.call()
        message = str(info.value)
        assert info.value.exit_code == case.code

    assert re.search(case.match, message, re.DOTALL), message
    for name in case.names:
        assert name in message, f"{name!r} not named in: {message}"

    # nothing half-written: no file appeared anywhere (manifest, shard, checkpoint, temp file)
    assert files_under(tmp_path) - before == set()
    assert not list(tmp_path.rglob(".tmp-*"))
    for path in case.absent:
        assert path in absent_before or not path.exists(), f"{path} was created by a failed command"


def test_the_table_is_large_and_mixed():
    ids = [param.id for param in CASES]
    assert len(ids) == len(set(ids)) >= 30
    assert sum(i.startswith("cli-") for i in ids) >= 10 and sum(i.startswith("api-") for i in ids) >= 10
