"""Hostile inputs: every one is refused with one clear line, before it costs time or memory.

One case per class of input (configs, IDX, npz, CIFAR archives, image folders, model and training
checkpoints, command-line options, the generation marker, the outputs of `advpipe run`). Each API case
runs under tracemalloc and a clock: the refusal must come within a fixed budget of Python-visible memory
(numpy's allocations included) and seconds, and its message must be one bounded line. The CLI cases run
the `advpipe` command: exit code 2, one line on stderr, no traceback, nothing written.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import digits_config, time_limit, write_test_store
from PIL import Image

from advpipe.cli import main as cli_main
from advpipe.config import MAX_ALIASES, MAX_CONFIG_BYTES, config_from_dict, load_config
from advpipe.datasets import load_source
from advpipe.datasets.cifar import LAYOUTS, MAX_MEMBERS
from advpipe.datasets.idx import IMAGES_MAGIC, LABELS_MAGIC
from advpipe.errors import (
    SHOWN_PROBLEMS,
    AdvpipeError,
    ConfigError,
    DataError,
    ModelError,
    StoreError,
    TrainingError,
)
from advpipe.io import path_limits
from advpipe.main_job import JobOptions, run_main_job
from advpipe.models import build_model, save_checkpoint
from advpipe.models.checkpoint import load_checkpoint
from advpipe.pipeline.job import generate
from advpipe.stores.writer import StoreWriter
from advpipe.trainers.state import STATE_FORMAT, RunState, load_run_state

ADVPIPE = str(Path(sys.executable).parent / "advpipe")

#: what refusing any of these inputs may cost: Python-visible memory (tracemalloc) and wall time (generous
#: for a shared CI machine; the inputs below cost gigabytes and minutes when they are not refused early)
MEMORY_BUDGET = 16 << 20
SECONDS_BUDGET = 20.0
#: an error message is one line of at most this many characters
MESSAGE_BUDGET = 600


@dataclass
class Hostile:
    call: Callable[[], object]
    error: type[AdvpipeError]
    match: str  # a regex the message must match


def refused(case: Hostile) -> str:
    """Run the case under tracemalloc and a clock; returns the message after checking every bound."""
    load_source.cache_clear()
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(case.error) as info, time_limit(SECONDS_BUDGET):
            case.call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - start
    message = str(info.value)
    assert re_search(case.match, message), message
    assert "\n" not in message and len(message) <= MESSAGE_BUDGET, message
    assert peak <= MEMORY_BUDGET, f"peak {peak / 2**20:.1f} MiB"
    assert seconds <= SECONDS_BUDGET, f"{seconds:.1f} s"
    return message


def re_search(pattern: str, text: str) -> bool:
    return re.search(pattern, text) is not None


# --------------------------------------------------------------------------- writers


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def alias_bomb() -> bytes:
    """Nine levels, each a list of nine aliases of the level below: 9**9 strings once expanded (400 bytes)."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level, name in enumerate("bcdefghi"):
        below = "abcdefghi"[level]
        lines.append(f"{name}: &{name} [{','.join(f'*{below}' for _ in range(9))}]")
    lines.append("name: *i")
    return "\n".join(lines).encode()


def idx_header(magic: int, dims: tuple[int, ...]) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)


def mnist_folder(root: Path, train_images: bytes, gz: bool = False) -> Path:
    """The four IDX files with valid labels and test split; the training images file is `train_images`."""
    folder = root / "mnist"
    folder.mkdir()
    labels = np.arange(10, dtype=np.uint8)
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_header(LABELS_MAGIC, (10,)) + labels.tobytes())
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_header(LABELS_MAGIC, (10,)) + labels.tobytes())
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx_header(IMAGES_MAGIC, (10, 16, 16)) + bytes(2560))
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    (folder / name).write_bytes(gzip.compress(train_images, compresslevel=1) if gz else train_images)
    return folder


def source_config(kind: str, path: Path) -> dict:
    return {"source": {"kind": kind, "path": str(path)}}


