"""The bridge to the Adversarial Robustness Toolbox (ART).

ART is imported inside the functions, never at module level, so that validating a
config (which imports the generator modules) does not pay for importing ART.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from art.attacks.attack import EvasionAttack
    from art.estimators.classification import PyTorchClassifier


def art_classifier(model: nn.Module, device: torch.device) -> PyTorchClassifier:
    """Wrap a source model for ART: inputs in [0, 1] (normalisation is inside the model), logits out.

    Built once per generator, i.e. once per worker and model, because the wrapper
    inspects and moves the model. ART picks the *current* CUDA device for
    `device_type="gpu"`, so the wrapper is created with `device` made current.
    """
    from art.estimators.classification import PyTorchClassifier

    input_shape = tuple(int(d) for d in model.input_shape)
    on_gpu = device.type == "cuda"
    context = torch.cuda.device(device) if on_gpu else contextlib.nullcontext()
    with context:
        return PyTorchClassifier(
            model=model,
            loss=nn.CrossEntropyLoss(),
            input_shape=input_shape,
            nb_classes=int(model.num_classes),
            clip_values=(0.0, 1.0),
            device_type="gpu" if on_gpu else "cpu",
        )


def run_art_attack(attack: EvasionAttack, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Run an ART evasion attack on a torch batch and return the result as a tensor on x's device.

    `y` (class indices) are the true labels for untargeted attacks; None lets ART use
    the model's predictions instead (DeepFool always does).
    """
    x_np = x.detach().cpu().numpy().astype(np.float32, copy=False)
    y_np = None if y is None else y.detach().cpu().numpy()
    x_adv = attack.generate(x_np, y_np)
    return torch.from_numpy(np.ascontiguousarray(x_adv, dtype=np.float32)).to(x.device)
