"""One-file model checkpoints that load with `torch.load(weights_only=True)`.

The file is a dict of plain types only: {"format", "meta" (a JSON string),
"state_dict"}, so loading it can never run code. The meta records what the
model is (arch, classes, input shape), a fingerprint of its weights (stores
record it, so variants are tied to the exact model that made them) and how it
was trained.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from advpipe.errors import SHOWN_CHARS, ModelError, shorten, shown
from advpipe.io import atomic_path, canonical_json
from advpipe.models.base import SourceModel
from advpipe.models.files import load_tensor_file
from advpipe.models.registry import build_model

CHECKPOINT_FORMAT = "advpipe-model/1"
SHOWN = 3  # how many offending keys an error message lists
#: bounds on what a checkpoint may describe, checked before the model is built (ImageNet-21k has 21,841
#: classes; inputs are images of at most 4096 pixels a side with up to 4 channels)
MAX_CLASSES = 100_000
MAX_INPUT_SIDE = 4096
MAX_CHANNELS = 4
MAX_META_CHARS = 16 << 20


@dataclass(frozen=True)
class ModelMeta:
    arch: str
    num_classes: int
    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]
    fingerprint: str
    training: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return canonical_json(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ModelMeta:
        """Parse and check the metadata: types, and bounds (classes, input size) that keep building the
        model it describes cheap, so a hostile file cannot make the loader allocate terabytes."""
        if not isinstance(text, str) or len(text) > MAX_META_CHARS:
            raise ValueError(f"metadata must be a JSON string of at most {MAX_META_CHARS} characters")
        raw = json.loads(text)  # RecursionError on deep nesting: the caller refuses it
        if not isinstance(raw, dict):
            raise ValueError(f"metadata must be a JSON object, got {type(raw).__name__}")
        num_classes = _bounded_int(raw["num_classes"], "num_classes", 1, MAX_CLASSES)
        names = raw["class_names"]
        if not isinstance(names, list) or len(names) != num_classes or not all(isinstance(n, str) for n in names):
            raise ValueError(f"class_names must be a list of {num_classes} strings, got {shown(names)}")
        shape = raw["input_shape"]
        if not isinstance(shape, list) or len(shape) != 3:
            raise ValueError(f"input_shape must be [channels, height, width], got {shown(shape)}")
        input_shape = (_bounded_int(shape[0], "input channels", 1, MAX_CHANNELS),
                       _bounded_int(shape[1], "input height", 1, MAX_INPUT_SIDE),
                       _bounded_int(shape[2], "input width", 1, MAX_INPUT_SIDE))
        training = raw.get("training") or {}
        if not isinstance(raw["arch"], str) or not isinstance(raw["fingerprint"], str) or not isinstance(training,
                                                                                                         dict):
            raise ValueError("arch and fingerprint must be strings, training an object")
        return cls(arch=shorten(raw["arch"]), num_classes=num_classes, class_names=tuple(names),
                   input_shape=input_shape, fingerprint=raw["fingerprint"], training=training)


def _bounded_int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} must be an integer in [{low}, {high}], got {shown(value)}")
    return value


def state_dict_fingerprint(state: Mapping[str, Tensor]) -> str:
    """sha256 over sorted (name, dtype, shape, raw bytes): identical weights, identical hash."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    return state_dict_fingerprint(model.state_dict())


