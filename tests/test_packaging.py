"""advpipe is the only top-level import name: a user's own pipeline/, stores/ or trainers/ cannot shadow ours."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_has_advpipe_as_its_only_top_level_name(tmp_path: Path) -> None:
    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("advpipe", "pipeline", "stores", "trainers"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("advpipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"advpipe"}
    # the owner's top-level folders are inside the package, with every module
    for module in ("advpipe/pipeline/job.py", "advpipe/pipeline/generators/fgsm.py", "advpipe/stores/manifest.py",
                   "advpipe/trainers/loop.py", "advpipe/sampler/streaming.py"):
        assert module in names


def test_a_users_own_pipeline_stores_trainers_do_not_shadow_ours(tmp_path: Path) -> None:
    for name in ("pipeline", "stores", "trainers"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name} was imported')\n")
    code = ("import advpipe.sampler, advpipe.stores, advpipe.pipeline.job, advpipe.trainers.loop; "
            "print(advpipe.stores.open_store.__module__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "advpipe.stores.store"
    command = Path(sys.executable).parent / "advpipe"
    result = subprocess.run([str(command), "inspect", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "usage: advpipe inspect" in result.stdout
