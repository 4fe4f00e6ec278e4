"""The calibrater: reverse adversarial examples for a frozen model (METHODS.md section 7;
calibrater_reverse_adversarial.txt, section 3, eq. 3, Alg. 1).

A main classifier `f`, trained on clean (scenario A) data, meets shifted data (`b1`/`b2`: rotation and
colour jitter) and loses accuracy. Instead of retraining `f`, a small generator `G` learns a benign
perturbation that moves each shifted input back to where `f` classifies it well:

    x' = x * (1 + tanh(g(x)))      multiplicative merge (default; the paper's x . G(x))
    x' = x + tanh(g(x))            additive merge
    loss = mean_i (1 - softmax(f(x'_i))[y_i])

Only `G` learns. `G`'s output activation is not given in the paper; `1 + tanh` (and `tanh` for the
additive form), with a zero-initialised last convolution, make `G` start as the exact identity, so
`f`'s accuracy is the starting point and training can only move away from it on purpose.

    method = CalibraterMethod({"variants": ["b2"]}, checkpoint="runs/source_model.pt",
                              variant_names=store.variants)
    fit(model, method, loader, optim=optim)            # model: f (loaded from the checkpoint in setup)
    calibrated = calibrate(other_model, method.generator)   # a calibrater transfers to another f

(`advpipe train CONFIG --method calibrater` builds it through `CalibraterMethod.build`; its sampler
draws only the chosen variants, whatever the `data` option says, unless `data: sampler`.)
`G` has its own Adam optimiser with the paper's schedule (lr, then lr/2, lr/4, lr/10 at each quarter
of the epochs, from 2e-4), stepped in `after_backward`; the shared optimiser settings do not apply
to it.

Optionally `f` is first compressed as the paper's section 4.3 does, "using deep compression" (Han et
al. 2016, the quantisation stage): per-layer k-means weight sharing to `quantize_bits` bits, then
fine-tuning of the shared centroids on clean training images (each centroid moves by the sum of the
gradients of the weights that share it, Han et al.'s eq. 3, so every layer keeps at most 2**bits values),
then the batch-norm statistics re-estimated on clean images; the fine-tuning images are the clean twins
of the calibrater's own batches (the loader pairs them). `G` is then quantised to 8 bits "without any
quantization training" (uniform per-layer grid) when training ends, as the paper does for its compressed
main models (`generator_bits`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from advpipe.batch import Batch
from advpipe.config import SamplerConfig
from advpipe.errors import ConfigError, ModelError, StoreError, TrainingError
from advpipe.io import atomic_path
from advpipe.models.files import load_tensor_file
from advpipe.trainers import distributed
from advpipe.trainers.detector import CLEAN, check_model, load_reference
from advpipe.trainers.loop import DataRegime, Method, StepContext

log = logging.getLogger(__name__)

CALIBRATER_FORMAT = "advpipe-calibrater/1"
#: learning-rate factors for the four quarters of training (paper: 2e-4, 1e-4, 5e-5, 2e-5 over 200 epochs)
PAPER_LR_FACTORS = (1.0, 0.5, 0.25, 0.1)
#: layers whose weights k-means quantisation shares (Deep Compression quantises conv and fc weights)
QUANTIZED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                    nn.Linear)
MAX_WIDTH = 1024

Merge = Literal["multiplicative", "additive"]


class CalibraterParams(BaseModel):
    """Parameters of the `calibrater` method (paper defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    variants: tuple[str, ...] = Field(default=("b2",), min_length=1,
                                      description="store variants G trains on (rows of other variants are skipped)")
    merge: Merge = "multiplicative"
    size_ratio: float = Field(default=0.1, gt=0.0, le=1.0, description="G's parameters / f's parameters")
    blocks: int = Field(default=2, ge=1, le=16, description="residual blocks of G")
    width: int | None = Field(default=None, ge=4, le=MAX_WIDTH,
                              description="G's residual-block channels; default: sized from size_ratio")
    lr: float = Field(default=2e-4, gt=0.0, description="Adam learning rate of G in the first quarter")
    schedule: Literal["paper", "constant"] = "paper"
    quantize_bits: int | None = Field(default=None, ge=1, le=8,
                                      description="k-means-quantise f's weights to this many bits first (paper: 2, 3)")
    finetune_epochs: int = Field(default=1, ge=0, le=100,
                                 description="passes over the clean training images fine-tuning the shared centroids "
                                             "of a quantised f (Deep Compression; 0: plain k-means)")
    finetune_lr: float = Field(default=1e-4, gt=0.0, description="SGD learning rate of the centroid fine-tuning")
    generator_bits: Annotated[int, Field(ge=2, le=16)] | Literal["auto"] | None = Field(
        default="auto", description="quantise G's weights to this many bits when training ends (auto: 8 when "
                                    "quantize_bits is set, as the paper's section 4.3; None: keep float32)")
    checkpoint: Path | None = Field(default=None, description="f's checkpoint (default: model.checkpoint)")

    @field_validator("variants")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"variants are listed twice: {list(value)}")
        return value


