"""The one batch type every loader yields and every trainer, method and evaluation consumes.

    for batch in loader:                 # map-style store loader, streaming loader or source loader
        batch = batch.to(device)         # every tensor moves; nothing else does
        logits = model(batch.x)
        loss = F.cross_entropy(logits, batch.y)
        adversarial = batch.is_adv       # variant > 0

Fields (B images of shape C x H x W):

- `x`: float32 (B, C, H, W) in [0, 1], what the model trains on (clean or the drawn variant);
- `y`: int64 (B,) labels;
- `variant`: int64 (B,) variant ids, 0 = clean, k = the store's k-th variant (`Store.variants`);
- `index`: int64 (B,) the images' ids within their split;
- `x_clean`: the same images' clean twins (float32, like x), only when a loader pairs them.

`batch["x"]` reads a field by name as well, so code written against the earlier dict batches keeps
working. DataLoader workers return Batches whole (batch_size=None), and `pin_memory=True` pins them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class Batch:
    x: Tensor
    y: Tensor
    variant: Tensor
    index: Tensor
    x_clean: Tensor | None = None

    @classmethod
    def clean(cls, x: Tensor, y: Tensor, index: Tensor) -> Batch:
        """A batch of clean images only (variant 0), as the source-data loader yields."""
        return cls(x=x, y=y, variant=torch.zeros(len(y), dtype=torch.int64), index=index)

    @property
    def is_adv(self) -> Tensor:
        """Bool (B,): the image is an adversarial or perturbed variant, not the clean one."""
        return self.variant > 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, key: str) -> Tensor:
        if key == "is_adv":
            return self.is_adv
        value = getattr(self, key, None) if key in FIELDS else None
        if value is None:
            raise KeyError(f"this batch has no field '{key}' (it has: {', '.join(self.keys())})")
        return value

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def keys(self) -> list[str]:
        """Names of the fields present, and is_adv: a batch reads like the dicts loaders used to yield."""
        return [*self.tensors(), "is_adv"]

    def items(self) -> list[tuple[str, Tensor]]:
        return [(key, self[key]) for key in self.keys()]

    def tensors(self) -> dict[str, Tensor]:
        """The stored fields that hold tensors (x_clean only when present)."""
        return {name: value for name in FIELDS if (value := getattr(self, name)) is not None}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Every tensor on `device` (a no-op copy-free move when it is already there)."""
        return replace(self, **{k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors().items()})

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True): page-locked tensors for asynchronous copies to a GPU."""
        return replace(self, **{k: v.pin_memory() for k, v in self.tensors().items()})


FIELDS = tuple(f.name for f in fields(Batch))
