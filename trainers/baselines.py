"""The baselines every robust method is compared with: clean, adversarial and dynamic training.

All three are cross-entropy on the batch the sampler draws; they differ in what is drawn:
- `clean`: the clean images only (the source model is trained this way);
- `adversarial`: a fixed share `ratio` of stored adversarial variants, uniform over the attacks
  (the detector paper's "Adv Train");
- `dynamic`: the config's bounded-range sampler (METHODS.md section 2); with the sampler's
  `adaptive: true`, each epoch's per-variant training error is fed back through `update()`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from advpipe.batch import Batch
from advpipe.config import SamplerConfig
from advpipe.trainers.loop import DataRegime, Method, StepContext, regime_sampler


def cross_entropy_step(model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Any]]:
    """Cross-entropy on batch.x, with the per-sample correctness the loop turns into per-variant accuracy."""
    logits = model(batch.x)
    correct = logits.argmax(dim=1) == batch.y
    return F.cross_entropy(logits, batch.y), {"acc": correct.float().mean().item(), "correct": correct}


class CleanMethod(Method):
    """Cross-entropy on whatever images the batch holds; by default the store's clean images."""

    name = "clean"

    def training_step(self, model: nn.Module, batch: Batch, ctx: StepContext) -> tuple[Tensor, dict[str, Any]]:
        return cross_entropy_step(model, batch)


class AdversarialParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ratio: float = Field(default=0.5, ge=0.0, le=1.0, description="share of adversarial images per batch")


class AdversarialMethod(CleanMethod):
    """Adversarial training from the store: a fixed share of each batch is a stored attack."""

    name = "adversarial"
    params_model: ClassVar[type[BaseModel]] = AdversarialParams
    default_data: ClassVar[DataRegime] = "both"

    def sampler_config(self, data: DataRegime, base: SamplerConfig, attacks: list[str]) -> SamplerConfig:
        config = regime_sampler(data, base, attacks)
        if data == "both":
            config = SamplerConfig.model_validate({**config.model_dump(), "ratio": self.params.ratio})
        return config


class DynamicMethod(CleanMethod):
    """Training on the dynamic-probability sampler; adaptive mode gets each epoch's per-variant error."""

    name = "dynamic"
    default_data: ClassVar[DataRegime] = "sampler"

    def on_epoch_end(self, model: nn.Module, epoch: int, record: dict[str, Any]) -> None:
        policy = getattr(self.loader, "policy", None)
        if policy is None or not policy.adaptive:
            return
        errors = {name: 1.0 - record[f"train_acc/{name}"] for name in policy.names
                  if f"train_acc/{name}" in record}
        self.loader.update(errors)
        record["adaptive_errors"] = errors