# ------------------------------------------------------------------------------------------ the generator


def _norm(channels: int) -> nn.GroupNorm:
    """One group: works at any spatial size (even 1x1) and any batch size, in train and eval mode alike."""
    return nn.GroupNorm(1, channels)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), _norm(channels), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), _norm(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Calibrater(nn.Module):
    """G: 3 down-sampling convs, `blocks` residual blocks of `width` channels, 3 up-sampling convs.

    As in the ResNet generator the paper's layout follows (Johnson et al.), the first down and last
    up convolutions keep the resolution (7x7) and the two others halve/double it, so 8x8 digits
    and 32x32 CIFAR images both work; the output is resized to the input when sizes are odd.
    """

    def __init__(self, channels: int, width: int, blocks: int = 2, merge: Merge = "multiplicative") -> None:
        super().__init__()
        self.channels, self.width, self.blocks, self.merge = int(channels), int(width), int(blocks), merge
        c1, c2, c3 = max(1, width // 4), max(1, width // 2), width
        self.down = nn.Sequential(
            nn.Conv2d(channels, c1, 7, padding=3), _norm(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), _norm(c2), nn.ReLU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1), _norm(c3), nn.ReLU())
        self.residual = nn.Sequential(*(ResidualBlock(c3) for _ in range(blocks)))
        last = nn.Conv2d(c1, channels, 7, padding=3)
        nn.init.zeros_(last.weight)  # G starts as the identity merge
        nn.init.zeros_(last.bias)
        self.up = nn.Sequential(
            nn.ConvTranspose2d(c3, c2, 3, stride=2, padding=1, output_padding=1), _norm(c2), nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, 3, stride=2, padding=1, output_padding=1), _norm(c1), nn.ReLU(),
            last)

    def config(self) -> dict[str, Any]:
        return {"channels": self.channels, "width": self.width, "blocks": self.blocks, "merge": self.merge}

    def forward(self, x: Tensor) -> Tensor:
        """The raw perturbation field g(x), shape of x; `calibrate` merges it."""
        out = self.up(self.residual(self.down(x)))
        if out.shape[-2:] != x.shape[-2:]:
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out

    def calibrate(self, x: Tensor) -> Tensor:
        """x' = x * (1 + tanh(g)) or x + tanh(g)."""
        if x.shape[1] != self.channels:
            raise ModelError(f"this calibrater was trained on {self.channels}-channel images, got {x.shape[1]}")
        field = torch.tanh(self(x))
        return x * (1 + field) if self.merge == "multiplicative" else x + field


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def size_calibrater(channels: int, target: float, blocks: int) -> int:
    """The width (a multiple of 4) whose calibrater's parameter count is closest to `target`.

    Counts are taken on the meta device, so trying widths allocates nothing.
    """
    def count(width: int) -> int:
        with torch.device("meta"):
            return count_parameters(Calibrater(channels, width, blocks))

    low, high = 1, MAX_WIDTH // 4  # width = 4 * k; the count grows with k
    while low < high:
        middle = (low + high) // 2
        if count(4 * middle) < target:
            low = middle + 1
        else:
            high = middle
    candidates = [4 * k for k in {max(1, low - 1), low}]
    return min(candidates, key=lambda width: abs(count(width) - target))


