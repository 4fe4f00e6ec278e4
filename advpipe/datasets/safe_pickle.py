"""Unpickling CIFAR batches without letting the file run code.

A pickle can call any importable function while it loads (os.system included),
so pickle.load on a downloaded file is code execution. The CIFAR batches only
need dicts, lists, bytes, str and int (no globals at all) plus numpy arrays, so
every global is refused except numpy's array reconstruction and the latin-1
`_codecs.encode` that Python 3 protocol-2 pickles use to store bytes.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np

from advpipe.errors import DataError

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """_codecs.encode limited to what protocol-2 pickles of bytes need: str -> latin-1 bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) refused")
    return text.encode("latin-1")


ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose find_class knows only the ALLOWED globals."""

    def __init__(self, data: bytes, origin: str) -> None:
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.origin = origin

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.origin}: refusing to unpickle global '{module}.{name}'; CIFAR batches "
                "hold only dicts, lists, bytes and numpy arrays, so this file is not a CIFAR "
                "batch or has been tampered with (re-download it)"
            ) from None


def safe_loads(data: bytes, origin: str) -> Any:
    """Unpickle `data` (keys come back as bytes, as in the Python 2 CIFAR files)."""
    try:
        return RestrictedUnpickler(data, origin).load()
    except DataError:
        raise
    except Exception as exc:  # a corrupt pickle can raise almost anything
        raise DataError(f"{origin}: not a readable pickle ({type(exc).__name__}: {exc})") from exc
