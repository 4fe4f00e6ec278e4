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
- `x_clean`: the same images' clean twins (float32, like x), only when a loader pairs them;
- `stored`: only in a batch in stored form (loaders with `stored_form=True`): the images as the store
  keeps them, `x` (and x_clean) None until `batch.decode()`, which the training loop calls after
  moving the batch to its device, so that decoding runs there:

      batch = raw.to(device, non_blocking=True).decode()   # a no-op for a decoded batch

`batch["x"]` reads a field by name as well, so code written against the earlier dict batches keeps
working. DataLoader workers return Batches whole (batch_size=None), and `pin_memory=True` pins them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class StoredPixels:
    """A batch's images as stored (advpipe.stores.codec): about a quarter of float32's bytes for a uint8 store.

    `pixels` is the chosen variant's stored form (uint8 pixels in a uint8 store; the float16 or
    float32 delta from the clean image otherwise, 0 for a clean pick); `clean` the uint8 clean
    images (for delta stores, and for x_clean when the loader pairs them).
    """

    pixels: Tensor
    clean: Tensor | None
    precision: str
    pair_clean: bool = False

    @classmethod
    def of(cls, rows, pair_clean: bool = False) -> StoredPixels:
        """From a store's `StoredRows` (numpy), sharing their memory."""
        return cls(torch.from_numpy(rows.stored), None if rows.clean is None else torch.from_numpy(rows.clean),
                   rows.precision, pair_clean)

    def tensors(self) -> dict[str, Tensor]:
        return {name: value for name in ("pixels", "clean") if (value := getattr(self, name)) is not None}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> StoredPixels:
        return replace(self, **{k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors().items()})

    def pin_memory(self) -> StoredPixels:
        return replace(self, **{k: v.pin_memory() for k, v in self.tensors().items()})

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.tensors().values())

    def decode(self) -> tuple[Tensor, Tensor | None]:
        """(x, x_clean or None): float32 in [0, 1] on the tensors' device, bit-identical to the CPU decode."""
        from advpipe.stores.codec import decode_tensor  # the store package imports far more than a batch needs

        x = decode_tensor(self.clean, self.pixels, self.precision)
        x_clean = decode_tensor(None, self.clean, "uint8") if self.pair_clean else None
        return x, x_clean


@dataclass
class Batch:
    x: Tensor | None
    y: Tensor
    variant: Tensor
    index: Tensor
    x_clean: Tensor | None = None
    stored: StoredPixels | None = None

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

    def decode(self) -> Batch:
        """The batch with float pixels: decodes a stored-form batch where its tensors are (else returns it)."""
        if self.stored is None:
            return self
        x, x_clean = self.stored.decode()
        return replace(self, x=x, x_clean=x_clean, stored=None)

    def __getitem__(self, key: str) -> Tensor:
        if key == "is_adv":
            return self.is_adv
        if key in ("x", "x_clean") and self.stored is not None:
            raise KeyError(f"this batch is in stored form: call batch.decode() (after moving it) to get '{key}'")
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
        """Every tensor on `device` (a no-op copy-free move when it is already there), stored form included."""
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors().items()}
        stored = None if self.stored is None else self.stored.to(device, non_blocking)
        return replace(self, **moved, stored=stored)

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True): page-locked tensors for asynchronous copies to a GPU."""
        pinned = {k: v.pin_memory() for k, v in self.tensors().items()}
        return replace(self, **pinned, stored=None if self.stored is None else self.stored.pin_memory())


FIELDS = tuple(f.name for f in fields(Batch) if f.name != "stored")