class CalibratedModel(nn.Module):
    """f(G-calibrated x): any classifier on [0, 1] inputs behind a trained calibrater."""

    def __init__(self, model: nn.Module, calibrater: Calibrater) -> None:
        super().__init__()
        self.model = model
        self.calibrater = calibrater

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.calibrater.calibrate(x))


def calibrate(model: nn.Module, calibrater: Calibrater) -> CalibratedModel:
    """Wrap `model` with a trained calibrater (it may have been trained with another main model)."""
    shape = getattr(model, "input_shape", None)
    if shape is not None and int(shape[0]) != calibrater.channels:
        raise ModelError(f"the calibrater works on {calibrater.channels}-channel images but the model takes "
                         f"{shape[0]}; train a calibrater on this data")
    return CalibratedModel(model, calibrater)


def save_calibrater(path: str | Path, calibrater: Calibrater, training: dict[str, Any] | None = None) -> None:
    """Write a calibrater atomically as plain tensors and types (loadable with weights_only=True)."""
    state = {name: tensor.detach().cpu().clone() for name, tensor in calibrater.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"format": CALIBRATER_FORMAT, "config": calibrater.config(), "training": dict(training or {}),
                    "state_dict": state}, tmp)


def load_calibrater(path: str | Path, device: torch.device | str = "cpu") -> Calibrater:
    payload = load_tensor_file(path, "calibrater file", "train one with the calibrater method")
    if not isinstance(payload, dict) or payload.get("format") != CALIBRATER_FORMAT:
        raise ModelError(f"{path}: not an advpipe calibrater file (format {CALIBRATER_FORMAT}); "
                         "write it with advpipe.trainers.calibrater.save_calibrater")
    try:
        calibrater = Calibrater(**payload["config"])
        calibrater.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ModelError(f"{path}: calibrater file is damaged ({str(exc).splitlines()[0]})") from None
    return calibrater.to(device).eval()


# ------------------------------------------------------------------------------------------ quantisation


@dataclass
class Codebook:
    """One layer's shared weights: weight = centroids[labels] (Deep Compression's weight sharing)."""

    module: nn.Module
    centroids: Tensor  # (k,) float64 on the CPU
    labels: Tensor  # int64, the weight's shape, on the weight's device

    def apply(self) -> None:
        """Write centroids[labels] into the layer's weight."""
        weight = self.module.weight
        with torch.no_grad():
            weight.copy_(self.centroids.to(weight.device, weight.dtype)[self.labels])


def _share(weight: Tensor, clusters: int) -> tuple[Tensor, Tensor]:
    """(centroids, labels) of one weight tensor by k-means with Deep Compression's linear initialisation."""
    from sklearn.cluster import KMeans

    values = weight.detach().cpu().double().numpy().reshape(-1, 1)
    distinct, inverse = np.unique(values, return_inverse=True)
    if len(distinct) <= clusters:  # already shared (e.g. quantised before): keep the values as they are
        centroids, labels = distinct, inverse
    else:
        init = np.linspace(distinct[0], distinct[-1], clusters).reshape(-1, 1)
        kmeans = KMeans(n_clusters=clusters, init=init, n_init=1).fit(values)
        centroids, labels = kmeans.cluster_centers_.reshape(-1), kmeans.labels_
    return (torch.from_numpy(np.asarray(centroids, dtype=np.float64)),
            torch.from_numpy(np.asarray(labels, dtype=np.int64).reshape(weight.shape)).to(weight.device))


