"""Library versions recorded in manifests and fingerprints, so a store says what made it."""

from __future__ import annotations

import platform
from functools import cache
from importlib import metadata

PACKAGES = ("advpipe", "torch", "torchvision", "adversarial-robustness-toolbox", "numpy", "h5py", "webdataset")


@cache
def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions
