"""BANG - Batch Adjusted Network Gradients (METHODS.md section 4; seed 002, section 3.2, eqs. 2-6).

For every `nn.Linear` and `nn.Conv2d` layer, each sample's contribution to
the weight and bias gradient is scaled by

    k_i = dE_i / dy_i (the sample's gradient at the layer output),  m = max_i ||k_i||
    rho_i = eps_i * (1 - ||k_i|| / m),  eta_i = (m / ||k_i||) ** rho_i  (1 where k_i = 0)
    grad_w = beta * sum_i eta_i * dE_i/dw            (the loss is the batch mean, so 1/N is in dE_i)

while the gradient passed to lower layers stays the ordinary one. beta "modifies the learning rate"
(the paper, eq. 6; in Caffe a layer's learning-rate factor multiplies its whole update, weight decay
included), so the optimiser's weight decay of these layers is scaled by beta too: `after_backward` adds
(beta - 1) * weight_decay * w to the gradient the optimiser then adds weight_decay * w to, and an SGD
step (momentum included) is beta times the ordinary one, decay and all. Under Adam, which divides by
the gradient's running scale, beta (on the gradient or on all of it) changes next to nothing. `eps_i` is
`eps` for samples the model classifies correctly and `eps * misclassified_ratio`
for the others (the CIFAR-10 runs used half).

How: from `setup` to `teardown` each target layer's forward runs through a small
autograd function (bound to the module, so a deep copy stays consistent) whose
backward computes the input gradient from k as usual and the weight/bias
gradients with eta_i folded into sample i (into k on a CPU, into the layer
input on a GPU), in the kernels autograd itself calls (`aten.convolution_backward`,
one matmul). No loop over samples, and nothing left for `after_backward`:
rescaling there would need the per-sample gradients a second time. The extra
work per layer is one norm over k, seven ops on N numbers and one or two
elementwise passes. Works under bf16 autocast.

Measured (bench/train_overhead.py): 1.04-1.13x plain on one CPU thread, 1.14-1.30x
on eight; on an H200 1.35x for cifar_resnet18 at batch 256 and 1.7-1.9x for LeNet
and CIFAR-10 quick, whose 2.3 ms steps are dominated by per-op launch costs.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from advpipe.batch import Batch
from advpipe.errors import ConfigError, ModelError
from advpipe.trainers.loop import Method, StepContext

log = logging.getLogger(__name__)


#: the authors' reference settings: MNIST (LeNet) and CIFAR-10 ("CIFAR-10 quick"), and their batch sizes
PRESET_VALUES: dict[str, dict[str, float]] = {
    "mnist": {"eps": 0.815, "beta": 1.0, "misclassified_ratio": 1.0},
    "cifar10": {"eps": 0.855, "beta": 0.4, "misclassified_ratio": 0.5},
}
PRESET_BATCH_SIZES: dict[str, int] = {"mnist": 64, "cifar10": 100}

NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class BangParams(BaseModel):
    """BANG's parameters; `layer_eps` / `layer_beta` override eps / beta by module name (model.named_modules()).

    `preset` (mnist or cifar10) fills eps, beta and misclassified_ratio with the reference values;
    keys given beside it win.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: Literal["mnist", "cifar10"] | None = None
    #: degree of balancing (eq. 4); 0 gives the ordinary gradient
    eps: NonNegative = 0.815
    #: per-layer learning-rate factor (eq. 6)
    beta: Positive = 1.0
    #: factor on eps for samples the model currently misclassifies (the paper's CIFAR-10 runs: 0.5)
    misclassified_ratio: NonNegative = 1.0
    layer_eps: dict[str, NonNegative] = Field(default_factory=dict)
    layer_beta: dict[str, Positive] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in PRESET_VALUES:
            return {**PRESET_VALUES[data["preset"]], **data}
        return data


@dataclass(frozen=True)
class BangPreset:
    """Settings of the authors' reference code: BANG parameters and the batch size they go with."""

    params: BangParams
    batch_size: int