def share_weights(model: nn.Module, bits: int) -> dict[str, Codebook]:
    """Per-layer k-means weight sharing, in place: every conv/linear weight keeps at most 2**bits values.

    scikit-learn's KMeans with Deep Compression's linear initialisation (centroids spread evenly
    between the layer's smallest and largest weight, which keeps the rare large weights); biases and
    normalisation parameters stay full precision. Returns each quantised layer's codebook, for
    `finetune_centroids`.
    """
    clusters = 2 ** int(bits)
    books: dict[str, Codebook] = {}
    for name, module in model.named_modules():
        if isinstance(module, QUANTIZED_LAYERS):
            centroids, labels = _share(module.weight, clusters)
            books[name] = Codebook(module, centroids, labels)
            books[name].apply()
    if not books:
        raise ModelError(f"{type(model).__name__} has no convolution or linear layer to quantise")
    return books


def quantize_weights(model: nn.Module, bits: int) -> dict[str, int]:
    """`share_weights` without fine-tuning; returns each quantised layer's number of distinct values."""
    return {name: len(torch.unique(book.module.weight.detach())) for name, book in share_weights(model, bits).items()}


def centroid_gradients(labels: Tensor, weight_grad: Tensor, clusters: int) -> Tensor:
    """Han et al.'s eq. 3: each centroid's gradient is the sum of the gradients of the weights sharing it."""
    out = torch.zeros(clusters, dtype=torch.float64, device=weight_grad.device)
    return out.index_add_(0, labels.reshape(-1).to(weight_grad.device), weight_grad.reshape(-1).double()).cpu()


def finetune_centroids(model: nn.Module, books: dict[str, Codebook], batches: Iterable[tuple[Tensor, Tensor]], *,
                       lr: float, epochs: int = 1, momentum: float = 0.0) -> int:
    """Fine-tune the shared centroids on (x, y) batches (cross-entropy, SGD), in place; returns the steps taken.

    Only the centroids learn: the weights' gradients are summed per centroid, the centroids step,
    and every weight is rewritten from its centroid, so a layer never holds more values than its
    codebook. Biases and normalisation parameters stay as they are (batch-norm statistics move in
    train mode; re-estimate them afterwards with `reestimate_batchnorm`). `batches` is iterated
    `epochs` times.
    """
    centroids = {name: nn.Parameter(book.centroids.clone()) for name, book in books.items()}
    optimizer = torch.optim.SGD(list(centroids.values()), lr=lr, momentum=momentum)
    flags = [p.requires_grad for p in model.parameters()]
    mode = model.training
    model.requires_grad_(False)
    for book in books.values():
        book.module.weight.requires_grad_(True)
    steps = 0
    try:
        model.train()
        for _ in range(epochs):
            for x, y in batches:
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                for name, book in books.items():
                    grad = book.module.weight.grad
                    centroids[name].grad = (torch.zeros_like(centroids[name]) if grad is None else
                                            centroid_gradients(book.labels, grad, len(book.centroids)))
                optimizer.step()
                for name, book in books.items():
                    book.centroids = centroids[name].detach().clone()
                    book.apply()
                steps += 1
    finally:
        model.zero_grad(set_to_none=True)
        for param, flag in zip(model.parameters(), flags, strict=True):
            param.requires_grad_(flag)
        model.train(mode)
    return steps


