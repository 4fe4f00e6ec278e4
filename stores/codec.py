"""How a variant's pixels are kept on disk, for each precision mode.

Rounding an adversarial image to uint8 moves pixels by up to 1/510, enough to
undo minimal attacks (METHODS.md section 1). The default mode therefore keeps
the clean image as uint8 (exact: the source is uint8) and each variant as its
perturbation `delta = variant - clean/255` in float16, whose rounding error
shrinks with the perturbation itself.

| precision | stored per variant          | reconstruction                     |
|-----------|-----------------------------|------------------------------------|
| float16   | delta, float16              | clip(clean/255 + delta, 0, 1)      |
| float32   | delta, float32              | clip(clean/255 + delta, 0, 1)      |
| uint8     | round(variant * 255), uint8 | stored / 255                       |

Even a float16 delta can undo a boundary-minimal attack (C&W, DeepFool stop just across the
boundary), so a variant may take its own delta precision (`precision: float32` in the config):
float16 and float32 deltas share one reconstruction formula and can live in one store.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

STORED_DTYPE = {"float16": np.float16, "float32": np.float32, "uint8": np.uint8}
DELTA_PRECISIONS = ("float16", "float32")  # the modes that store `variant - clean/255`; they can share a store


@dataclass(frozen=True)
class Encoded:
    """A variant as stored, plus what encoding it cost."""

    stored: np.ndarray
    failed: np.ndarray  # bool (n,): the generator gave NaN/inf for these images
    max_abs_error: float
    decoded: np.ndarray  # what a reader gets back (statistics are measured on it)
    fresh: np.ndarray  # the generator's output as encoded: failures replaced by clean, clipped to [0, 1]


def to_float(clean: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The canonical uint8 -> float conversion (x / 255, correctly rounded) used everywhere.

    One pass (the cast happens inside the division's loop), optionally into `out`: a third
    faster than casting and then dividing, with bit-identical results.
    """
    return np.divide(clean, np.float32(255), out=out, dtype=np.float32)


def encode(clean: np.ndarray, variant: np.ndarray, precision: str) -> Encoded:
    """Encode a float variant batch in [0, 1] against its uint8 clean batch.

    Rows with a non-finite value are failures: they are stored as the clean image
    (delta 0) and flagged, so a NaN never reaches the disk.
    """
    variant = np.asarray(variant, dtype=np.float32)
    failed = ~np.isfinite(variant).reshape(len(variant), -1).all(axis=1)
    base = to_float(clean)
    variant = np.where(failed.reshape(-1, *([1] * (variant.ndim - 1))), base, variant)
    variant = np.clip(variant, 0.0, 1.0)
    if precision == "uint8":
        stored = np.rint(variant * 255.0).astype(np.uint8)
    else:
        stored = (variant - base).astype(STORED_DTYPE[precision])
    decoded = decode(clean, stored, precision)
    error = np.abs(decoded - variant)
    return Encoded(stored=stored, failed=failed, max_abs_error=float(error.max(initial=0.0)), decoded=decoded,
                   fresh=variant)


def decode(clean: np.ndarray | None, stored: np.ndarray, precision: str, out: np.ndarray | None = None) -> np.ndarray:
    """Float32 pixels in [0, 1] from the stored form (see the table above), optionally into `out`.

    `clean` may be None for a uint8 store (its stored form is the pixels themselves). The float16
    delta is widened and added with torch, whose float16 -> float32 conversion is vectorised (numpy's
    is not): the result is bit-identical to adding `stored.astype(float32)` in numpy.
    """
    if precision == "uint8":
        return to_float(stored, out)
    if clean is None:
        raise ValueError(f"decoding a {precision} store needs the clean uint8 images")
    return apply(to_float(clean, out), stored, precision)


def apply(base: np.ndarray, stored: np.ndarray, precision: str) -> np.ndarray:
    """Like `decode`, given the clean image already as float (`to_float(clean)`); may reuse `base`."""
    if precision == "uint8":
        return to_float(stored)
    delta = torch.from_numpy(np.ascontiguousarray(stored))
    if delta.dtype != torch.float32:  # widen first: torch's mixed-dtype add runs a slow per-element cast, a
        delta = _scratch(delta.shape).copy_(delta)  # vectorised widening plus a float32 add costs less (exact both)
    torch.from_numpy(base).add_(delta).clamp_(0.0, 1.0)  # clamp: a float16 delta can overshoot 0 or 1 by rounding
    return base


_local = threading.local()


def _scratch(shape: torch.Size) -> torch.Tensor:
    """A float32 buffer of `shape`, reused by this thread: a fresh batch-sized one costs a page fault per 4 KiB."""
    count = shape.numel()
    buffer = getattr(_local, "buffer", None)
    if buffer is None or buffer.numel() < count:
        buffer = _local.buffer = torch.empty(count, dtype=torch.float32)
    return buffer[:count].view(shape)


def decode_tensor(clean: torch.Tensor | None, stored: torch.Tensor, precision: str) -> torch.Tensor:
    """`decode` for torch tensors on any device: what a training loop runs after moving a stored-form batch.

    Bit-identical to `decode` on the CPU. The divisor is a tensor on the data's device, not a Python
    number: CUDA replaces division by a CPU scalar with multiplication by its reciprocal, which is
    off by one unit in the last place for some pixel values.
    """
    if stored.device.type == "cpu":  # numpy's one-pass uint8 division is about twice torch's on a CPU
        return torch.from_numpy(decode(None if clean is None else clean.numpy(), stored.numpy(), precision))
    return decode_torch(clean, stored, precision)


def decode_torch(clean: torch.Tensor | None, stored: torch.Tensor, precision: str) -> torch.Tensor:
    """`decode_tensor` in torch operations only, on whatever device the tensors are (a GPU's path)."""
    if precision == "uint8":
        return _div255(stored)
    if clean is None:
        raise ValueError(f"decoding a {precision} store needs the clean uint8 images")
    return _div255(clean).add_(stored).clamp_(0.0, 1.0)


def _div255(pixels: torch.Tensor) -> torch.Tensor:
    if pixels.dtype != torch.uint8:
        raise ValueError(f"stored pixels must be uint8, got {pixels.dtype}")
    return torch.div(pixels, torch.tensor(255.0, dtype=torch.float32, device=pixels.device))


def decode_mixed(clean: np.ndarray, adversarial: np.ndarray, groups: list[tuple[np.ndarray, np.ndarray]],
                 precision: str) -> np.ndarray:
    """Rows of one shard where rows `adversarial[positions]` take the stored values of each group, the rest stay clean.

    `groups` holds (positions into `adversarial`, stored values), one per stacked array
    (`ShardReader.stored_pairs`). uint8 stores pick pixels first and convert once; delta
    stores (float16 and float32 arrays alike) convert the clean rows once and add the deltas in place.
    """
    if precision == "uint8":
        pixels = clean.copy()
        for positions, stored in groups:
            pixels[adversarial[positions]] = stored
        return to_float(pixels)
    decoded = to_float(clean)
    for positions, stored in groups:
        rows = adversarial[positions]
        decoded[rows] = apply(decoded[rows], stored, precision)
    return decoded
