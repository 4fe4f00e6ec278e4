"""The command line as a person uses it: help, exit codes, messages naming the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import digits_config, write_test_store
from PIL import Image

from advpipe.cli import COMMANDS, main

ADVPIPE = str(Path(sys.executable).parent / "advpipe")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([ADVPIPE, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_help_explains_every_command():
    result = run("--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout
        sub = run(name, "--help")
        assert sub.returncode == 0 and "usage: advpipe " + name in sub.stdout


def drawn_fraction(path: Path) -> float:
    """Share of a picture's pixels that are not the white background."""
    with Image.open(path) as picture:
        return float((np.asarray(picture.convert("L")) < 250).mean())


def test_inspect_prints_a_card_and_draws_a_grid(tmp_path, capsys):
    write_test_store(tmp_path / "store")
    assert main(["inspect", str(tmp_path / "store"), "--grid", str(tmp_path / "grid.png"), "-n", "3"]) == 0
    out = capsys.readouterr().out
    assert "precision float16" in out and "noise" in out and "tiny" in out and "train=70" in out
    with Image.open(tmp_path / "grid.png") as picture:
        assert picture.format == "PNG"
        assert picture.size == (650, 390)  # 3 rows; clean + 2 variants x (image, difference): 1.3 in each at 100 dpi
    assert drawn_fraction(tmp_path / "grid.png") > 0.3  # the cells hold pictures, not empty axes


def damage(shard: Path, how: str) -> None:
    data = shard.read_bytes()
    shard.write_bytes(data[:-100] if how == "truncate" else data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])


@pytest.mark.parametrize(("command", "how"), [("inspect", "truncate"), ("sample", "flip"), ("verify", "flip")])
def test_a_corrupt_store_exits_3_naming_the_shard(tmp_path, command, how):
    """Exit 3 means 'the store is damaged' for every command that reads one, not only for verify."""
    write_test_store(tmp_path / "store")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"sampler": {"batch_size": 16}}))
    extra = {"inspect": [], "sample": ["--config", str(config)], "verify": []}[command]
    assert run(command, str(tmp_path / "store"), *extra).returncode == 0
    damage(tmp_path / "store" / "train" / "train-00001.h5", how)
    result = run(command, str(tmp_path / "store"), *extra)
    assert result.returncode == 3, result.stderr
    assert "train-00001.h5" in result.stderr and "Traceback" not in result.stderr


def test_convert_then_verify(tmp_path):
    write_test_store(tmp_path / "store")
    assert main(["convert", str(tmp_path / "store"), str(tmp_path / "wds"), "--to", "webdataset"]) == 0
    assert main(["verify", str(tmp_path / "wds")]) == 0
    assert main(["convert", str(tmp_path / "store"), str(tmp_path / "wds"), "--to", "webdataset"]) == 2


def test_config_typo_names_the_key_and_file(tmp_path):
    raw = digits_config(tmp_path)
    raw["train_source"]["epohcs"] = 3
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = run("train-source", str(path))
    assert result.returncode == 2
    assert "train_source.epohcs" in result.stderr and "typo.yaml" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args,message", [
    (["inspect", "/nonexistent/store"], "no such store directory"),
    (["generate", "/nonexistent/config.yaml"], "config file not found"),
    (["train-source", "{config}", "--device", "cuda:999"], "cuda:999"),  # an index no machine has
])
def test_bad_arguments_fail_cleanly(tmp_path, args, message):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(digits_config(tmp_path), sort_keys=False))
    result = run(*[a.format(config=config) for a in args])
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_train_source_from_the_command_line(tmp_path):
    raw = digits_config(tmp_path, limit=None)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = run("train-source", str(path))
    assert result.returncode == 0, result.stderr
    accuracy = float(result.stdout.rsplit("test accuracy", 1)[1])
    assert accuracy > 0.9 and (tmp_path / "model.pt").is_file()


def test_sample_shows_the_policy(tmp_path):
    write_test_store(tmp_path / "store")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"sampler": {"ratio": [0.4, 0.6], "weights": {"noise": 1, "tiny": [1, 3]},
                                                  "batch_size": 16, "redraw": "batch"}}))
    result = run("sample", str(tmp_path / "store"), "--config", str(config), "--batches", "8",
                 "--grid", str(tmp_path / "g.png"))
    assert result.returncode == 0, result.stderr
    assert "noise" in result.stdout and "tiny" in result.stdout and "clean" in result.stdout
    with Image.open(tmp_path / "g.png") as picture:
        assert picture.format == "PNG" and picture.size == (1280, 360)  # 16 images: 2 rows of 8
    assert drawn_fraction(tmp_path / "g.png") > 0.3
    config.write_text(yaml.safe_dump({"sampler": {"weights": {"fgsm": 1}}}))
    result = run("sample", str(tmp_path / "store"), "--config", str(config))
    assert result.returncode == 2 and "fgsm" in result.stderr
