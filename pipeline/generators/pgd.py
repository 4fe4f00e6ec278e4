"""PGD: projected gradient descent from a random start in the eps ball (Madry et al.; ART).

`max_iter` gradient steps of `eps_step` (the gradient's sign for L-inf, the gradient scaled
to L2 norm `eps_step` for L2), each projected back to the eps ball around the clean image
and to [0, 1]. The iterations are ART's `ProjectedGradientDescentPyTorch`, the
implementation `ProjectedGradientDescent` picks for a PyTorch model.

Random start: ART draws it from numpy's global generator for a whole batch, which would
make an image's variant depend on its batch and on everything else that used that
generator. Here each image's start is drawn from its own seed instead (uniform in the
L-inf box, or uniform in the L2 ball, the distributions ART uses), clipped to [0, 1] as ART
clips its own start, and handed to ART's first iteration; the rest of the attack is ART's.
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from advpipe.errors import GenerationError
from advpipe.pipeline.generators.attack import AttackGenerator
from advpipe.pipeline.generators.base import GeneratorParams, image_generator
from advpipe.pipeline.generators.common import Iterations, seed_list

if TYPE_CHECKING:
    from art.attacks.attack import EvasionAttack
    from art.estimators.classification import PyTorchClassifier

#: eps per norm when the config leaves it out: 8/255-like for L-inf (as `bim`), 0.5 for L2
#: (the usual CIFAR-10 L2 budget).
DEFAULT_EPS = {"linf": 0.03, "l2": 0.5}
#: eps_step = STEP_FACTOR * eps / max_iter when left out (the rule of Madry et al.'s robustness
#: library): enough to cross the ball from the random start and come back.
STEP_FACTOR = 2.5


class PGDParams(GeneratorParams):
    norm: Literal["linf", "l2"] = "linf"
    #: Radius of the ball, pixel units for images in [0, 1]. None: DEFAULT_EPS[norm].
    eps: float | None = Field(default=None, gt=0.0)
    #: None: STEP_FACTOR * eps / max_iter (0.0075 with the L-inf defaults).
    eps_step: float | None = Field(default=None, gt=0.0)
    max_iter: Iterations = 10
    #: Start from a point drawn uniformly in the ball (seeded per image); False: from the clean image,
    #: which makes L-inf PGD the same attack as `bim`.
    random_init: bool = True

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        # Resolved here, not left None, so the manifest and the variant fingerprint show the values used.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("eps") is None:
            data["eps"] = DEFAULT_EPS.get(data.get("norm", "linf"))
        if data.get("eps_step") is None:
            with contextlib.suppress(TypeError, ValueError):  # a bad eps, max_iter or norm: their checks name it
                data["eps_step"] = STEP_FACTOR * float(data["eps"]) / max(int(data.get("max_iter", 10)), 1)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> PGDParams:
        if self.eps is None or self.eps_step is None:
            raise ValueError("eps and eps_step must be numbers")
        if self.norm == "linf" and self.eps > 1.0:
            raise ValueError(f"eps ({self.eps}) must be <= 1 for norm 'linf' (pixel units for images in [0, 1])")
        # A step larger than the ball makes PGD a clipped FGSM; usually eps and eps_step were swapped.
        if self.eps_step > self.eps:
            raise ValueError(f"eps_step ({self.eps_step}) must not exceed eps ({self.eps})")
        return self


def random_starts(shape: tuple[int, ...], seeds: list[int], norm: str, eps: float) -> np.ndarray:
    """One offset per image, uniform in its eps ball, drawn from the image's own seed (float32)."""
    dims = int(np.prod(shape[1:]))
    starts = np.empty((len(seeds), dims), dtype=np.float32)
    for i, seed in enumerate(seeds):
        rng = image_generator(seed)
        if norm == "linf":
            starts[i] = rng.uniform(-eps, eps, dims)
        else:  # a uniform direction, and a radius with density proportional to r^(dims-1)
            direction = rng.standard_normal(dims)
            starts[i] = direction / np.linalg.norm(direction) * eps * rng.uniform() ** (1.0 / dims)
    return starts.reshape(shape)


@functools.cache
def _seeded_pgd_class() -> type:
    """ART's PyTorch PGD with the random start supplied per image (built on first use: imports ART)."""
    from art.attacks.evasion.projected_gradient_descent.projected_gradient_descent_pytorch import (
        ProjectedGradientDescentPyTorch,
    )

    class SeededPGD(ProjectedGradientDescentPyTorch):
        """ART computes the start inside its first iteration of each internal batch, in order;
        this takes the next rows of `starts` there instead of calling numpy's global generator."""

        starts: torch.Tensor | None = None
        cursor: int = 0

        def _compute_pytorch(self, x, x_init, y, mask, eps, eps_step, random_init, *args, **kwargs):
            if random_init:
                if self.starts is None or self.cursor + len(x) > len(self.starts):
                    raise GenerationError("pgd: ART asked for a random start for more images than it was "
                                          "given seeds for (PGDGenerator.generate sets them)")
                offset = self.starts[self.cursor:self.cursor + len(x)].to(x.device)
                self.cursor += len(x)
                x = (x + offset).clamp(0.0, 1.0)
            return super()._compute_pytorch(x, x_init, y, mask, eps, eps_step, False, *args, **kwargs)

    return SeededPGD


class PGDGenerator(AttackGenerator):
    """Untargeted PGD with the true labels; see the module docstring.

    With the random start, an image's variant depends on its seed and nothing else of the
    batch; without it, PGD is deterministic.
    """

    params_model: ClassVar[type[GeneratorParams]] = PGDParams
    backends: ClassVar[tuple[str, ...]] = ("art",)
    name: ClassVar[str] = "pgd"
    params: PGDParams

    def build_art_attack(self, classifier: PyTorchClassifier) -> EvasionAttack:
        p = self.params
        return _seeded_pgd_class()(classifier, norm="inf" if p.norm == "linf" else 2, eps=p.eps,
                                   eps_step=p.eps_step, max_iter=p.max_iter, targeted=False,
                                   num_random_init=1 if p.random_init else 0, batch_size=self.batch_size,
                                   random_eps=False, verbose=False)

    def generate(self, x: torch.Tensor, y: torch.Tensor, seeds: np.ndarray) -> torch.Tensor:
        attack = self._art_attack
        if self.params.random_init and attack is not None:
            assert self.params.eps is not None
            attack.starts = torch.from_numpy(random_starts(tuple(x.shape), seed_list(x, seeds),
                                                           self.params.norm, self.params.eps))
            attack.cursor = 0
        try:
            return super().generate(x, y, seeds)
        finally:
            if attack is not None:
                attack.starts = None