PRESETS: dict[str, BangPreset] = {name: BangPreset(BangParams(preset=name), PRESET_BATCH_SIZES[name])  # type: ignore[arg-type]
                                  for name in PRESET_VALUES}


def preset(name: str) -> BangPreset:
    if name not in PRESETS:
        raise ConfigError(f"unknown BANG preset '{name}' (known: {', '.join(PRESETS)})")
    return PRESETS[name]


def bang_scale(grad_out: Tensor, eps: Tensor | float) -> Tensor:
    """eta_i (shape N) from the gradients at a layer's output, sample dimension first.

    Seven small ops, none of them a host sync: on a GPU the cost per layer is launch overhead.
    """
    norms = torch.linalg.vector_norm(grad_out.detach().reshape(grad_out.shape[0], -1), dim=1, dtype=torch.float32)
    relative = norms / norms.amax()  # ||k_i|| / m, in [0, 1]
    # (m / ||k_i||) ** rho_i = relative ** (eps_i * (relative - 1)); k_i = 0 gives inf and an all-zero
    # batch NaN, where eta is 1 (the sample contributes nothing either way)
    return relative.pow((relative - 1) * eps).nan_to_num_(nan=1.0, posinf=1.0)


class _BatchState:
    """What the current batch tells every layer: each sample's eps factor (None: 1 for all)."""

    def __init__(self) -> None:
        self.eps_factor: Tensor | None = None


class _LayerScale:
    """One layer's eps and beta, and the per-sample factors its weight gradient gets."""

    def __init__(self, name: str, eps: float, beta: float, batch: _BatchState) -> None:
        self.name, self.eps, self.beta, self.batch = name, eps, beta, batch

    def factors(self, grad_out: Tensor) -> Tensor | None:
        """beta * eta_i shaped to broadcast over grad_out, or None when they are all exactly 1."""
        factor = self.batch.eps_factor
        if self.beta == 1.0 and (self.eps == 0.0 or grad_out.shape[0] < 2):
            return None
        if factor is not None and factor.shape[0] != grad_out.shape[0]:
            raise ModelError(f"BANG layer '{self.name}': its output has {grad_out.shape[0]} rows but the batch "
                             f"has {factor.shape[0]} samples; BANG needs the sample dimension first")
        eps = self.eps if factor is None else self.eps * factor
        scale = bang_scale(grad_out, eps)
        if self.beta != 1.0:
            scale = scale * self.beta
        return scale.to(grad_out.dtype).view(-1, *([1] * (grad_out.dim() - 1)))


