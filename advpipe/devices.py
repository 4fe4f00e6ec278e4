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
    return device
