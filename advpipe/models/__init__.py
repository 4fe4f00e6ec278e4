"""Source classifiers on [0, 1] inputs, and their checkpoints.

Every model is a `SourceModel`: it normalises inside, returns logits from
`forward` and exposes `features(x)`, the intermediate feature maps shallow to
deep. Build one with `build_model(arch, num_classes, input_shape)`; save and
restore trained ones with `save_checkpoint` / `load_checkpoint`.
"""

from advpipe.models.base import SourceModel, StagedModel
from advpipe.models.checkpoint import (
    CHECKPOINT_FORMAT,
    ModelMeta,
    check_compatible,
    load_checkpoint,
    model_fingerprint,
    save_checkpoint,
    state_dict_fingerprint,
)
from advpipe.models.registry import ARCHITECTURES, build_model
from advpipe.models.torchvision_adapter import torchvision_names

__all__ = [
    "ARCHITECTURES",
    "CHECKPOINT_FORMAT",
    "ModelMeta",
    "SourceModel",
    "StagedModel",
    "build_model",
    "check_compatible",
    "load_checkpoint",
    "model_fingerprint",
    "save_checkpoint",
    "state_dict_fingerprint",
    "torchvision_names",
]
