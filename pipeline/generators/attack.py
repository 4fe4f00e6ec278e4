"""Common base of the white-box attacks (FGSM, BIM, DeepFool, C&W): one model, two backends."""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import nn

from advpipe.errors import GenerationError
from advpipe.pipeline.generators.art_support import art_classifier, run_art_attack
from advpipe.pipeline.generators.base import Generator, GeneratorParams
from advpipe.pipeline.generators.common import finalize, gradients_on

if TYPE_CHECKING:
    from art.attacks.attack import EvasionAttack
    from art.estimators.classification import PyTorchClassifier


class AttackGenerator(Generator):
    """Runs an attack against the source model, through ART or a native PyTorch implementation.

    The ART classifier wrapper and the attack object are built once, here, not per
    batch. Subclasses implement `build_art_attack` and, if they list `native` in
    `backends`, `run_native`. Attacks are untargeted and deterministic (no random
    initialisation); the true labels are passed to ART unless `pass_labels` is False.
    """

    needs_model: ClassVar[bool] = True
    pass_labels: ClassVar[bool] = True
    name: ClassVar[str] = "attack"

    def __init__(self, params: GeneratorParams, model: nn.Module, *, backend: str = "art",
                 device: torch.device | str = "cpu", batch_size: int = 128) -> None:
        super().__init__(params, model, backend=backend, device=device, batch_size=batch_size)
        self.model = model.to(self.device).eval()
        self._art_attack: EvasionAttack | None = None
        if backend == "art":
            self._art_attack = self.build_art_attack(art_classifier(self.model, self.device))

    @abstractmethod
    def build_art_attack(self, classifier: PyTorchClassifier) -> EvasionAttack:
        """The configured ART attack (verbose off, batch size = the generator's)."""

    def run_native(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The native implementation, with autograd enabled and the model's weights frozen."""
        raise GenerationError(f"{type(self).__name__} has no native backend (config validation should have "
                              "refused this variant)")

    def generate(self, x: torch.Tensor, y: torch.Tensor, seeds: np.ndarray) -> torch.Tensor:
        with gradients_on(self.model):
            if self._art_attack is not None:
                out = run_art_attack(self._art_attack, x, y if self.pass_labels else None)
            else:
                out = self.run_native(x.clone(), y.clone())
        return finalize(out, x, self.name)
