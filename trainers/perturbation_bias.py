"""Adversarial perturbation bias (METHODS.md section 5; seed 003, section 3, Algs. 1-2).

The biases of a model's fully connected layers become perturbation biases:
`y = W x + d`. The optimiser never updates the perturbation; after each backward
pass it is set by the Fast Gradient Sign Method instead, inside the paper's
perturbation *budget* eps_ap (Alg. 2), so the network keeps training against a
bias that raises its loss (ascent, the paper's reading and the default) or, as
an option, lowers it (descent). With g the gradient of the loss summed over the
batch and s = +1 (ascent) or -1 (descent):

- naive:      d = d0 + delta, d0 the layer's bias when it was converted (kept fixed);
- multimodal: d = m @ W_ap with memories m (1 x h) and bias weights W_ap (h x n); the
              perturbation is m (W_ap is trained by the optimiser like any weight);

and the perturbation p (delta, or m) is updated by `update`:

- "fgsm" (default): p = s * eps_ap * sign(g), the FGSM perturbation of the current
  gradient. It has size exactly eps_ap and does not accumulate: the paper computes
  it "using FGSM", like the FGSM perturbation of an adversarial example (section 1).
- "projected": p = clip(p + s * step_ap * sign(g), -eps_ap, eps_ap), sign steps
  projected onto the eps_ap ball (iterative FGSM), for users who want the
  perturbation to build up over batches.

Either way |p| <= eps_ap at every step, however long the run and whatever the
learning rate does (an unbounded sum of sign steps grew to |d| ~ 13 and made
accuracy collapse as a cosine schedule decayed: issue 21). For the multimodal
form the budget bounds m; d = m @ W_ap is bounded by eps_ap times the column sums
of |W_ap|, which the optimiser trains. Autograd already computes those sums: g is
exactly dL/d(delta) or dL/dm, so an update costs one sign per bias element.

After training `fold_perturbation_bias` turns every layer back into a plain
`nn.Linear` whose bias is the final d
(m and W_ap are dropped), so the saved model is an ordinary model of its
registry architecture. Which images it trains on (clean only, adversarial only,
both) is the sampler's policy; the method takes whatever `batch.x` holds.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from advpipe.batch import Batch
from advpipe.errors import ConfigError, ModelError
from advpipe.trainers.baselines import cross_entropy_step
from advpipe.trainers.loop import Method, StepContext

log = logging.getLogger(__name__)

Kind = Literal["naive", "multimodal"]
Direction = Literal["ascent", "descent"]
Update = Literal["fgsm", "projected"]


class PerturbationBiasParams(BaseModel):
    """Perturbation-bias parameters; `layers` names the nn.Linear modules to convert (default: all with a bias)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind = "naive"
    #: the perturbation budget (L-inf, per element; > 0): |delta| (naive) or |m| (multimodal) never exceeds it;
    #: the paper does not state its value
    eps_ap: float = Field(0.01, gt=0, allow_inf_nan=False)
    #: "fgsm": the perturbation is eps_ap * sign of the current gradient (no accumulation; the default);
    #: "projected": sign steps of step_ap projected onto the eps_ap ball
    update: Update = "fgsm"
    #: the sign step of update "projected" (default: eps_ap / 4); not used by "fgsm"
    step_ap: float | None = Field(None, gt=0, allow_inf_nan=False)
    #: h, the number of bias memories of the multimodal form (the paper tries 625 to 10000)
    memories: int = Field(625, ge=1)
    direction: Direction = "ascent"
    layers: tuple[str, ...] | None = None
    #: replace the layers by plain nn.Linear when training ends (teardown)
    fold_at_end: bool = True

    @model_validator(mode="after")
    def _step_only_when_projected(self) -> PerturbationBiasParams:
        if self.step_ap is not None and self.update != "projected":
            raise ValueError(f"step_ap ({self.step_ap}) applies only to update 'projected'; update 'fgsm' sets the "
                             "perturbation to eps_ap * sign(gradient) at every step")
        return self


def _check_eps(eps_ap: float, where: str) -> None:
    if not (math.isfinite(eps_ap) and eps_ap > 0):
        raise ConfigError(f"{where} = {eps_ap}: the FGSM step of the perturbation bias must be a positive number "
                          "(e.g. 0.01)")


