"""FGSM: one signed-gradient step of size eps, untargeted, L-inf (ART `FastGradientMethod`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from advpipe.pipeline.generators.attack import AttackGenerator
from advpipe.pipeline.generators.base import GeneratorParams
from advpipe.pipeline.generators.common import PixelBudget

if TYPE_CHECKING:
    from art.attacks.attack import EvasionAttack
    from art.estimators.classification import PyTorchClassifier


class FGSMParams(GeneratorParams):
    #: Pixel-space step (METHODS.md: the paper's 0.005 was applied after dividing by the
    #: per-channel std, about 0.2). MNIST-like data needs 0.1-0.3 to fool a model.
    eps: PixelBudget = 0.025


class FGSMGenerator(AttackGenerator):
    """`clip(x + eps * sign(grad_x CE(f(x), y)), 0, 1)` with the true label y.

    The sign of the gradient does not depend on the other images of the batch
    (ART averages the loss over the batch, which only scales the gradient).
    """

    params_model: ClassVar[type[GeneratorParams]] = FGSMParams
    backends: ClassVar[tuple[str, ...]] = ("art",)
    name: ClassVar[str] = "fgsm"
    params: FGSMParams

    def build_art_attack(self, classifier: PyTorchClassifier) -> EvasionAttack:
        from art.attacks.evasion import FastGradientMethod

        return FastGradientMethod(classifier, norm="inf", eps=self.params.eps, targeted=False,
                                  num_random_init=0, batch_size=self.batch_size, minimal=False)
