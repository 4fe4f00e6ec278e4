"""Choosing the torch device: CPU everywhere, a GPU when one is there and asked for."""

from __future__ import annotations

import torch

from advpipe.errors import ConfigError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto' picks CUDA when available; an explicit 'cuda' without a GPU is an error, not a fallback."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device '{name}' is not a torch device (use cpu, cuda, cuda:N or auto)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for but no CUDA GPU is available; use --device cpu")
    # the index as written: torch keeps it in 8 bits, so 'cuda:999' would silently become cuda:-25
    index = int(str(name).partition(":")[2]) if device.index is not None else None
    if device.type == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' was asked for but this machine has {torch.cuda.device_count()} CUDA "
                          f"GPU(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1}); choose one of them")
    return device
