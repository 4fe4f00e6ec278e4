"""Detector-assisted adversarial training (METHODS.md section 3; detector_assisted_sampling.txt, section 3.1).

Three networks: `P`, the clean source model loaded from its checkpoint and frozen; `T`, the model
the loop trains (same architecture); `H`, a shallow transformer that reads multi-level feature maps
and tells clean images from adversarial ones. Every batch takes two steps:

1. `H` learns, on `P`'s feature maps, to predict the sampler's is-adversarial flag (cross-entropy,
   the batch's clean and adversarial images weighing half each unless `balanced: false`), with its
   own Adam optimiser, stepped inside `training_step`;
2. with `H` frozen, the loop's optimiser updates `T` on
   `alpha * CE(T(x), y) + beta * SmoothL1(H_feat(T's maps), H_feat(P's maps))`,
   so `T` learns to classify while its features stay, in `H`'s eyes, like a clean model's.

    method = DetectorMethod({"levels": "full", "layers": 2}, checkpoint="runs/source_model.pt",
                            variant_names=store.variants)
    fit(fresh_model, method, loader, optim=optim)      # fresh_model: same arch as the checkpoint

(`advpipe train CONFIG --method detector` builds it from the config through `DetectorMethod.build`.)

What a batch holds: by default the config's `sampler` section, as for the `dynamic` baseline: the
paper's dynamic probability with bounded ranges (seed 001, section 3.2; METHODS.md section 2), with
each epoch's per-variant training error fed back when the section says `adaptive: true`. A `ratio`
parameter instead gives what the authors' code ran: that fixed share of stored attacks in every
batch, uniform over the attacks (the paper's "Adv. Data Ratio", 0.25/0.5/0.75).

`H` first standardises each level of `P`'s maps per channel (a BatchNorm without affine
parameters; running statistics at evaluation and when `H` reads `T`'s maps). The paper's ResNet34
hands `H` maps that leave BatchNorm'd blocks; a network without BatchNorm (LeNet) hands it raw
ReLU activations, on which `H` stayed at chance for the whole digits run (train accuracy 48-53%
every epoch, loss ln 2) and so flagged almost every input one way (docs/REPRODUCING.md). `H`'s
Adam learning rate (`detector_lr`) follows the loop's schedule, as the authors stepped both
optimisers with one schedule: with a constant one it is constant, with a cosine one it decays with
`T`'s, so that `H`'s clean/adversarial decision settles instead of swinging with the last batches.

`H`'s embedding brings every chosen level to the grid of the shallow ("low") map, divided into
patches so that at most `max_grid` tokens lie along a side: strided convolutions shrink larger
maps, transposed convolutions enlarge smaller ones, and an adaptive resize absorbs the rounding.
Position embeddings are sized from the maps `P` actually produces at its input size, and are
interpolated when other sizes come in, so any input size works.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from advpipe.batch import Batch
from advpipe.config import SamplerConfig
from advpipe.errors import ConfigError, ModelError, StoreError
from advpipe.models import ModelMeta, SourceModel, load_checkpoint
from advpipe.trainers import distributed
from advpipe.trainers.loop import DataRegime, Method, StepContext, regime_sampler

log = logging.getLogger(__name__)

CLEAN = "clean"


class DetectorParams(BaseModel):
    """Parameters of the `detector` method; the paper's best setting (Table 2) is the default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    levels: Literal["low", "full"] = Field(
        default="full", description="'low': the shallow map only; 'full': every level, centred on the shallow one")
    low_level: int = Field(default=0, ge=0, description="index of the shallow map in features() (0 = shallowest)")
    layers: int = Field(default=2, ge=1, le=8, description="transformer encoder layers (paper: 2, 4, 8)")
    dim: int = Field(default=64, ge=8, description="token width")
    heads: int = Field(default=4, ge=1)
    mlp_ratio: int = Field(default=2, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    max_grid: int = Field(default=8, ge=1, description="at most this many tokens along a side, per level")
    alpha: float = Field(default=1.0, ge=0.0, description="weight of T's cross-entropy")
    beta: float = Field(default=1.0, ge=0.0, description="weight of the SmoothL1 feature-matching term")
    detector_lr: float = Field(default=1e-3, gt=0.0, description="Adam learning rate of the detector head")
    balanced: bool = Field(default=True, description="weigh clean and adversarial images equally in each batch's "
                           "detector loss, whatever the batch's share (false: plain cross-entropy, as the authors)")
    ratio: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="a fixed share of stored attacks per batch, uniform over them (the authors' code; the paper's "
                    "'Adv. Data Ratio' 0.25/0.5/0.75); unset: the config's sampler section (the paper's dynamic "
                    "ranges), or half with data 'both'")
    checkpoint: Path | None = Field(default=None, description="clean checkpoint of P (default: model.checkpoint)")

    @model_validator(mode="after")
    def _consistent(self) -> DetectorParams:
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of heads ({self.heads})")
        if self.alpha == 0 and self.beta == 0:
            raise ValueError("alpha and beta are both 0: T would get no loss")
        return self