def save_checkpoint(path: str | Path, model: SourceModel, class_names: Sequence[str],
                    training: dict[str, Any]) -> ModelMeta:
    """Write `model` atomically to `path`; `training` is free-form JSON (dataset fingerprint, accuracy...)."""
    path = Path(path)
    if len(class_names) != model.num_classes:
        raise ModelError(f"{path}: {len(class_names)} class names given for a model with "
                         f"{model.num_classes} classes")
    state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    meta = ModelMeta(arch=model.arch, num_classes=model.num_classes,
                     class_names=tuple(str(name) for name in class_names),
                     input_shape=model.input_shape,  # type: ignore[arg-type]
                     fingerprint=state_dict_fingerprint(state), training=dict(training))
    try:
        meta_json = meta.to_json()
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{path}: training info must be plain JSON (no NaN): {exc}") from None
    try:
        with atomic_path(path) as tmp:
            torch.save({"format": CHECKPOINT_FORMAT, "meta": meta_json, "state_dict": state}, tmp)
    except OSError as exc:
        raise ModelError(f"{path}: cannot write the checkpoint here ({exc.strerror or exc}); "
                         "choose a writable model.checkpoint") from None
    return meta


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu",
                    arch: str | None = None) -> tuple[SourceModel, ModelMeta]:
    """Rebuild the saved model in eval mode on `device`; `arch`, if given, is the one the caller expects."""
    path = Path(path)
    payload = load_tensor_file(path, "model checkpoint",
                               "train the source model first or fix model.checkpoint in the config")
    meta, state = _unpack(path, payload)
    if arch is not None and meta.arch != arch:
        raise ModelError(f"{path}: checkpoint holds a '{meta.arch}' model but '{arch}' is expected; "
                         "retrain the source model or point model.checkpoint at the right file")
    try:
        model = build_model(meta.arch, meta.num_classes, meta.input_shape)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
    _check_fits(path, meta.arch, model.state_dict(), state)
    model.load_state_dict(state)
    if state_dict_fingerprint(state) != meta.fingerprint:
        raise ModelError(f"{path}: weights do not match the fingerprint recorded in the checkpoint "
                         "(the file was corrupted or edited); retrain or restore it")
    return model.to(device).eval(), meta


def check_compatible(meta: ModelMeta, num_classes: int, image_shape_hwc: Sequence[int]) -> None:
    """Refuse a model whose classes or input shape differ from the data it is about to see."""
    height, width, channels = (int(v) for v in image_shape_hwc)
    expected = (channels, height, width)
    if meta.num_classes != num_classes:
        raise ModelError(f"model '{meta.arch}' has {meta.num_classes} classes but the data has "
                         f"{num_classes}; retrain the source model on this data")
    if tuple(meta.input_shape) != expected:
        raise ModelError(f"model '{meta.arch}' takes inputs of shape (C, H, W) = {meta.input_shape} but "
                         f"the images are {expected}; set source.image_size/channels to match or "
                         "retrain the source model")


def _unpack(path: Path, payload: Any) -> tuple[ModelMeta, dict[str, Tensor]]:
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        hint = (" (it looks like a bare state dict)"
                if isinstance(payload, dict) and payload and all(isinstance(v, Tensor)
                                                                 for v in payload.values()) else "")
        raise ModelError(f"{path}: not an advpipe model checkpoint (format {CHECKPOINT_FORMAT}){hint}; "
                         "create it with advpipe.models.save_checkpoint / the train-source step")
    try:
        meta = ModelMeta.from_json(payload["meta"])
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        problem = "nested too deeply" if isinstance(exc, RecursionError) else shorten(str(exc), 2 * SHOWN_CHARS)
        raise ModelError(f"{path}: checkpoint metadata is unreadable ({problem}); retrain the model") from None
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelError(f"{path}: checkpoint has no state dict of tensors; retrain the model")
    return meta, state


def _check_fits(path: Path, arch: str, expected: Mapping[str, Tensor],
                found: Mapping[str, Tensor]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    reshaped = sorted(name for name in set(expected) & set(found)
                      if expected[name].shape != found[name].shape)
    if missing or unexpected or reshaped:
        details = "; ".join(f"{label}: {', '.join(names[:SHOWN])}{' ...' if len(names) > SHOWN else ''}"
                            for label, names in (("missing", missing), ("unexpected", unexpected),
                                                 ("wrong shape", reshaped)) if names)
        raise ModelError(f"{path}: the file says its model is '{arch}' but its weights do not fit a "
                         f"'{arch}' model ({details}); they come from another architecture. "
                         "Retrain the source model or fix the checkpoint")