def reestimate_batchnorm(model: nn.Module, images: Iterable[Tensor]) -> int:
    """Batch-norm running statistics recomputed from `images` (a cumulative average over all of them).

    Only the batch-norm layers run in train mode (dropout and the rest stay in eval mode); returns
    the number of batch-norm layers (0: nothing to re-estimate, `images` is not read).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    mode = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average: every batch counts the same
        norm.train()
    seen = 0
    try:
        with torch.no_grad():
            for x in images:
                model(x)
                seen += len(x)
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(mode)
    if not seen:
        raise TrainingError("batch-norm statistics cannot be re-estimated: no clean image to run them on")
    return len(norms)


def quantize_uniform(model: nn.Module, bits: int = 8) -> dict[str, int]:
    """Every conv/linear weight rounded to a uniform grid of 2**bits levels between its smallest and largest
    value, in place ("8 bits without any quantization training"); returns each layer's number of values."""
    levels = 2 ** int(bits) - 1
    counts: dict[str, int] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, QUANTIZED_LAYERS):
                continue
            weight = module.weight
            low, high = weight.min(), weight.max()
            if high > low:
                step = (high - low) / levels
                weight.copy_(low + torch.round((weight - low) / step) * step)
            counts[name] = len(torch.unique(weight))
    return counts


# ------------------------------------------------------------------------------------------- the method