def loading_source(kind: str, path: Path) -> Callable[[], object]:
    return lambda: load_source(config_from_dict(source_config(kind, path)).source, "train")


def npy_bytes(shape: tuple[int, ...], dtype: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data  # the magic string, the header, then the data


def npz_with(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(f"{name}.npy", data)
    return path


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose header (IHDR, with a valid CRC) claims width x height pixels."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((1, 1), dtype=np.uint8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def checkpoint_with(path: Path, **meta_changes: object) -> Path:
    """A real LeNet checkpoint whose metadata is then edited (the weights stay a LeNet's)."""
    model = build_model("lenet", 10, (1, 16, 16))
    save_checkpoint(path, model, [str(i) for i in range(10)], {})
    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["meta"])
    meta.update(meta_changes)
    payload["meta"] = meta_changes.pop("raw_meta", None) or json.dumps(meta)
    torch.save(payload, path)
    return path


# --------------------------------------------------------------------------- config cases


def config_file(tmp: Path, data: bytes) -> Callable[[], object]:
    path = write_bytes(tmp / "config.yaml", data)
    return lambda: load_config(path)


def config_alias_bomb(tmp: Path) -> Hostile:
    assert len(alias_bomb()) < 500
    return Hostile(config_file(tmp, alias_bomb()), ConfigError, r"config\.yaml: not valid YAML: line \d+, column "
                   r"\d+: expands to more than 10000 values once aliases are expanded")


def config_many_aliases(tmp: Path) -> Hostile:
    data = ("x: &x 1\nl: [" + ",".join(["*x"] * (MAX_ALIASES + 1)) + "]\n").encode()
    return Hostile(config_file(tmp, data), ConfigError, rf"more than {MAX_ALIASES} aliases")


def config_recursive_alias(tmp: Path) -> Hostile:
    return Hostile(config_file(tmp, b"a: &a [1, *a]\n"), ConfigError, r"an alias refers to a mapping or list that "
                   r"contains it")


def config_deep_nesting(tmp: Path) -> Hostile:
    return Hostile(config_file(tmp, b"sampler: " + b"[" * 100_000 + b"]" * 100_000), ConfigError,
                   r"nested deeper than 24 levels")


def config_too_many_values(tmp: Path) -> Hostile:
    data = b"evaluation:\n  fgsm_eps: [" + b"0.1, " * 12_000 + b"0.2]\n"
    return Hostile(config_file(tmp, data), ConfigError, r"more than 10000 values; a config is a few hundred")


def config_deep_by_aliases(tmp: Path) -> Hostile:
    lines = ["a0: &a0 [[[[[[[[1]]]]]]]]"] + [f"a{i}: &a{i} [[[[[[[[*a{i - 1}]]]]]]]]" for i in range(1, 5)]
    return Hostile(config_file(tmp, "\n".join(lines).encode()), ConfigError,
                   r"nested deeper than 24 levels once aliases are expanded")


def config_too_large(tmp: Path) -> Hostile:
    return Hostile(config_file(tmp, b"# " + b"x" * MAX_CONFIG_BYTES + b"\n"), ConfigError,
                   r"config\.yaml: larger than 256 KiB")


def config_not_utf8(tmp: Path) -> Hostile:
    return Hostile(config_file(tmp, "name: caf\xe9\n".encode("latin-1")), ConfigError,
                   r"config\.yaml: not UTF-8 text \(byte 9: b'\\xe9'\)")


def config_binary(tmp: Path) -> Hostile:
    return Hostile(config_file(tmp, b"name: a\x00b\n"), ConfigError,
                   r"not valid YAML: character 8: special characters are not allowed #x0000")


def config_empty(tmp: Path) -> Hostile:
    return Hostile(config_file(tmp, b"# only a comment\n\n"), ConfigError, r"config\.yaml: the config is empty")


def config_duplicate_key(tmp: Path) -> Hostile:
    data = b"name: first\nstore:\n  shard_size: 8\n  shard_size: 16\n"
    return Hostile(config_file(tmp, data), ConfigError, r"line 4, column 3: key 'shard_size' appears twice "
                   r"\(lines 3 and 4\)")


def config_key_not_text(tmp: Path) -> Hostile:
    return Hostile(config_file(tmp, b"variants:\n  1: {generator: fgsm}\n"), ConfigError,
                   r"line 2, column 3: key 1 is not text .*quote it")


def config_top_level_not_mapping(tmp: Path) -> Hostile:
    return Hostile(config_file(tmp, b"- name\n- seed\n"), ConfigError,
                   r"the top level must be a mapping of sections, got list")


def config_nan(tmp: Path) -> Hostile:
    return Hostile(config_file(tmp, b"train:\n  lr: .nan\n"), ConfigError,
                   r"key 'train\.lr': nan is not a usable number")


def config_infinity(tmp: Path) -> Hostile:
    return Hostile(config_file(tmp, b"variants:\n  g: {generator: gaussian, sigma: .inf}\n"), ConfigError,
                   r"key 'variants\.g\.sigma': inf is not a usable number")


def config_huge_integer(tmp: Path) -> Hostile:
    return Hostile(config_file(tmp, b"seed: 99999999999999999999999\n"), ConfigError,
                   r"key 'seed': 99999999999999999999999 is beyond the 64-bit integers")


def config_integer_too_long_to_read(tmp: Path) -> Hostile:
    return Hostile(config_file(tmp, b"seed: " + b"9" * 6000 + b"\n"), ConfigError,
                   r"not valid YAML: a value cannot be read")


def config_python_tag(tmp: Path) -> Hostile:
    return Hostile(config_file(tmp, b"name: !!python/object/apply:os.system ['true']\n"), ConfigError,
                   r"could not determine a constructor for the tag")


def config_huge_value_echoed(tmp: Path) -> Hostile:
    data = b"sampler:\n  ratio: [" + b"0.25, " * 5000 + b"0.5]\n"
    return Hostile(config_file(tmp, data), ConfigError, r"a range is \[lo, hi\], got \[0\.25, 0\.25, .*\.\.\.")


def config_long_key_echoed(tmp: Path) -> Hostile:
    return Hostile(config_file(tmp, b"? " + b"k" * 100_000 + b"\n: 1\n"), ConfigError,  # an explicit key
                   r"unknown key 'k{80}\.\.\. \(99920 more characters\)'")


def config_empty_store_path(tmp: Path) -> Hostile:
    return Hostile(config_file(tmp, b"store:\n  path: ''\n"), ConfigError,
                   r"key 'store\.path': store\.path '\.' names the working directory")


def config_dot_store_path(tmp: Path) -> Hostile:
    return Hostile(config_file(tmp, b"store:\n  path: .\n"), ConfigError,
                   r"key 'store\.path': store\.path '\.' names the working directory")


def config_name_climbs_out(tmp: Path) -> Hostile:
    return Hostile(config_file(tmp, b"name: ../../elsewhere\n"), ConfigError,
                   r"key 'name': name must be a folder name of its own")


def config_store_manifest(tmp: Path) -> Hostile:
    """A store's manifest.json is JSON, which YAML reads: refused as what it is, not as 10 unknown keys."""
    write_test_store(tmp / "store")
    return Hostile(lambda: load_config(tmp / "store" / "manifest.json"), ConfigError,
                   r"manifest\.json: is a store's manifest, not a config; pass a YAML config")


def config_large_store_manifest(tmp: Path) -> Hostile:
    """A big store's manifest is past the config size limit: named by the bytes read, not 'is this the right file'."""
    write_test_store(tmp / "store")
    manifest = json.loads((tmp / "store" / "manifest.json").read_text())
    manifest["generation"] = {"note": "x" * MAX_CONFIG_BYTES}
    path = write_bytes(tmp / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())
    return Hostile(lambda: load_config(path), ConfigError, r"manifest\.json: is a store's manifest, not a config")


def config_not_a_file(tmp: Path) -> Hostile:
    (tmp / "configs").mkdir()
    return Hostile(lambda: load_config(tmp / "configs"), ConfigError, r"configs: is not a file")


# --------------------------------------------------------------------------- dataset cases


def idx_gzip_bomb(tmp: Path) -> Hostile:
    """A 32 KB .gz whose header promises 10 images of 16x16 but which decompresses to 32 MiB."""
    folder = mnist_folder(tmp, idx_header(IMAGES_MAGIC, (10, 16, 16)) + bytes(32 << 20), gz=True)
    assert (folder / "train-images-idx3-ubyte.gz").stat().st_size < 200_000
    return Hostile(loading_source("mnist", folder), DataError,
                   r"train-images-idx3-ubyte\.gz: longer than its header says: more than 2560 data bytes")


def idx_header_claims_terabytes(tmp: Path) -> Hostile:
    folder = mnist_folder(tmp, idx_header(IMAGES_MAGIC, (60000, 1 << 20, 1 << 20)) + bytes(1000))
    return Hostile(loading_source("mnist", folder), DataError,
                   r"its header declares images of shape \(60000, 1048576, 1048576\), 6\.14e\+07 GiB once decoded, "
                   r"more than the 4 GiB")


def npz_header_claims_terabytes(tmp: Path) -> Hostile:
    path = npz_with(tmp / "data.npz", {"x": npy_bytes((10**6, 10**6, 28), "|u1", bytes(64)),
                                       "y": npy_bytes((2,), "<i8", bytes(16))})
    return Hostile(loading_source("npz", path), DataError,
                   r"'x': its header declares a uint8 array of shape \(1000000, 1000000, 28\), 2\.61e\+04 GiB")


def npz_zip_bomb(tmp: Path) -> Hostile:
    """A member whose header promises 100 bytes but whose deflated data runs on for 64 MiB."""
    path = npz_with(tmp / "data.npz", {"x": npy_bytes((1, 10, 10), "|u1", bytes(64 << 20)),
                                       "y": npy_bytes((1,), "<i8", bytes(8)),
                                       "class_names": b"not an npy file"})
    return Hostile(loading_source("npz", path), DataError, r"cannot load it as \.npz \(the magic string is not correct")


def npz_huge_header(tmp: Path) -> Hostile:
    """A header numpy itself refuses with a two-line message: the refusal is still one line."""
    header = np.lib.format.magic(1, 0) + struct.pack("<H", 60000) + b"{" + b" " * 59998 + b"\n"
    path = npz_with(tmp / "data.npz", {"x": header, "y": npy_bytes((1,), "<i8", bytes(8))})
    return Hostile(loading_source("npz", path), DataError,
                   r"Header info length \(60000\) is large and may not be safe to load securely\. To all")


def npz_object_array(tmp: Path) -> Hostile:
    path = npz_with(tmp / "data.npz", {"x": npy_bytes((2,), "|O", b"garbage"), "y": npy_bytes((2,), "<i8", bytes(16))})
    return Hostile(loading_source("npz", path), DataError, r"'x': holds Python objects \(dtype object\)")


def npz_truncated_member(tmp: Path) -> Hostile:
    path = npz_with(tmp / "data.npz", {"x": npy_bytes((4, 8, 8), "|u1", bytes(100)), "y": npy_bytes((4,), "<i8", b"")})
    return Hostile(loading_source("npz", path), DataError, r"'x': truncated: 100 of the 256 data bytes")


def cifar_member_claims_a_gigabyte(tmp: Path) -> Hostile:
    path = tmp / "cifar.tar"
    info = tarfile.TarInfo(f"{LAYOUTS['cifar10'].folder}/data_batch_1")
    info.size = 1 << 30
    path.write_bytes(info.tobuf(format=tarfile.USTAR_FORMAT) + bytes(4096))
    return Hostile(loading_source("cifar10", path), DataError,
                   r"cifar\.tar:cifar-10-batches-py/data_batch_1: 1024 MiB, larger than the 512 MiB any CIFAR batch")


def cifar_too_many_members(tmp: Path) -> Hostile:
    path = tmp / "cifar.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for index in range(MAX_MEMBERS + 1):
            tar.addfile(tarfile.TarInfo(f"junk/{index}"), io.BytesIO(b""))
    return Hostile(loading_source("cifar10", path), DataError, r"more than 1000 members or 2 GiB unpacked")


def image_bomb_past_pil_limit(tmp: Path) -> Hostile:
    png_claiming(tmp / "images" / "cat" / "bomb.png", 100_000, 100_000)
    png_claiming(tmp / "images" / "dog" / "fine.png", 1, 1)
    return Hostile(loading_source("imagefolder", tmp / "images"), DataError,
                   r"bomb\.png: refused: Image size \(10000000000 pixels\) exceeds limit")


def image_bomb_below_pil_limit(tmp: Path) -> Hostile:
    png_claiming(tmp / "images" / "cat" / "bomb.png", 9000, 9000)
    png_claiming(tmp / "images" / "dog" / "fine.png", 1, 1)
    return Hostile(loading_source("imagefolder", tmp / "images"), DataError,
                   r"bomb\.png: image is 9000x9000 pixels, more than the 67108864")


# --------------------------------------------------------------------------- checkpoint cases


def checkpoint_claims_a_trillion_classes(tmp: Path) -> Hostile:
    path = checkpoint_with(tmp / "model.pt", num_classes=10**12)
    return Hostile(lambda: load_checkpoint(path), ModelError,
                   r"metadata is unreadable \(num_classes must be an integer in \[1, 100000\], got 1000000000000\)")


def checkpoint_claims_huge_inputs(tmp: Path) -> Hostile:
    path = checkpoint_with(tmp / "model.pt", input_shape=[1, 100_000, 100_000])
    return Hostile(lambda: load_checkpoint(path), ModelError, r"input height must be an integer in \[1, 4096\]")


def checkpoint_deeply_nested_meta(tmp: Path) -> Hostile:
    path = checkpoint_with(tmp / "model.pt", raw_meta="[" * 200_000 + "]" * 200_000)
    return Hostile(lambda: load_checkpoint(path), ModelError, r"metadata is unreadable \(nested too deeply\)")


def checkpoint_class_names_disagree(tmp: Path) -> Hostile:
    path = checkpoint_with(tmp / "model.pt", class_names=["a"] * 3)
    return Hostile(lambda: load_checkpoint(path), ModelError,
                   r"class_names must be a list of 10 strings, got \['a', 'a', 'a'\]")


def training_state_deeply_nested(tmp: Path) -> Hostile:
    path = tmp / "state.pt"
    torch.save({"format": STATE_FORMAT, "position": "[" * 200_000 + "]" * 200_000}, path)
    state = RunState(model=torch.nn.Linear(1, 1), method=None, optimizer=None, scheduler=None, loader=None)
    return Hostile(lambda: load_run_state(path, state, torch.device("cpu")), TrainingError,
                   r"training checkpoint is damaged or does not fit this run \(RecursionError: nested too deeply\)")


def training_state_missing_part(tmp: Path) -> Hostile:
    path = tmp / "state.pt"
    torch.save({"format": STATE_FORMAT, "position": "{}"}, path)
    state = RunState(model=torch.nn.Linear(1, 1), method=None, optimizer=None, scheduler=None, loader=None)
    return Hostile(lambda: load_run_state(path, state, torch.device("cpu")), TrainingError,
                   r"damaged or does not fit this run \(KeyError: 'model'\)")


CASES = [pytest.param(build, id=build.__name__.replace("_", "-")) for build in (
    config_alias_bomb, config_many_aliases, config_recursive_alias, config_deep_nesting, config_deep_by_aliases,
    config_too_many_values,
    config_too_large, config_not_utf8, config_binary, config_empty, config_duplicate_key, config_key_not_text,
    config_top_level_not_mapping, config_nan, config_infinity, config_huge_integer, config_integer_too_long_to_read,
    config_python_tag, config_huge_value_echoed, config_long_key_echoed, config_empty_store_path,
    config_dot_store_path, config_name_climbs_out, config_not_a_file, config_store_manifest,
    config_large_store_manifest,
    idx_gzip_bomb, idx_header_claims_terabytes, npz_header_claims_terabytes, npz_zip_bomb, npz_huge_header,
    npz_object_array, npz_truncated_member, cifar_member_claims_a_gigabyte, cifar_too_many_members,
    image_bomb_past_pil_limit, image_bomb_below_pil_limit,
    checkpoint_claims_a_trillion_classes, checkpoint_claims_huge_inputs, checkpoint_deeply_nested_meta,
    checkpoint_class_names_disagree, training_state_deeply_nested, training_state_missing_part,
)]


@pytest.mark.parametrize("build", CASES)
def test_hostile_input_is_refused_cheaply_in_one_line(build, tmp_path):
    message = refused(build(tmp_path))
    assert str(tmp_path) in message or "checkpoint" in message or "config" in message


def test_validation_errors_are_bounded_however_many_problems():
    raw = {"evaluation": {"fgsm_eps": ["x"] * 500}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, origin="many.yaml")
    lines = str(info.value).splitlines()
    assert len(lines) == SHOWN_PROBLEMS + 1
    left_out = re.fullmatch(r"many\.yaml: \.\.\. and (\d+) more problem\(s\)", lines[-1])
    assert left_out and int(left_out.group(1)) >= 500 - SHOWN_PROBLEMS, lines[-1]
    assert all(line.startswith("many.yaml: key 'evaluation.fgsm_eps.") for line in lines[:-1])


def test_anchors_merges_and_an_empty_mapping_still_load(tmp_path):
    """What the bounds must not refuse: a few anchors and merge keys (overridden by the entry), and `{}`."""
    path = tmp_path / "shared.yaml"
    path.write_text("variants:\n  weak: &noise {generator: gaussian, sigma: 0.1}\n"
                    "  strong:\n    <<: *noise\n    sigma: 0.3\n")
    config = load_config(path)
    assert config.variants["weak"].params() == {"sigma": 0.1}
    assert config.variants["strong"].params() == {"sigma": 0.3}
    path.write_text("{}\n")
    assert load_config(path).name == "experiment"


# --------------------------------------------------------------------------- command line


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([ADVPIPE, *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"advpipe {args[0]}: error: "), result.stderr
    return result


def run_main(args: list[str], capsys) -> str:
    """The command line in this process (the same `main`, exit code and stderr; no interpreter start-up)."""
    capsys.readouterr()
    assert cli_main(args) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith(f"advpipe {args[0]}: error: "), stderr
    return stderr


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_alias_bomb_is_one_short_line_and_writes_nothing(tmp_path):
    bomb = write_bytes(tmp_path / "bomb.yaml", alias_bomb())
    start = time.perf_counter()
    result = run_cli(["generate", str(bomb)], tmp_path)
    assert time.perf_counter() - start < 30
    assert len(result.stderr) < 300 and "expands to more than 10000 values" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.yaml"]


def test_cli_empty_config_does_not_generate_from_defaults(tmp_path):
    empty = write_bytes(tmp_path / "empty.yaml", b"")
    result = run_cli(["generate", str(empty)], tmp_path)
    assert "the config is empty" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.yaml"]  # no runs/store from the defaults


@pytest.mark.parametrize("grid, count, match", [
    ("grid.png", "0", r"--grid draws 1 to 64 images \(-n/--count\), got 0"),
    ("grid.png", "100000", r"--grid draws 1 to 64 images \(-n/--count\), got 100000"),
    ("grid.txt", "4", r"--grid .*grid\.txt: give a file name ending in \.png, \.pdf, \.svg"),
    ("folder.png", "4", r"--grid .*folder\.png: is a directory"),
    ("store/manifest.png", "4", r"--grid .*manifest\.png: lies inside the store"),
    ("store/shards/x.svg", "4", r"lies inside the store"),
    ("afile/grid.png", "4", r"cannot be written \(.*afile is not a writable directory\)"),
])
def test_cli_inspect_grid_refuses_bad_targets_and_never_touches_the_store(tmp_path, capsys, grid, count, match):
    write_test_store(tmp_path / "store")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "afile").write_text("a file, not a folder")
    before = tree_digest(tmp_path)
    stderr = run_main(["inspect", str(tmp_path / "store"), "--grid", str(tmp_path / grid), "-n", count], capsys)
    assert re_search(match, stderr), stderr
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("extra, match", [
    (["--grid", "store/sample.png"], r"lies inside the store"),
    (["--batches", "0"], r"--batches must be at least 1, got 0"),
])
def test_cli_sample_refuses_bad_options_before_reading(tmp_path, capsys, monkeypatch, extra, match):
    monkeypatch.chdir(tmp_path)
    write_test_store(tmp_path / "store")
    config = write_bytes(tmp_path / "config.yaml", b"sampler: {ratio: 0.5}\n")
    before = tree_digest(tmp_path)
    stderr = run_main(["sample", "store", "--config", str(config), *extra], capsys)
    assert re_search(match, stderr), stderr
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("command", [
    ["sample", "store", "--config", "MANIFEST"], ["generate", "MANIFEST"], ["run", "MANIFEST"],
    ["train-source", "MANIFEST"], ["train", "MANIFEST", "--method", "clean"],
    ["evaluate", "model.pt", "--store", "store", "--config", "MANIFEST"],
], ids=lambda command: command[0])
def test_cli_store_manifest_given_as_a_config_is_named_in_one_line(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    write_test_store(tmp_path / "store")
    before = tree_digest(tmp_path)
    stderr = run_main([part.replace("MANIFEST", "store/manifest.json") for part in command], capsys)
    assert "store/manifest.json: is a store's manifest, not a config; pass a YAML config" in stderr, stderr
    assert tree_digest(tmp_path) == before


def test_cli_sample_with_the_store_manifest_as_config(tmp_path):
    """The command as a user types it: `advpipe sample STORE --config STORE/manifest.json`."""
    write_test_store(tmp_path / "store")
    result = run_cli(["sample", "store", "--config", "store/manifest.json"], tmp_path)
    assert "is a store's manifest, not a config" in result.stderr and "advpipe sample STORE --config CONFIG" \
        in result.stderr


# --------------------------------------------------------------------------- store paths the file system cannot hold


def long_store_path(tmp: Path, kind: str) -> Path:
    """'long-name': a folder name past NAME_MAX. 'long-path': a path that fits PATH_MAX with a few bytes to spare,
    so its folders and lock file could be made, while the store's temporary files would not fit."""
    name_max, path_max = path_limits(tmp)
    if kind == "long-name":
        return tmp / "runs" / ("n" * (name_max + 45)) / "store"
    deep, target = tmp / "runs", path_max - 20
    while len(os.fsencode(deep)) + 200 + 10 < target:
        deep /= "d" * 199
    return deep / ("s" * (target - len(os.fsencode(deep)) - 1))


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("kind", ["long-name", "long-path"])
@pytest.mark.parametrize("command", ["generate", "run", "convert", "fetch"])
def test_cli_store_path_the_file_system_cannot_hold_is_refused_creating_nothing(tmp_path, capsys, monkeypatch,
                                                                                command, kind):
    monkeypatch.chdir(tmp_path)
    store = long_store_path(tmp_path, kind)
    assert len(os.fsencode(store)) + len("/.writer.lock") < path_limits(tmp_path)[1]  # the directory fits
    if command in ("convert", "fetch"):
        write_test_store(tmp_path / "source")
        args = [command, "source", str(store)] + (["--to", "webdataset"] if command == "convert" else [])
    else:
        raw = digits_config(tmp_path, variants={"gaussian": {"sigma": 0.1}}, limit=32)
        raw["store"]["path"] = str(store)
        write_bytes(tmp_path / "config.yaml", json.dumps(raw).encode())
        args = [command, "config.yaml"]
    before = listing(tmp_path)
    stderr = run_main(args, capsys)
    match = (r"the name 'n+\.\.\.n+ \(\d+ characters\)' is \d+ bytes, more than the \d+ one name may have on "
             r"this file system; choose a shorter" if kind == "long-name" else
             r"would hold paths of \d+ bytes \(.*\.tmp-.*\), more than the \d+ this system allows; choose a shorter "
             r".*: at most \d+ bytes as an absolute path")
    assert re_search(match, stderr), stderr
    assert listing(tmp_path) == before  # not even the store's parent folders


def test_cli_convert_to_a_path_with_a_too_long_name_exits_2(tmp_path):
    """It was exit 1 and an ENAMETOOLONG traceback."""
    write_test_store(tmp_path / "source")
    result = run_cli(["convert", "source", str(long_store_path(tmp_path, "long-name")), "--to", "hdf5"], tmp_path)
    assert "more than the" in result.stderr and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- generation marker, run outputs


@pytest.mark.parametrize("marker", [b"\xff\xfe not UTF-8", b"{not json", b"[1, 2, 3]", b"[" * 100_000])
def test_corrupt_generation_marker_is_a_store_error_and_nothing_is_deleted(tmp_path, marker):
    raw = digits_config(tmp_path, variants={"gaussian": {"sigma": 0.1}}, limit=32)
    store = tmp_path / "store"
    store.mkdir()
    (store / ".generation.json").write_bytes(marker)
    (store / "train-00000.h5").write_bytes(b"a shard of some other run")
    before = tree_digest(store)
    with pytest.raises(StoreError, match=str(store)):
        generate(config_from_dict(raw), progress=False)
    assert tree_digest(store) == before


@pytest.mark.parametrize("marker", [b"\xff\xfe not UTF-8", b"{not json", b"[1, 2, 3]", b"[" * 100_000])
def test_writer_claim_reads_a_corrupt_marker_as_another_configuration(tmp_path, marker):
    (tmp_path / ".generation.json").write_bytes(marker)
    with pytest.raises(StoreError, match=r"an interrupted generation with a different configuration left shards"):
        StoreWriter(tmp_path, "hdf5").claim("0" * 64, force=False, previous=None)
    assert (tmp_path / ".generation.json").read_bytes() == marker


def run_config(tmp: Path, **changes: object) -> dict:
    raw = digits_config(tmp, variants={"gaussian": {"sigma": 0.1}}, limit=32)
    raw["train"] = {"runs_dir": str(tmp / "runs"), "epochs": 1}
    raw["methods"] = {"clean": {}}
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        raw.setdefault(section, {})[key] = value
    return raw


@pytest.mark.parametrize("changes, match", [
    ({"model__checkpoint": "{tmp}/store/model.pt"}, r"model\.checkpoint .*store/model\.pt lies inside store\.path"),
    ({"store__path": "{tmp}/runs/test/clean/store"},
     r"store\.path \(.*clean/store\) lies inside the run folder of method 'clean'"),
    ({"methods__report": {"method": "clean"}}, r"the report folder \(.*report\) lies inside the run folder of method "
                                               r"'report'|the run folder of method 'report' .* lies inside the report"),
    ({"store__path": "{tmp}/a-file"}, r"store\.path .*a-file exists but is not a folder"),
    ({"model__checkpoint": "{tmp}/a-file/model.pt"}, r"model\.checkpoint .*model\.pt cannot be written"),
])
def test_run_checks_every_output_before_training(tmp_path, changes, match):
    (tmp_path / "a-file").write_text("not a folder")
    filled = {key: value.replace("{tmp}", str(tmp_path)) if isinstance(value, str) else value
              for key, value in changes.items()}
    config = config_from_dict(run_config(tmp_path, **filled))
    lines: list[str] = []
    with pytest.raises(ConfigError, match=match):
        run_main_job(config, JobOptions(progress=False), lines.append)
    assert lines == []  # refused before step 1
    assert not list(tmp_path.rglob("*.pt")) and not (tmp_path / "runs").exists()