class _BangLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, scale: _LayerScale) -> Tensor:
        out = F.linear(x, weight, bias)
        # Under autocast the product ran in out.dtype; the backward works in it too, as autograd would.
        ctx.save_for_backward(x.to(out.dtype), weight.to(out.dtype))
        ctx.scale, ctx.dtypes = scale, (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        x_dtype, weight_dtype, bias_dtype = ctx.dtypes
        grad = grad.to(x.dtype)
        grad_x = grad.matmul(weight).to(x_dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            factors = ctx.scale.factors(grad)
            scaled = grad if factors is None else grad * factors
            rows = scaled.reshape(-1, scaled.shape[-1])
            if ctx.needs_input_grad[1]:
                grad_w = rows.t().mm(x.reshape(-1, x.shape[-1])).to(weight_dtype)
            if bias_dtype is not None and ctx.needs_input_grad[2]:
                grad_b = rows.sum(0).to(bias_dtype)
        return grad_x, grad_w, grad_b, None


class _BangConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, scale: _LayerScale,
                geometry: tuple[list[int], list[int], list[int], int]) -> Tensor:
        stride, padding, dilation, groups = geometry
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x.to(out.dtype), weight.to(out.dtype))  # autocast: the dtype it ran in
        ctx.scale, ctx.geometry = scale, geometry
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        x_dtype, weight_dtype, bias_dtype = ctx.dtypes
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias_dtype is not None
        grad = grad.to(x.dtype)
        bias_sizes = [weight.shape[0]] if bias_dtype is not None else None

        def conv_backward(g: Tensor, inputs: Tensor, mask: list[bool]) -> tuple[Tensor | None, ...]:
            return torch.ops.aten.convolution_backward(g, inputs, weight, bias_sizes, stride, padding, dilation,
                                                       False, [0, 0], groups, mask)

        factors = ctx.scale.factors(grad) if need_w or need_b else None
        if factors is None:  # nothing to rescale: exactly autograd's own call
            grad_x, grad_w, grad_b = conv_backward(grad, x, [need_x, need_w, need_b])
        elif scale_input_side(grad):
            # sum_i eta_i (k_i * x_i) = sum_i k_i * (eta_i x_i): the data gradient keeps k untouched. cuDNN runs
            # data and weight gradients as separate kernels anyway, so two calls cost what one does.
            grad_x = conv_backward(grad, x, [True, False, False])[0] if need_x else None
            grad_w = conv_backward(grad, x * factors, [False, True, False])[1] if need_w else None
            grad_b = torch.einsum("nc,n->c", grad.sum(dim=(2, 3)), factors.view(-1)) if need_b else None
        else:
            # One call on the scaled gradient gives the scaled weight/bias gradients; the input gradient
            # is linear in each sample's k_i, so dividing sample i by its factor (>= beta > 0) restores
            # the ordinary one. On a CPU this beats a second convolution_backward for the input alone.
            grad_x, grad_w, grad_b = conv_backward(grad * factors, x, [need_x, need_w, need_b])
            if grad_x is not None:
                grad_x = grad_x / factors
        return (_cast(grad_x, x_dtype), _cast(grad_w, weight_dtype), _cast(grad_b, bias_dtype), None, None)


def scale_input_side(grad: Tensor) -> bool:
    """Where a convolution's per-sample factors go: on the layer input (GPU: fewer passes over memory) or
    on the output gradient (CPU: one fused backward call). Both give the same gradients."""
    return grad.is_cuda


