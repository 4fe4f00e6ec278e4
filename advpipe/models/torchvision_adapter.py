"""Any torchvision classification model as a SourceModel (`torchvision:<name>`).

Nothing is ever downloaded: models are built with `weights=None`, and a user's
local weights file is loaded with `weights_only=True`. If that file was
trained for another number of classes, the final classifier layer is replaced
by a fresh one of the right size (fine-tuning starts from the rest).

Feature maps come from forward hooks on the model's top-level children (and on
the children of top-level Sequential/ModuleList containers such as `features`).
Of the 4D outputs seen, the last one at each spatial size is kept (one per
resolution level, the way stages are usually cut), classifier-side modules and
adaptive pools are skipped, and the deepest five levels are returned. For
transformer models the maps are whatever 4D tensors their blocks output
(ViT gives only its patch embedding; Swin's maps are channels-last).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torchvision.models as tv_models
from torch import Tensor, nn

from advpipe.errors import ModelError
from advpipe.models.base import SourceModel
from advpipe.models.files import load_tensor_file

log = logging.getLogger(__name__)

PREFIX = "torchvision:"
#: ImageNet statistics: the weights a user brings are almost always ImageNet-trained
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the auxiliary heads only matter for training from scratch at ImageNet scale; keep models simple
EXTRA_KWARGS: dict[str, dict[str, bool]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
HEAD_NAMES = frozenset({"fc", "classifier", "head", "heads", "avgpool", "dropout"})
MAX_LEVELS = 5


def torchvision_names() -> list[str]:
    """Classification architectures torchvision offers (detection/segmentation/video excluded)."""
    return sorted(tv_models.list_models(module=tv_models))


class TorchvisionModel(SourceModel):
    """Wraps `net`; grey inputs are repeated to 3 channels since every torchvision model expects RGB."""

    def __init__(self, name: str, num_classes: int, input_shape: tuple[int, int, int],
                 weights: Path | None = None) -> None:
        channels = input_shape[0]
        if channels not in (1, 3):
            raise ModelError(f"{PREFIX}{name} takes 1 or 3 input channels, not {channels}")
        mean = IMAGENET_MEAN if channels == 3 else (sum(IMAGENET_MEAN) / 3,)
        std = IMAGENET_STD if channels == 3 else (sum(IMAGENET_STD) / 3,)
        super().__init__(num_classes, input_shape, mean=mean, std=std)
        self.arch = PREFIX + name
        if weights is None:
            self.net = _build(name, num_classes)
        else:
            self.net = _build_from_weights(name, Path(weights), num_classes)

    def _prepare(self, x: Tensor) -> Tensor:
        x = self.normalize(x)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def forward(self, x: Tensor) -> Tensor:
        return _logits(self.net(self._prepare(x)))

    def forward_with_features(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        seen: list[Tensor] = []

        def keep(_module: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, Tensor) and output.dim() == 4:
                seen.append(output)

        handles = [module.register_forward_hook(keep) for module in _taps(self.net)]
        try:
            logits = self.forward(x)
        finally:
            for handle in handles:
                handle.remove()
        return _one_per_resolution(seen)[-MAX_LEVELS:], logits


def _build(name: str, num_classes: int) -> nn.Module:
    try:
        builder = tv_models.get_model_builder(name)
    except ValueError:
        raise ModelError(
            f"unknown torchvision model '{name}' (known: {', '.join(torchvision_names())})"
        ) from None
    return builder(weights=None, num_classes=num_classes, **EXTRA_KWARGS.get(name, {}))


def _build_from_weights(name: str, path: Path, num_classes: int) -> nn.Module:
    state = load_tensor_file(path, f"weights file for {PREFIX}{name}")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a state dict of tensors (expected weights for {PREFIX}{name})")
    net = _build(name, num_classes)
    head_name, _ = _final_layer(net)
    if f"{head_name}.weight" not in state:
        raise ModelError(f"{path}: has no '{head_name}.weight'; is it a {PREFIX}{name} state dict?")
    file_classes = int(state[f"{head_name}.weight"].shape[0])
    # A head for another class count is left out, so the net keeps a fresh head of the right size.
    skipped = {f"{head_name}.weight", f"{head_name}.bias"} if file_classes != num_classes else set()
    # Entries of submodules this net does not have (disabled auxiliary heads) are dropped too.
    children = {child for child, _ in net.named_children()}
    state = {key: value for key, value in state.items()
             if key.split(".")[0] in children and key not in skipped}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ModelError(f"{path}: weights do not fit {PREFIX}{name}: {exc}") from None
    missing = sorted(set(missing) - skipped)
    if missing or unexpected:
        raise ModelError(f"{path}: weights do not fit {PREFIX}{name}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if skipped:
        log.info("%s: %d-class head '%s' replaced by a fresh %d-class one",
                 path, file_classes, head_name, num_classes)
    return net


def _final_layer(net: nn.Module) -> tuple[str, nn.Module]:
    """The classifier layer: the last Linear, or the last Conv2d for all-conv nets (SqueezeNet)."""
    for kind in (nn.Linear, nn.Conv2d):
        found = [(name, module) for name, module in net.named_modules() if isinstance(module, kind)]
        if found:
            return found[-1]
    raise ModelError(f"cannot find the classifier layer of {type(net).__name__}")


def _taps(net: nn.Module) -> list[nn.Module]:
    taps: list[nn.Module] = []
    for name, child in net.named_children():
        if name in HEAD_NAMES or isinstance(child, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
            continue
        if isinstance(child, nn.Sequential | nn.ModuleList):
            taps.extend(child.children())
        else:
            taps.append(child)
    return taps


def _one_per_resolution(maps: list[Tensor]) -> list[Tensor]:
    levels: list[Tensor] = []
    for current in maps:
        if levels and levels[-1].shape[-2:] == current.shape[-2:]:
            levels[-1] = current
        else:
            levels.append(current)
    return levels


def _logits(output: object) -> Tensor:
    """GoogLeNet/Inception return named tuples in training mode; keep the main logits."""
    return output if isinstance(output, Tensor) else output.logits  # type: ignore[attr-defined]
