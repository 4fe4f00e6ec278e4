"""`advpipe run CONFIG`: the main job end to end, reuse of up-to-date steps, and retraining of a changed method only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import digits_config

ADVPIPE = str(Path(sys.executable).parent / "advpipe")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def small_job(root: Path) -> dict:
    raw = digits_config(root, variants={"fgsm": {"eps": 0.15}, "b2": {}}, limit=240, shard_size=128)
    raw["generation"] = {"batch_size": 64, "cluster": "inline"}
    raw["train_source"] = {**raw["train_source"], "epochs": 4}
    raw["train"] = {"epochs": 2, "batch_size": 32, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0,
                    "runs_dir": str(root / "runs"), "tensorboard": False}
    raw["methods"] = {"clean": {}, "adversarial": {"ratio": 0.5}, "calibrater": {"variants": ["b2"]}}
    raw["evaluation"] = {"measures": ["variants", "fgsm", "minimal_fgsm", "gaussian_noise", "calibrated"],
                         "images": 40, "fgsm_eps": [0.1], "gaussian_sigmas": [0.1], "noise_copies": 2}
    return raw


@pytest.mark.slow
def test_main_job_trains_evaluates_and_reports_then_reuses_what_is_up_to_date(tmp_path: Path) -> None:
    raw = small_job(tmp_path)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(raw))
    first = subprocess.run([ADVPIPE, "run", str(config), "--device", "cpu"], env=ENV, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    for step in range(1, 7):
        assert f"[{step}/6]" in first.stdout
    report = json.loads((tmp_path / "runs" / "test" / "report" / "report.json").read_text())
    assert set(report["models"]) == {"clean", "adversarial", "calibrater"}
    adversarial, clean = report["models"]["adversarial"], report["models"]["clean"]
    assert adversarial["method"] == "adversarial" and set(adversarial["variant_accuracy"]) >= {"fgsm", "b2"}
    assert "calibrated" in report["models"]["calibrater"] and "calibrated" not in clean
    assert (tmp_path / "runs" / "test" / "report" / "report.md").is_file()
    assert "| clean |" in first.stdout or "clean" in first.stdout.split("[6/6]")[1]  # the headline table

    again = subprocess.run([ADVPIPE, "run", str(config), "--device", "cpu"], env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = again.stdout.splitlines()
    assert sum(line.startswith("[4/6]") and "up-to-date" in line for line in lines) == 3
    assert sum(line.startswith("[5/6]") and line.endswith("up to date") for line in lines) == 3

    raw["methods"]["adversarial"] = {"ratio": 0.8}  # a changed method setting retrains that method only
    config.write_text(yaml.safe_dump(raw))
    changed = subprocess.run([ADVPIPE, "run", str(config), "--device", "cpu"], env=ENV, capture_output=True,
                             text=True)
    assert changed.returncode == 0, changed.stderr[-3000:]
    lines = changed.stdout.splitlines()
    assert any(line.startswith("[4/6]") and "adversarial: trained" in line for line in lines)
    assert sum(line.startswith("[4/6]") and "up-to-date" in line for line in lines) == 2
    assert sum(line.startswith("[5/6]") and line.endswith("up to date") for line in lines) == 2
    run = json.loads((tmp_path / "runs" / "test" / "adversarial" / "run.json").read_text())
    assert run["params"]["ratio"] == 0.8 and run["status"] == "finished"
