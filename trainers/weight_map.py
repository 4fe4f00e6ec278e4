"""Weight-map training (METHODS.md section 6; seed 004): cross-entropy on a weight-map skeleton.

The weight map is an architecture, not a loss: `advpipe.models.weight_map` holds the
`WeightMap2d` layer and the paper's skeletons as registry architectures
(`wm_<cnn|resnet|densenet>_<smoothing|unsharp>[_alt]`, and `wm_*_conv`, the plain
convolutional twins), so they can be source models and be trained by any method.
This method is the paper's own training of them: cross-entropy on `batch.x` of the
entry's `arch`. Its parameters, when given, pin which variant that must be, so a
config cannot silently train another network:

    methods:
      wm_unsharp: {method: weight_map, arch: wm_cnn_unsharp}
      cnn33:      {method: clean, arch: wm_cnn_conv}            # the CNN it replaces
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from advpipe.batch import Batch
from advpipe.errors import ConfigError, ModelError
from advpipe.models.registry import ARCHITECTURES
from advpipe.models.weight_map import Layout, Reduction, parse_weight_map_arch, weight_map_layers
from advpipe.trainers.baselines import cross_entropy_step
from advpipe.trainers.loop import Method, StepContext

log = logging.getLogger(__name__)

WEIGHT_MAP_ARCHS = tuple(a for a in ARCHITECTURES if (p := parse_weight_map_arch(a)) is not None and p[1])


class WeightMapParams(BaseModel):
    """What the trained architecture must be (paper Tables 1-3); a field left out accepts any."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    skeleton: Literal["cnn", "resnet", "densenet"] | None = None
    reduction: Reduction | None = None
    layout: Layout | None = None


def check_arch(params: WeightMapParams, arch: str) -> None:
    """Refuse an architecture that is not a weight-map skeleton, or not the variant `params` names."""
    parsed = parse_weight_map_arch(arch)
    if parsed is None:
        raise ConfigError(f"weight_map trains a weight-map skeleton, but the architecture is '{arch}'; set the "
                          f"entry's arch to one of {', '.join(WEIGHT_MAP_ARCHS)}")
    skeleton, reduction, layout = parsed
    if reduction is None:
        raise ConfigError(f"'{arch}' is the plain-convolution twin and has no weight-map layer; train it with "
                          "method clean, or pick a wm_* architecture with smoothing or unsharp layers")
    for key, wanted, actual in (("skeleton", params.skeleton, skeleton), ("reduction", params.reduction, reduction),
                                ("layout", params.layout, layout)):
        if wanted is not None and wanted != actual:
            raise ConfigError(f"weight_map.{key} is '{wanted}' but the architecture '{arch}' has {key} '{actual}'; "
                              "make the entry's arch and the method's parameters agree")


class WeightMapMethod(Method):
    """Cross-entropy training of a weight-map skeleton (refuses a model without weight-map layers)."""

    name = "weight_map"
    params_model: ClassVar[type[BaseModel]] = WeightMapParams
    params: WeightMapParams

    def __init__(self, params: WeightMapParams | None = None, **values: Any) -> None:
        super().__init__(params, **values)

    @classmethod
    def build(cls, params: BaseModel, context: Any) -> Method:
        check_arch(params, context.arch)  # type: ignore[arg-type]
        return cls(params)  # type: ignore[arg-type]

    def setup(self, model: nn.Module, device: torch.device) -> None:
        arch = getattr(model, "arch", "")
        layers = weight_map_layers(model)
        if not layers:
            raise ModelError(f"weight_map: model {arch or type(model).__name__} has no WeightMap2d layer; train a "
                             f"weight-map skeleton ({', '.join(WEIGHT_MAP_ARCHS)})")
        if arch:
            check_arch(self.params, arch)
        log.info("weight_map: training %s (%d weight-map layers, %d parameters)", arch or type(model).__name__,
                 len(layers), sum(p.numel() for p in model.parameters()))

    def training_step(self, model: nn.Module, batch: Batch,
                      ctx: StepContext) -> tuple[Tensor, dict[str, Any]]:
        return cross_entropy_step(model, batch)
