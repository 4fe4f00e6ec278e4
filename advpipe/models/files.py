"""Reading tensor files safely: always `weights_only=True`, every failure a ModelError."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from advpipe.errors import ModelError


def load_tensor_file(path: str | Path, what: str, hint: str = "check the path in the config") -> Any:
    """torch.load a file that must hold only tensors and plain containers.

    `weights_only=True` makes torch refuse pickles that would import or call
    anything (a malicious file); that refusal, a truncated file and plain
    garbage each become a ModelError naming the file and `what` it should be.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: {what} not found; {hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names the blocked callable as a GLOBAL; anything else is a malformed pickle.
        if "GLOBAL" in str(exc):
            raise ModelError(
                f"{path}: refused to load this {what}: it references Python objects other than "
                "tensors, which could run arbitrary code when loaded; only use files saved as plain "
                "tensors/state dicts from a source you trust"
            ) from None
        raise ModelError(f"{path}: not a {what} (not a readable torch file)") from None
    except Exception as exc:  # a malformed pickle can fail anywhere inside the unpickler
        raise ModelError(f"{path}: not a {what} (corrupted or truncated torch file: "
                         f"{str(exc).splitlines()[0]})") from None