class PerturbationBiasLinear(nn.Module):
    """`y = W x + d` with d naive (`d0 + delta`) or multimodal (`m @ W_ap`); delta and m move only by `fgsm_step`,
    which keeps them inside the budget eps_ap."""

    def __init__(self, in_features: int, out_features: int, *, kind: Kind = "naive", eps_ap: float = 0.01,
                 memories: int = 625, direction: Direction = "ascent", update: Update = "fgsm",
                 step_ap: float | None = None, name: str = "",
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.name = name or f"PerturbationBiasLinear({in_features}->{out_features})"
        _check_eps(eps_ap, f"perturbation-bias layer '{self.name}': eps_ap")
        if step_ap is not None:
            _check_eps(step_ap, f"perturbation-bias layer '{self.name}': step_ap")
        if kind not in ("naive", "multimodal") or direction not in ("ascent", "descent") \
                or update not in ("fgsm", "projected"):
            raise ConfigError(f"perturbation-bias layer '{self.name}': kind must be naive or multimodal, direction "
                              f"ascent or descent and update fgsm or projected, got {kind!r} / {direction!r} / "
                              f"{update!r}")
        if kind == "multimodal" and memories < 1:
            raise ConfigError(f"perturbation-bias layer '{self.name}': needs at least one bias memory, got {memories}")
        self.in_features, self.out_features = in_features, out_features
        self.kind, self.eps_ap, self.direction, self.update = kind, float(eps_ap), direction, update
        self.step_ap = float(step_ap) if step_ap is not None else self.eps_ap / 4
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        if kind == "naive":
            # d = origin + delta: the budget bounds delta, the perturbation proper; origin is the bias the
            # layer was converted from (zero for a layer built here) and stays fixed.
            self.register_buffer("origin", torch.zeros(out_features, **factory))
            self.perturbation = nn.Parameter(torch.zeros(out_features, **factory))
        else:
            # m starts at zero (d = 0, like a fresh bias); W_ap like a linear layer's weight over h inputs.
            self.memories = nn.Parameter(torch.zeros(1, memories, **factory))
            bound = 1.0 / math.sqrt(memories)
            self.memory_weight = nn.Parameter(torch.empty(memories, out_features, **factory).uniform_(-bound, bound))

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "", **options: Any) -> PerturbationBiasLinear:
        """Take over `linear`'s weight (the same Parameter); a naive d starts at its bias (the origin of the
        perturbation, delta = 0): the same outputs."""
        layer = cls(linear.in_features, linear.out_features, name=name, device=linear.weight.device,
                    dtype=linear.weight.dtype, **options)
        layer.weight = linear.weight
        if layer.kind == "naive" and linear.bias is not None:
            with torch.no_grad():
                layer.origin.copy_(linear.bias)
        return layer

    def bias(self) -> Tensor:
        """d, the perturbation bias added to W x."""
        if self.kind == "naive":
            return self.origin + self.perturbation
        return (self.memories @ self.memory_weight).squeeze(0)

    def perturbation_size(self) -> float:
        """The L-inf size of the perturbation the budget bounds: |delta| (naive) or |m| (multimodal)."""
        with torch.no_grad():
            return float(self.adversarial_parameters()[0].abs().max())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias())

    def adversarial_parameters(self) -> list[nn.Parameter]:
        """What FGSM moves and the optimiser must never see: d (naive) or m (multimodal)."""
        return [self.perturbation] if self.kind == "naive" else [self.memories]

    @torch.no_grad()
    def fgsm_step(self) -> None:
        """Update delta (or m) from its gradient by `update`, inside the budget; the gradient is then cleared.

        fgsm: p = +/- eps_ap * sign(grad); projected: p = clip(p +/- step_ap * sign(grad), -eps_ap, eps_ap).
        """
        sign = 1.0 if self.direction == "ascent" else -1.0
        for param in self.adversarial_parameters():
            if param.grad is None:
                continue
            if self.update == "fgsm":
                param.copy_(param.grad.sign() * (sign * self.eps_ap))
            else:
                param.add_(param.grad.sign(), alpha=sign * self.step_ap).clamp_(-self.eps_ap, self.eps_ap)
            param.grad = None

    def fold(self) -> nn.Linear:
        """A plain nn.Linear with the same weight and bias d: the same outputs, m and W_ap dropped."""
        linear = nn.Linear(self.in_features, self.out_features, device=self.weight.device, dtype=self.weight.dtype)
        linear.weight = self.weight
        with torch.no_grad():
            linear.bias.copy_(self.bias().detach())
        return linear

    def extra_repr(self) -> str:
        extra = f", memories={self.memories.shape[1]}" if self.kind == "multimodal" else ""
        step = f", step_ap={self.step_ap}" if self.update == "projected" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}{extra}, "
                f"eps_ap={self.eps_ap}, update={self.update}{step}, direction={self.direction}")


