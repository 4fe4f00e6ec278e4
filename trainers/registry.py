"""Training methods by name, each with its own typed parameters, as generators are.

    methods:
      adversarial: {ratio: 0.5}
      detector: {layers: 4, levels: low, augment: true}
      bang_cifar: {method: bang, preset: cifar10}      # one method twice, under two names

An entry's shared options (`method`, `augment`, `data`, `arch`; see config.MethodConfig) are the
loop's; every other key is the method's own parameter, validated by its `params_model`, so an
unknown key names the method and the key. Modules are imported only when a method is used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from advpipe.config import MethodConfig
from advpipe.errors import ConfigError
from advpipe.trainers.loop import method_params

REGISTRY: dict[str, str] = {
    "clean": "advpipe.trainers.baselines:CleanMethod",
    "adversarial": "advpipe.trainers.baselines:AdversarialMethod",
    "dynamic": "advpipe.trainers.baselines:DynamicMethod",
    "detector": "advpipe.trainers.detector:DetectorMethod",
    "calibrater": "advpipe.trainers.calibrater:CalibraterMethod",
    "bang": "advpipe.trainers.bang:BangMethod",
    "perturbation_bias": "advpipe.trainers.perturbation_bias:PerturbationBiasMethod",
    "weight_map": "advpipe.trainers.weight_map:WeightMapMethod",
}


@dataclass(frozen=True)
class MethodContext:
    """What a method may need to build itself: the store's variants and the source model it came from."""

    variant_names: list[str]  # clean first: a batch's variant id indexes this list
    variant_kinds: dict[str, str]  # name -> "attack" | "shift"
    checkpoint: Path | None  # the source model (detector P, calibrater main model)
    arch: str
    num_classes: int
    input_shape: tuple[int, int, int]


def method_name(entry_name: str, entry: MethodConfig) -> str:
    return entry.method or entry_name


def method_class(name: str) -> type:
    if name not in REGISTRY:
        raise ConfigError(f"unknown training method '{name}' (choose one of: {', '.join(sorted(REGISTRY))})")
    module, _, attribute = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def validate_method(entry_name: str, entry: MethodConfig) -> BaseModel:
    """The method's typed parameters for a config entry; ConfigError naming the method and key otherwise."""
    name = method_name(entry_name, entry)
    return method_params(name, method_class(name).params_model, entry.params())


def build_method(entry_name: str, entry: MethodConfig, context: MethodContext) -> Any:
    """A ready Method for a config entry (its own checks against the store and model happen here)."""
    cls = method_class(method_name(entry_name, entry))
    return cls.build(validate_method(entry_name, entry), context)
