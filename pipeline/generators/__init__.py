"""Variant generators, one module per variant kind, behind `base.Generator`.

Modules are imported on first use, so validating a config does not import ART.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from advpipe.errors import ConfigError, describe_validation_error

if TYPE_CHECKING:
    from advpipe.config import VariantConfig
    from advpipe.pipeline.generators.base import Generator, GeneratorParams

#: generator name -> "module:Class"
REGISTRY: dict[str, str] = {
    "gaussian": "advpipe.pipeline.generators.gaussian:GaussianGenerator",
    "fgsm": "advpipe.pipeline.generators.fgsm:FGSMGenerator",
    "bim": "advpipe.pipeline.generators.bim:BIMGenerator",
    "pgd": "advpipe.pipeline.generators.pgd:PGDGenerator",
    "deepfool": "advpipe.pipeline.generators.deepfool:DeepFoolGenerator",
    "cw": "advpipe.pipeline.generators.cw:CarliniWagnerGenerator",
    "style": "advpipe.pipeline.generators.style:StyleTransferGenerator",
    "b1": "advpipe.pipeline.generators.shift:ScenarioB1Generator",
    "b2": "advpipe.pipeline.generators.shift:ScenarioB2Generator",
}


def generator_class(name: str) -> type[Generator]:
    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise ConfigError(f"unknown generator '{name}' (known: {known})")
    module_name, class_name = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def generator_name(variant_name: str, variant: VariantConfig) -> str:
    """The generator a variant uses: explicit `generator:`, else the variant's own name."""
    return variant.generator or variant_name


def variant_backend(variant_name: str, variant: VariantConfig) -> str:
    """The backend a variant runs on: explicit `backend:`, else its generator's default (first listed)."""
    return variant.backend or generator_class(generator_name(variant_name, variant)).backends[0]


def validate_variant(variant_name: str, variant: VariantConfig) -> GeneratorParams:
    """Check a variant's generator, backend and parameters; return the typed parameters
    (backend-dependent defaults filled in)."""
    from pydantic import ValidationError

    cls = generator_class(generator_name(variant_name, variant))
    backend = variant_backend(variant_name, variant)
    if backend not in cls.backends:
        raise ConfigError(
            f"backend '{backend}' is not offered by generator "
            f"'{generator_name(variant_name, variant)}' (choose one of: {', '.join(cls.backends)})"
        )
    try:
        params = cls.params_model.model_validate(variant.params())
    except ValidationError as exc:
        raise ConfigError("; ".join(describe_validation_error(exc, noun="parameter"))) from None
    try:
        return cls.resolve_params(params, backend)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
