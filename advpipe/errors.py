"""One exception family, so the CLI can turn any expected failure into a clear message and exit code.

Every message names the thing that is wrong (a file, a key, a shard) and, where
there is one, what to do about it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class AdvpipeError(Exception):
    """Base class of every error advpipe raises on purpose (bad input, bad store, ...)."""

    exit_code = 2


class ConfigError(AdvpipeError):
    """A config file or value is invalid."""


class DataError(AdvpipeError):
    """A source dataset is missing or malformed."""


class ModelError(AdvpipeError):
    """A model architecture or checkpoint is unknown, malformed or mismatched."""


class StoreError(AdvpipeError):
    """A store is incomplete, corrupt, or does not match what was asked of it."""


class IntegrityError(StoreError):
    """A shard's bytes do not match its manifest (checksum, size, counts, shapes)."""

    exit_code = 3


class GenerationError(AdvpipeError):
    """Generating variants failed or was asked to do something unsafe."""


class SamplerError(AdvpipeError):
    """A sampling policy is invalid or does not fit the store."""


class TrainingError(AdvpipeError):
    """Training cannot start or go on (diverged, nothing to train on, a run directory that does not fit)."""


def describe_validation_error(exc: ValidationError, prefix: str = "", noun: str = "key") -> list[str]:
    """One line per pydantic problem, naming the dotted key: "unknown key 'x'", "key 'a.b': must be ...".

    The one formatter of validation errors (configs, generator and method parameters, manifests);
    `noun` is what the keys are called where the error is shown ("key", "parameter").
    """
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            lines.append(f"{prefix}unknown {noun} '{key}' (check its spelling against the docs)")
        elif error["type"] == "missing":
            lines.append(f"{prefix}missing {noun} '{key}'")
        else:
            message = error["msg"].removeprefix("Value error, ")
            shown = f" (got {error['input']!r})" if not isinstance(error["input"], dict) else ""
            where = f"{noun} '{key}': " if key else ""  # a check of the whole section names no key
            lines.append(f"{prefix}{where}{message}{shown}")
    return lines