def load_reference(path: Path, *, what: str, arch: str | None = None, num_classes: int | None = None,
                   input_shape: Sequence[int] | None = None) -> tuple[SourceModel, ModelMeta]:
    """Load a frozen model from a clean checkpoint; refuse one that does not fit the data or the model."""
    model, meta = load_checkpoint(path, arch=arch)
    check_meta(meta, path, what=what, arch=arch, num_classes=num_classes, input_shape=input_shape)
    model.requires_grad_(False)
    return model, meta


def check_meta(meta: ModelMeta, path: Path, *, what: str, arch: str | None = None, num_classes: int | None = None,
               input_shape: Sequence[int] | None = None) -> None:
    hint = "point the method's checkpoint at a model trained on this data, or retrain it"
    if arch is not None and meta.arch != arch:
        raise ModelError(f"{path}: {what} checkpoint holds a '{meta.arch}' model but the trained model is "
                         f"'{arch}'; {hint}")
    if num_classes is not None and meta.num_classes != int(num_classes):
        raise ModelError(f"{path}: {what} checkpoint has {meta.num_classes} classes but the data/model has "
                         f"{num_classes}; {hint}")
    if input_shape is not None and tuple(meta.input_shape) != tuple(int(v) for v in input_shape):
        raise ModelError(f"{path}: {what} checkpoint takes inputs (C, H, W) = {tuple(meta.input_shape)} but the "
                         f"data/model has {tuple(int(v) for v in input_shape)}; {hint}")


def check_model(model: nn.Module, meta: ModelMeta, path: Path, what: str) -> SourceModel:
    """The trained model must be a SourceModel of the checkpoint's architecture, classes and input shape."""
    if not isinstance(model, SourceModel):
        raise ModelError(f"the {what} method needs an advpipe SourceModel (with features()), "
                         f"got {type(model).__name__}")
    check_meta(meta, path, what=what, arch=model.arch, num_classes=model.num_classes, input_shape=model.input_shape)
    return model


# --------------------------------------------------------------------------------------------- the head


def _resize(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bring a map to `size`: average pooling when shrinking, bilinear when (partly) enlarging."""
    if tuple(maps.shape[-2:]) == size:
        return maps
    if maps.shape[-2] >= size[0] and maps.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(maps, size)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def _embedding(channels: int, size: tuple[int, int], grid: tuple[int, int], dim: int) -> nn.Module:
    """Strided conv for a map at least as large as the grid, transposed conv for a smaller one."""
    (height, width), (rows, cols) = size, grid
    if height >= rows and width >= cols:
        kernel = (max(1, height // rows), max(1, width // cols))
        return nn.Conv2d(channels, dim, kernel, stride=kernel)
    kernel = (max(1, math.ceil(rows / height)), max(1, math.ceil(cols / width)))
    return nn.ConvTranspose2d(channels, dim, kernel, stride=kernel)


class MapNorm(nn.BatchNorm2d):
    """Per-channel standardisation of one level of feature maps: a BatchNorm2d without affine parameters.

    Batch statistics while `H` trains, running statistics otherwise. A training batch with one value
    per channel (one image of a 1x1 map) is normalised with the running statistics and left out of them.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, affine=False)

    def forward(self, maps: Tensor) -> Tensor:
        if self.training and maps.shape[0] * maps.shape[2] * maps.shape[3] < 2:
            return F.batch_norm(maps, self.running_mean, self.running_var, training=False, eps=self.eps)
        return super().forward(maps)