def perturbation_bias_layers(model: nn.Module) -> list[tuple[str, PerturbationBiasLinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PerturbationBiasLinear)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def add_perturbation_bias(model: nn.Module, params: PerturbationBiasParams) -> list[str]:
    """Replace the biases of `model`'s nn.Linear layers (all with a bias, or `params.layers`) in place.

    Returns the converted layer names. Bias-less layers are skipped: folding must
    give back the architecture's own state-dict layout.
    """
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    if params.layers is None:
        chosen = [name for name, m in linears.items() if m.bias is not None]
        if not chosen:
            detail = "fully connected layer" if not linears else "fully connected layer with a bias"
            raise ModelError(f"perturbation_bias: model {type(model).__name__} has no {detail} to carry a "
                             "perturbation bias")
    else:
        chosen = list(params.layers)
        for name in chosen:
            if name not in linears:
                raise ConfigError(f"perturbation_bias.layers names '{name}', which is not an nn.Linear of "
                                  f"{type(model).__name__} (its Linear layers: {', '.join(linears) or 'none'})")
            if linears[name].bias is None:
                raise ConfigError(f"perturbation_bias.layers names '{name}', which has no bias to replace; "
                                  "folding it would not give back the architecture")
    options = {"kind": params.kind, "eps_ap": params.eps_ap, "memories": params.memories,
               "direction": params.direction, "update": params.update, "step_ap": params.step_ap}
    for name in chosen:
        _set_submodule(model, name, PerturbationBiasLinear.from_linear(linears[name], name=name, **options))
    return chosen


def fold_perturbation_bias(model: nn.Module) -> int:
    """Replace every PerturbationBiasLinear by its plain nn.Linear fold; returns how many were folded."""
    layers = perturbation_bias_layers(model)
    for name, layer in layers:
        _set_submodule(model, name, layer.fold())
    return len(layers)


class PerturbationBiasMethod(Method):
    """Cross-entropy on `batch.x` with perturbation biases in the fully connected layers, stepped by FGSM."""

    name = "perturbation_bias"
    params_model: ClassVar[type[BaseModel]] = PerturbationBiasParams
    params: PerturbationBiasParams

    def __init__(self, params: PerturbationBiasParams | None = None, **values: Any) -> None:
        super().__init__(params, **values)
        self._layers: list[PerturbationBiasLinear] = []

    def setup(self, model: nn.Module, device: torch.device) -> None:
        existing = perturbation_bias_layers(model)
        if not existing:
            names = add_perturbation_bias(model, self.params)
            log.info("perturbation_bias: %s %s bias (%s update, budget eps_ap %g) in %s", self.params.direction,
                     self.params.kind, self.params.update, self.params.eps_ap, ", ".join(names))
        self._layers = [layer for _, layer in perturbation_bias_layers(model)]

    def parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        moved_by_fgsm = {id(p) for layer in self._layers for p in layer.adversarial_parameters()}
        return [p for p in model.parameters() if p.requires_grad and id(p) not in moved_by_fgsm]

    def training_step(self, model: nn.Module, batch: Batch,
                      ctx: StepContext) -> tuple[Tensor, dict[str, Any]]:
        return cross_entropy_step(model, batch)

    def after_backward(self, model: nn.Module, batch: Batch, ctx: StepContext) -> None:
        for layer in self._layers:
            layer.fgsm_step()

    def on_epoch_end(self, model: nn.Module, epoch: int, record: dict[str, Any]) -> None:
        if self._layers:
            with torch.no_grad():
                record["perturbation_bias_abs"] = float(torch.stack(
                    [layer.bias().abs().mean() for layer in self._layers]).mean())
            # the largest |delta| (or |m|) of any layer: never above eps_ap
            record["perturbation_linf"] = max(layer.perturbation_size() for layer in self._layers)

    def export(self, model: nn.Module) -> nn.Module:
        """What to save as the run's model file mid-training: a folded copy, an ordinary registry model."""
        if not perturbation_bias_layers(model):
            return model
        folded = copy.deepcopy(model)
        fold_perturbation_bias(folded)
        return folded

    def teardown(self, model: nn.Module) -> None:
        if self.params.fold_at_end:
            folded = fold_perturbation_bias(model)
            if folded:
                log.info("perturbation_bias: folded %d layers into plain nn.Linear", folded)
        self._layers = []