class CalibraterMethod(Method):
    """Trains G in front of the frozen main model f (the model the loop is given)."""

    name = "calibrater"
    params_model: ClassVar[type[BaseModel]] = CalibraterParams
    default_data: ClassVar[DataRegime] = "adversarial"  # i.e. only the chosen variants (see sampler_config)

    def __init__(self, params: CalibraterParams | dict[str, Any] | None = None, *,
                 checkpoint: str | Path | None = None, variant_names: Sequence[str],
                 arch: str | None = None, num_classes: int | None = None,
                 input_shape: Sequence[int] | None = None) -> None:
        """Check the store's variants and f's checkpoint, and size G; every mismatch is raised here.

        `variant_names` are the store's variants, clean first (a batch's variant id indexes them);
        `checkpoint` is the fallback for the parameters' one (the config's model.checkpoint);
        `arch`, `num_classes` and `input_shape` (C, H, W), when given, are what f must match.
        """
        super().__init__(params)
        self.params: CalibraterParams
        names = list(variant_names)
        missing = [name for name in self.params.variants if name not in names]
        if missing:
            raise StoreError(f"method '{self.name}' trains on variant(s) {', '.join(missing)}, which the store does "
                             f"not hold (it has: {', '.join(names)}); add them to the config's variants "
                             f"(e.g. `{missing[0]}: {{generator: {missing[0]}}}`) and regenerate, or set the "
                             "method's 'variants'")
        self.variant_ids = sorted(names.index(name) for name in self.params.variants)
        path = self.params.checkpoint or checkpoint
        if path is None:
            raise ConfigError(f"method '{self.name}' needs the main model f, and there is no checkpoint: train the "
                              "source model first, or set model.checkpoint or the method's 'checkpoint' parameter")
        self.checkpoint = Path(path)
        main, self.meta = load_reference(self.checkpoint, what="calibrater main model", arch=arch,
                                         num_classes=num_classes, input_shape=input_shape)
        self.main_state = main.state_dict()
        self.main_parameters = count_parameters(main)
        channels = self.meta.input_shape[0]
        width = self.params.width or size_calibrater(channels, self.params.size_ratio * self.main_parameters,
                                                     self.params.blocks)
        self.generator = Calibrater(channels, width, self.params.blocks, self.params.merge)
        self.ratio = count_parameters(self.generator) / self.main_parameters
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.params.lr)
        self._frozen: list[bool] = []
        self._step = False
        self._epochs: int | None = None
        self.compression: dict[str, int] = {}
        log.info("calibrater: G has %d parameters (width %d, %d blocks), %.3f of f's %d (%s, target %.3f); "
                 "trains on %s", count_parameters(self.generator), width, self.params.blocks, self.ratio,
                 self.main_parameters, self.meta.arch, self.params.size_ratio, ", ".join(self.params.variants))

    @classmethod
    def build(cls, params: BaseModel, context: Any) -> CalibraterMethod:
        """From validated parameters and the run's MethodContext (store variants, source model, data shape)."""
        return cls(params, checkpoint=context.checkpoint, variant_names=context.variant_names, arch=context.arch,
                   num_classes=context.num_classes, input_shape=context.input_shape)

    def sampler_config(self, data: DataRegime, base: SamplerConfig, attacks: list[str]) -> SamplerConfig:
        """Draw only the chosen variants, uniformly (`data: sampler` keeps the config's own policy)."""
        if data == "sampler":
            return base
        shifted = [name for name in self.params.variants if name != CLEAN]
        ratio = len(shifted) / len(self.params.variants)
        # a quantised f is fine-tuned and its batch norm re-estimated on the clean twins of these images
        pair = base.pair_clean or self.params.quantize_bits is not None
        return SamplerConfig.model_validate({**base.model_dump(), "ratio": ratio,
                                             "weights": {name: 1.0 for name in shifted}, "groups": {},
                                             "adaptive": False, "redraw": "batch", "pair_clean": pair})

    def modules(self) -> dict[str, nn.Module]:
        return {"calibrater": self.generator}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"calibrater": self.optimizer}

    def parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        """G only. G's own optimiser steps them; the loop's finds their gradients cleared and skips them."""
        return list(self.generator.parameters())

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """f = the checkpoint's weights (quantised if asked), frozen in eval mode."""
        net = check_model(model, self.meta, self.checkpoint, "calibrater")
        net.load_state_dict(self.main_state)
        if self.params.quantize_bits is not None:
            self.compress(net, device)
        self._frozen = [p.requires_grad for p in net.parameters()]
        net.requires_grad_(False)
        net.eval()
        self.generator.to(device)
        distributed.broadcast_module(self.generator)  # every rank starts from rank 0's G

    def compress(self, net: nn.Module, device: torch.device) -> None:
        """Deep Compression's quantisation of f: k-means sharing, centroid fine-tuning, batch-norm re-estimation.

        The clean images are those of the training loader (its clean twins, or its clean rows); the
        loader is then put back at the epoch it was at, so G's training sees the batches it would have.
        """
        bits = self.params.quantize_bits
        assert bits is not None
        books = share_weights(net, bits)
        self.compression = {"bits": bits, "layers": len(books), "finetune_steps": 0, "batchnorm_layers": 0}
        start = getattr(self.loader, "epoch", None)
        try:
            if self.params.finetune_epochs:
                steps = finetune_centroids(net, books, _CleanBatches(self.loader, device), lr=self.params.finetune_lr,
                                           epochs=self.params.finetune_epochs)
                if not steps:
                    raise TrainingError("calibrater: the training batches hold no clean image to fine-tune the "
                                        "quantised main model on (pair_clean, or clean rows); set finetune_epochs: 0 "
                                        "for plain k-means")
                self.compression["finetune_steps"] = steps
            images = (x for x, _ in _CleanBatches(self.loader, device))
            self.compression["batchnorm_layers"] = reestimate_batchnorm(net, images)
        finally:
            if start is not None and hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(start)
        log.info("calibrater: f's weights quantised to %d bits in %d layers (k-means), centroids fine-tuned for %d "
                 "steps, batch-norm statistics of %d layers re-estimated", bits, len(books),
                 self.compression["finetune_steps"], self.compression["batchnorm_layers"])

    def generator_bits(self) -> int | None:
        """G's bits at the end of training (None: float32)."""
        bits = self.params.generator_bits
        if bits == "auto":
            return 8 if self.params.quantize_bits is not None else None
        return bits

    def lr_at(self, epoch: int, epochs: int) -> float:
        """The paper's step schedule: the factor of the quarter of training `epoch` (0-based) lies in."""
        if self.params.schedule == "constant":
            return self.params.lr
        quarter = min(len(PAPER_LR_FACTORS) - 1, len(PAPER_LR_FACTORS) * epoch // max(1, epochs))
        return self.params.lr * PAPER_LR_FACTORS[quarter]

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        model.eval()  # the loop put f in train mode; its batch-norm statistics must not move

    def training_step(self, model: nn.Module, batch: Batch,
                      ctx: StepContext) -> tuple[Tensor, dict[str, Any]]:
        """The loss over the rows of the chosen variants; the metrics cover every row (f with G, f alone)."""
        if model.training:
            model.eval()
        self._epochs = ctx.epochs
        self.generator.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(ctx.epoch, ctx.epochs)
        rows = torch.isin(batch.variant, torch.tensor(self.variant_ids, device=batch.variant.device))
        logits = model(self.generator.calibrate(batch.x))
        correct = logits.argmax(dim=1) == batch.y
        with torch.no_grad():
            base = model(batch.x).argmax(dim=1) == batch.y
        metrics: dict[str, Any] = {"acc": correct.float().mean().item(), "correct": correct,
                                   "base_acc": base.float().mean().item(), "rows": rows.float().mean().item()}
        self._step = bool(rows.any())
        if not self._step:  # nothing to learn from: a zero loss that still reaches G's parameters
            return logits.sum() * 0.0, metrics
        probabilities = F.softmax(logits[rows].float(), dim=1)
        return (1 - probabilities.gather(1, batch.y[rows, None])).mean(), metrics

    def after_backward(self, model: nn.Module, batch: Batch, ctx: StepContext) -> None:
        """G's step (its gradients are already averaged over ranks); the loop's optimiser then finds none."""
        if self._step:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def predict(self, model: nn.Module, x: Tensor) -> Tensor:
        self.generator.eval()
        return model(self.generator.calibrate(x))

    def on_epoch_end(self, model: nn.Module, epoch: int, record: dict[str, Any]) -> None:
        record["calibrater_ratio"] = self.ratio
        record["calibrater_lr"] = self.optimizer.param_groups[0]["lr"]
        bits = self.generator_bits()
        if bits is not None and self._epochs is not None and epoch + 1 >= self._epochs:
            # training is over: G as deployed (the paper: 8 bits "without any quantization training"), before
            # the run's checkpoint and calibrater.pt are written, so that evaluation measures it
            quantize_uniform(self.generator, bits)
            record["calibrater_bits"] = bits
        if "train_base_acc" in record:
            log.info("calibrater epoch %d: f alone %.2f%%, f with G %.2f%% on the training batches (lr %.1e)",
                     epoch + 1, 100 * record["train_base_acc"], 100 * record.get("train_acc", 0.0),
                     record["calibrater_lr"])

    def teardown(self, model: nn.Module) -> None:
        for param, flag in zip(model.parameters(), self._frozen, strict=False):
            param.requires_grad_(flag)

    def save_artifacts(self, run_dir: Path) -> None:
        """`calibrater.pt` beside the run's model: G alone, to wrap f or any other model (`calibrate`)."""
        training = {"main_model": str(self.checkpoint), "ratio": self.ratio, "variants": list(self.params.variants),
                    "main_compression": dict(self.compression), "generator_bits": self.generator_bits()}
        save_calibrater(Path(run_dir) / "calibrater.pt", self.generator, training)

    def calibrated(self, model: nn.Module) -> CalibratedModel:
        """`model` behind this method's calibrater (use it on f, or on another main model)."""
        return calibrate(model, self.generator)


class _CleanBatches:
    """(clean images, labels) of a training loader's batches, on `device`: each batch's clean twins
    (x_clean) when the loader pairs them, else its clean rows. Iterable more than once."""

    def __init__(self, loader: Iterable[Batch], device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for raw in self.loader:
            batch = raw.to(self.device).decode()
            if batch.x_clean is not None:
                yield batch.x_clean, batch.y
                continue
            rows = batch.variant == 0
            if rows.any():
                yield batch.x[rows], batch.y[rows]