class DetectorHead(nn.Module):
    """Multi-level feature maps -> (2-way clean/adversarial logits, class-token feature).

    Reads `maps[levels[i]]` of a `features()` list; `levels[0]` is the centre whose size sets the
    token grid (one token per `patch` x `patch` block of it). Each level is standardised per channel
    (`MapNorm`) before its embedding.
    """

    def __init__(self, shapes: Sequence[tuple[int, int, int]], levels: Sequence[int], *, dim: int = 64,
                 heads: int = 4, layers: int = 2, mlp_ratio: int = 2, dropout: float = 0.0,
                 max_grid: int = 8) -> None:
        super().__init__()
        self.levels = tuple(int(level) for level in levels)
        self.shapes = tuple(tuple(int(v) for v in shape) for shape in shapes)
        _, height, width = self.shapes[self.levels[0]]
        self.patch = max(1, math.ceil(max(height, width) / max_grid))
        grid = self.grid((height, width))
        self.norms = nn.ModuleList(MapNorm(self.shapes[level][0]) for level in self.levels)
        self.embed = nn.ModuleList(
            _embedding(self.shapes[level][0], self.shapes[level][1:], grid, dim) for level in self.levels)
        self.positions = nn.Parameter(torch.zeros(len(self.levels), dim, *grid))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_position = nn.Parameter(torch.zeros(1, 1, dim))
        for param in (self.positions, self.cls_token, self.cls_position):
            nn.init.trunc_normal_(param, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * mlp_ratio, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, 2)

    @classmethod
    def from_maps(cls, maps: Sequence[Tensor], levels: Literal["low", "full"] = "full", low_level: int = 0,
                  **kwargs: Any) -> DetectorHead:
        """A head sized from example feature maps (a `features()` list, any batch size)."""
        if not maps or any(m.dim() != 4 for m in maps):
            raise ModelError("the detector head needs 4D feature maps (N, C, H, W) from features()")
        if low_level >= len(maps):
            raise ConfigError(f"detector low_level is {low_level} but the model has only {len(maps)} "
                              f"feature levels (0-{len(maps) - 1})")
        chosen = [low_level] if levels == "low" else [low_level, *(i for i in range(len(maps)) if i != low_level)]
        return cls([tuple(m.shape[1:]) for m in maps], chosen, **kwargs)

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """Token grid for a centre map of `size`."""
        return math.ceil(size[0] / self.patch), math.ceil(size[1] / self.patch)

    def tokens(self, grid: tuple[int, int]) -> int:
        """Sequence length (class token included) for a token grid."""
        return 1 + len(self.levels) * grid[0] * grid[1]

    def forward(self, maps: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        if len(maps) <= max(self.levels):
            raise ModelError(f"the detector head reads feature level {max(self.levels)} but got "
                             f"{len(maps)} maps; was it built for another architecture?")
        grid = self.grid(tuple(maps[self.levels[0]].shape[-2:]))
        positions = self.positions
        if tuple(positions.shape[-2:]) != grid:  # another input size than the one the head was sized for
            positions = F.interpolate(positions, size=grid, mode="bicubic", align_corners=False)
        parts = []
        for index, (level, norm, embed) in enumerate(zip(self.levels, self.norms, self.embed, strict=True)):
            embedded = _resize(embed(norm(maps[level])), grid) + positions[index]
            parts.append(embedded.flatten(2).transpose(1, 2))
        batch = parts[0].shape[0]
        cls = (self.cls_token + self.cls_position).expand(batch, -1, -1).to(parts[0].dtype)
        encoded = self.encoder(torch.cat([cls, *parts], dim=1))
        feature = self.norm(encoded[:, 0])
        return self.classifier(feature), feature


# ------------------------------------------------------------------------------------------- the method


class DetectorMethod(Method):
    """Two-stage detector-assisted training; `P` and `H` are this method's own modules."""

    name = "detector"
    params_model: ClassVar[type[BaseModel]] = DetectorParams
    default_data: ClassVar[DataRegime] = "sampler"  # the config's sampler section, as for `dynamic`

    def __init__(self, params: DetectorParams | dict[str, Any] | None = None, *,
                 checkpoint: str | Path | None = None, variant_names: Sequence[str] | None = None,
                 arch: str | None = None, num_classes: int | None = None,
                 input_shape: Sequence[int] | None = None) -> None:
        """Load and freeze `P`, size `H` from `P`'s feature maps; every mismatch is raised here.

        `checkpoint` is the fallback when the parameters name none (the config's model.checkpoint);
        `variant_names` the store's variants (clean first); `arch`, `num_classes` and `input_shape`
        (C, H, W), when given, are what the checkpoint must match.
        """
        super().__init__(params)
        self.params: DetectorParams
        path = self.params.checkpoint or checkpoint
        if path is None:
            raise ConfigError(f"method '{self.name}' needs the clean model P, and there is no checkpoint: train the "
                              "source model first, or set model.checkpoint or the method's 'checkpoint' parameter")
        self.checkpoint = Path(path)
        if variant_names is not None and not [name for name in variant_names if name != CLEAN]:
            raise StoreError(f"method '{self.name}' trains a clean/adversarial detector, but the store holds only "
                             f"the clean variant; add adversarial variants (e.g. fgsm, bim) and regenerate it")
        self.reference, self.meta = load_reference(self.checkpoint, what="detector P", arch=arch,
                                                   num_classes=num_classes, input_shape=input_shape)
        with torch.no_grad():
            maps = self.reference.features(torch.zeros(1, *self.meta.input_shape))
        p = self.params
        self.head = DetectorHead.from_maps(maps, p.levels, p.low_level, dim=p.dim, heads=p.heads, layers=p.layers,
                                           mlp_ratio=p.mlp_ratio, dropout=p.dropout, max_grid=p.max_grid)
        self.head_optimizer = torch.optim.Adam(self.head.parameters(), lr=p.detector_lr)
        log.info("detector: P = %s (%s) from %s; head over %d level(s) %s, %d tokens, %d layers, %d parameters",
                 self.meta.arch, self.meta.fingerprint[:12], self.checkpoint, len(self.head.levels),
                 [tuple(maps[level].shape[1:]) for level in self.head.levels],
                 self.head.tokens(tuple(self.head.positions.shape[-2:])), p.layers,
                 sum(q.numel() for q in self.head.parameters()))

    @classmethod
    def build(cls, params: BaseModel, context: Any) -> DetectorMethod:
        """From validated parameters and the run's MethodContext (store variants, source model, data shape)."""
        return cls(params, checkpoint=context.checkpoint, variant_names=context.variant_names, arch=context.arch,
                   num_classes=context.num_classes, input_shape=context.input_shape)

    def sampler_config(self, data: DataRegime, base: SamplerConfig, attacks: list[str]) -> SamplerConfig:
        """The config's sampler section (data 'sampler', the default); with `ratio`, or data 'both', a fixed
        share of stored attacks, uniform over them (the authors' code); 'clean'/'adversarial' as for any method."""
        ratio = self.params.ratio
        if data == "sampler" and ratio is None:
            return base
        if data in ("sampler", "both"):
            config = regime_sampler("both", base, attacks)
            return SamplerConfig.model_validate({**config.model_dump(), "ratio": 0.5 if ratio is None else ratio})
        return regime_sampler(data, base, attacks)

    def modules(self) -> dict[str, nn.Module]:
        """The method's own networks, for checkpoints: P (frozen) and the detector head H."""
        return {"reference": self.reference, "detector": self.head}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"detector": self.head_optimizer}

    def setup(self, model: nn.Module, device: torch.device) -> None:
        check_model(model, self.meta, self.checkpoint, "detector")
        self.reference.to(device).eval()
        self.head.to(device)
        distributed.broadcast_module(self.head)  # every rank starts from rank 0's head

    def training_step(self, model: nn.Module, batch: Batch,
                      ctx: StepContext) -> tuple[Tensor, dict[str, Any]]:
        flags = batch.is_adv.long()
        with torch.no_grad():
            reference_maps = self.reference.features(batch.x)
        self._follow_schedule(ctx.optimizer)
        detector_loss, detector_acc = self._train_head(reference_maps, flags)
        # Stage 2: H frozen; T learns the labels and to look, to H, like P.
        self.head.eval()
        self.head.requires_grad_(False)
        with torch.no_grad():
            _, target = self.head(reference_maps)
        maps, logits = model.forward_with_features(batch.x)
        _, feature = self.head(maps)
        ce = F.cross_entropy(logits, batch.y)
        match = F.smooth_l1_loss(feature.float(), target.float())
        loss = self.params.alpha * ce + self.params.beta * match
        correct = logits.argmax(dim=1) == batch.y
        return loss, {"acc": correct.float().mean().item(), "correct": correct, "ce": ce.item(),
                      "match": match.item(), "det_loss": detector_loss, "det_acc": detector_acc,
                      "adv_fraction": flags.float().mean().item()}

    def _follow_schedule(self, optimizer: torch.optim.Optimizer) -> None:
        """H's learning rate: detector_lr times the share of its initial rate the loop's optimiser is at now."""
        group = optimizer.param_groups[0]
        initial = group.get("initial_lr")  # set by the loop's scheduler; absent: no schedule, a constant rate
        scale = group["lr"] / initial if initial else 1.0
        for head_group in self.head_optimizer.param_groups:
            head_group["lr"] = self.params.detector_lr * scale

    def _train_head(self, maps: list[Tensor], flags: Tensor) -> tuple[float, float]:
        """Stage 1: one step of H on P's maps towards the is-adversarial flags; (loss, accuracy before it)."""
        self.head.train()
        self.head.requires_grad_(True)
        logits, _ = self.head(maps)
        weight = None
        if self.params.balanced:  # each class present weighs half of the loss; a batch of one class is plain CE
            counts = torch.bincount(flags, minlength=2).float()
            weight = counts.sum() / (2 * counts) if bool((counts > 0).all()) else None
        loss = F.cross_entropy(logits.float(), flags, weight=weight)
        self.head_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients([self.head])  # the loop averages T's gradients, not this inner step's
        self.head_optimizer.step()
        self.head_optimizer.zero_grad(set_to_none=True)
        distributed.broadcast_buffers(self.head)  # rank 0's input statistics on every rank, as DDP keeps BatchNorm's
        return loss.item(), (logits.argmax(dim=1) == flags).float().mean().item()

    def on_epoch_end(self, model: nn.Module, epoch: int, record: dict[str, Any]) -> None:
        policy = getattr(self.loader, "policy", None)
        if policy is not None and policy.adaptive:  # as `dynamic`: the epoch's per-variant error moves the weights
            errors = {name: 1.0 - record[f"train_acc/{name}"] for name in policy.names
                      if f"train_acc/{name}" in record}
            self.loader.update(errors)
            record["adaptive_errors"] = errors
        if "train_det_acc" in record:
            log.info("detector epoch %d: detector accuracy %.2f%% (loss %.4f), feature match %.4f", epoch + 1,
                     100 * record["train_det_acc"], record["train_det_loss"], record["train_match"])

    def teardown(self, model: nn.Module) -> None:
        self.head.requires_grad_(True)
