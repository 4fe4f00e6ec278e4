"""DeepFool: repeated minimal linearised steps across the nearest class boundary, with overshoot.

Backends:
- `art`: ART `DeepFool(epsilon=overshoot, max_iter, nb_grads)`.
- `native`: the same algorithm in batched PyTorch on the generator's device. Each image
  keeps its own top-`nb_grads` classes and stops on its own (an active mask), so its
  result does not depend on the rest of the batch.

ART stops an image once its current iterate `x + r` is misclassified and applies the
overshoot only at the end: `clip(x + (1 + overshoot) * r, 0, 1)`. Because the linear
steps aim exactly at the boundary, many images then creep along it for most of
`max_iter` steps (most of ART's run time on small CNNs). The native backend by default
stops an image as soon as its final output, the overshot point, is misclassified (as in
the DeepFool authors' code): the returned image is of the same form, its L2 distance is
the same or smaller, and it is typically reached in 2-4 steps. `stop_check: iterate`
reproduces ART's rule (and ART's output, up to float rounding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from pydantic import Field

from advpipe.pipeline.generators.attack import AttackGenerator
from advpipe.pipeline.generators.base import GeneratorParams
from advpipe.pipeline.generators.common import Iterations

if TYPE_CHECKING:
    from art.attacks.attack import EvasionAttack
    from art.estimators.classification import PyTorchClassifier

#: ART's guard against division by zero (`tol = 10e-8`).
_TOL = 1e-7


class DeepFoolParams(GeneratorParams):
    overshoot: float = Field(default=0.02, ge=0.0, le=1.0)
    max_iter: Iterations = 50
    nb_grads: int = Field(default=10, ge=2, description="classes considered: the top nb_grads")
    #: Which point must be misclassified to stop an image: `iterate` (x + r, ART) or
    #: `overshot` (clip(x + (1 + overshoot) r), native only). None: the backend's own rule.
    stop_check: Literal["iterate", "overshot"] | None = None


class DeepFoolGenerator(AttackGenerator):
    """Untargeted DeepFool against the model's *predicted* class (labels are not used, as in ART).

    With `nb_grads` below the number of classes, ART takes the union of every image's
    top classes over the whole batch, so its output then depends on the batch; the
    native backend uses each image's own top classes.
    """

    params_model: ClassVar[type[GeneratorParams]] = DeepFoolParams
    backends: ClassVar[tuple[str, ...]] = ("art", "native")
    pass_labels: ClassVar[bool] = False
    name: ClassVar[str] = "deepfool"
    params: DeepFoolParams

    @classmethod
    def resolve_params(cls, params: GeneratorParams, backend: str) -> GeneratorParams:
        assert isinstance(params, DeepFoolParams)
        if params.stop_check is None:
            return params.model_copy(
                update={"stop_check": "iterate" if backend == "art" else "overshot"})
        if backend == "art" and params.stop_check != "iterate":
            raise ValueError("stop_check 'overshot' needs backend 'native' (ART stops on the iterate)")
        return params

    def build_art_attack(self, classifier: PyTorchClassifier) -> EvasionAttack:
        from art.attacks.evasion import DeepFool

        return DeepFool(classifier, max_iter=self.params.max_iter, epsilon=self.params.overshoot,
                        nb_grads=self.params.nb_grads, batch_size=self.batch_size, verbose=False)

    def run_native(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return deepfool(self.model, x, max_iter=self.params.max_iter,
                        overshoot=self.params.overshoot, nb_grads=self.params.nb_grads,
                        stop_on_overshot=self.params.stop_check == "overshot")


def class_gradients(logits: torch.Tensor, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """d logits[i, classes[i, j]] / d x[i] for every image i and column j: shape (N, k, *x.shape[1:]).

    One backward pass per column; images are independent, so summing over the batch
    gives each image its own gradient.
    """
    k = classes.shape[1]
    grads = []
    for j in range(k):
        (grad,) = torch.autograd.grad(logits.gather(1, classes[:, j:j + 1]).sum(), x,
                                      retain_graph=j < k - 1)
        grads.append(grad)
    return torch.stack(grads, dim=1)


def deepfool(model: torch.nn.Module, x: torch.Tensor, *, max_iter: int, overshoot: float,
             nb_grads: int, stop_on_overshot: bool) -> torch.Tensor:
    """Batched multi-class DeepFool (ART's variant); returns `clip(x + (1 + overshoot) r, 0, 1)`.

    Each step moves an image to the linearised boundary of the class `l` that minimises
    `|f_l - f_k| / ||grad f_l - grad f_k||` among its top classes (k: the originally
    predicted class), then clips to [0, 1]. Only images still classified as k are
    computed on.
    """
    with torch.no_grad():
        logits = model(x)
    classes = logits.topk(min(nb_grads, logits.shape[1]), dim=1).indices  # column 0: k
    original = classes[:, 0]
    x_iter = x.clone()
    active = torch.arange(len(x), device=x.device)

    for step in range(max_iter):
        if step > 0:
            with torch.no_grad():
                probe = x_iter[active]
                if stop_on_overshot:
                    probe = (x[active] + (1 + overshoot) * (probe - x[active])).clamp(0, 1)
                active = active[model(probe).argmax(dim=1) == original[active]]
        if active.numel() == 0:
            break
        x_act = x_iter[active].requires_grad_(True)
        logits = model(x_act)
        cls = classes[active]
        f_diff = (logits - logits.gather(1, cls[:, :1])).gather(1, cls).detach()
        grads = class_gradients(logits, x_act, cls).flatten(2)
        w_diff = grads - grads[:, :1]
        ratio = f_diff.abs() / (w_diff.norm(dim=2) + _TOL)
        ratio[:, 0] = float("inf")
        rows = torch.arange(len(active), device=x.device)
        nearest = ratio.argmin(dim=1)
        w = w_diff[rows, nearest]
        size = f_diff[rows, nearest].abs() / (w.pow(2).sum(dim=1) + _TOL)
        x_iter[active] = (x_act.detach() + (size[:, None] * w).view_as(x_act)).clamp(0.0, 1.0)

    return (x + (1 + overshoot) * (x_iter - x)).clamp(0.0, 1.0)
