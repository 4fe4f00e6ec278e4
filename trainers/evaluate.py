"""Measuring trained models on a store's test split.

`variant_accuracy` is the layout of the detector paper's Table 4: a model's accuracy on the
clean test images and on each stored variant of them (transfer from the source model).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from advpipe.config import SamplerConfig
from advpipe.devices import resolve_device
from advpipe.sampler import open_loader
from advpipe.stores import Store
from advpipe.trainers.loop import evaluate

EVAL_BATCH = 512


def variant_accuracy(model: nn.Module, store: Store, split: str = "test", *, device: torch.device | str = "cpu",
                     predict: Callable[[Tensor], Tensor] | None = None,
                     batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """Accuracy on the clean images and on every stored variant of `split` (clean first)."""
    device = resolve_device(device)
    model.to(device)
    result = {}
    for name in store.variants:
        only = SamplerConfig(ratio=(0.0, 0.0)) if name == "clean" else \
            SamplerConfig(ratio=(1.0, 1.0), weights={name: 1.0})
        loader = open_loader(store.path, split, only, reader="map", batch_size=batch_size, shuffle=False,
                             rank=0, world_size=1)
        result[name] = evaluate(model, loader, device, predict=predict)
    return result