def _cast(tensor: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    return None if tensor is None or dtype is None else tensor.to(dtype)


def _bang_linear_forward(module: nn.Linear, x: Tensor) -> Tensor:
    """nn.Linear.forward through _BangLinear; bound to the module (so a deep copy rebinds to the copy)."""
    if x.dim() < 2:  # one unbatched sample: eta is 1
        return nn.Linear.forward(module, x)
    return _BangLinear.apply(x, module.weight, module.bias, module._bang_scale)


def _bang_conv_forward(module: nn.Conv2d, x: Tensor) -> Tensor:
    """nn.Conv2d.forward through _BangConv2d, bound to the module like _bang_linear_forward."""
    if x.dim() != 4:  # one unbatched sample: eta is 1
        return nn.Conv2d.forward(module, x)
    x, padding = _explicit_padding(module, x)
    geometry = (list(module.stride), padding, list(module.dilation), module.groups)
    return _BangConv2d.apply(x, module.weight, module.bias, module._bang_scale, geometry)


def _explicit_padding(module: nn.Conv2d, x: Tensor) -> tuple[Tensor, list[int]]:
    """Numeric symmetric padding for convolution_backward; padding modes and uneven 'same' pad the input first."""
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), [0, 0]
    if not isinstance(module.padding, str):
        return x, list(module.padding)
    if module.padding == "valid":
        return x, [0, 0]
    totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
    if all(total % 2 == 0 for total in totals):
        return x, [total // 2 for total in totals]
    (total_h, total_w) = totals  # uneven 'same': the extra row/column goes last, as torch does
    return F.pad(x, (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)), [0, 0]


def bang_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers BANG acts on: every nn.Linear and nn.Conv2d, by module name."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear | nn.Conv2d)]


def scale_weight_decay(layers: list[nn.Module], optimizer: torch.optim.Optimizer) -> None:
    """Make beta scale the weight-decay part of each BANG layer's update as it scales the gradient part.

    The optimiser adds weight_decay * w to the gradient (SGD and Adam alike, before momentum); adding
    (beta - 1) * weight_decay * w here makes that beta * weight_decay * w. Identical on every rank (the
    weights are), so it needs no communication after the gradients were averaged.
    """
    decay = {id(p): float(group.get("weight_decay", 0.0)) for group in optimizer.param_groups for p in group["params"]}
    with torch.no_grad():
        for module in layers:
            beta = module._bang_scale.beta
            if beta == 1.0:
                continue
            for param in (module.weight, module.bias):
                weight_decay = decay.get(id(param), 0.0) if param is not None else 0.0
                if weight_decay and param.grad is not None:
                    param.grad.add_(param, alpha=(beta - 1.0) * weight_decay)


class BangMethod(Method):
    """Cross-entropy on the batch's images with BANG-scaled weight gradients in every Linear/Conv2d layer.

    The paper trains on clean images; any data regime works (the batch is whatever the sampler drew).
    """

    name = "bang"
    params_model: ClassVar[type[BaseModel]] = BangParams
    params: BangParams

    def __init__(self, params: BangParams | None = None, **values: Any) -> None:
        super().__init__(params, **values)
        self._batch = _BatchState()
        self._patched: list[nn.Module] = []

    def setup(self, model: nn.Module, device: torch.device) -> None:
        layers = bang_layers(model)
        if not layers:
            raise ModelError(f"bang: model {type(model).__name__} has no nn.Linear or nn.Conv2d layer to scale "
                             "gradients in")
        names = {name for name, _ in layers}
        for label, table in (("layer_eps", self.params.layer_eps), ("layer_beta", self.params.layer_beta)):
            unknown = sorted(set(table) - names)
            if unknown:
                raise ConfigError(f"bang.{label} names {', '.join(unknown)}, which is not a Linear/Conv2d layer of "
                                  f"{type(model).__name__} (its layers: {', '.join(sorted(names))})")
        for name, module in layers:
            if "forward" in vars(module):
                self.teardown(model)
                raise ModelError(f"bang: layer '{name}' already has its forward replaced (is another method "
                                 "patching it?); BANG cannot wrap it twice")
            module._bang_scale = _LayerScale(name, self.params.layer_eps.get(name, self.params.eps),
                                             self.params.layer_beta.get(name, self.params.beta), self._batch)
            forward = _bang_linear_forward if isinstance(module, nn.Linear) else _bang_conv_forward
            module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]
            self._patched.append(module)
        log.info("bang: scaling weight gradients of %d layers (eps %g, beta %g, misclassified ratio %g)",
                 len(layers), self.params.eps, self.params.beta, self.params.misclassified_ratio)

    def training_step(self, model: nn.Module, batch: Batch,
                      ctx: StepContext) -> tuple[Tensor, dict[str, Any]]:
        logits = model(batch.x)
        correct = logits.detach().argmax(dim=1) == batch.y
        ratio = self.params.misclassified_ratio
        self._batch.eps_factor = None if ratio == 1.0 else ratio + (1.0 - ratio) * correct.float()
        loss = F.cross_entropy(logits, batch.y)
        return loss, {"acc": correct.float().mean().item(), "correct": correct}

    def after_backward(self, model: nn.Module, batch: Batch, ctx: StepContext) -> None:
        self._batch.eps_factor = None  # the gradients are done; later forwards are another batch
        optimizer = getattr(ctx, "optimizer", None)
        if optimizer is not None:
            scale_weight_decay(self._patched, optimizer)

    def teardown(self, model: nn.Module) -> None:
        for module in self._patched:
            vars(module).pop("forward", None)
            vars(module).pop("_bang_scale", None)
        self._patched.clear()
        self._batch.eps_factor = None
