"""One exception family, so the CLI can turn any expected failure into a clear message and exit code.

Every message names the thing that is wrong (a file, a key, a shard) and, where
there is one, what to do about it.
"""

from __future__ import annotations

import reprlib
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


class SourceChangedError(DataError):
    """A source's bytes are not those its index recorded (changed under a job, or corrupt)."""

    exit_code = 3


class ModelError(AdvpipeError):
    """A model architecture or checkpoint is unknown, malformed or mismatched."""


class StoreError(AdvpipeError):
    """A store is incomplete, corrupt, or does not match what was asked of it."""


class LockLostError(StoreError):
    """A writer's lock on an object-storage store was taken over by another writer (a newer fencing token)."""


class IntegrityError(StoreError):
    """A shard's bytes do not match its manifest (checksum, size, counts, shapes)."""

    exit_code = 3


class GenerationError(AdvpipeError):
    """Generating variants failed or was asked to do something unsafe."""


class SamplerError(AdvpipeError):
    """A sampling policy is invalid or does not fit the store."""


class TrainingError(AdvpipeError):
    """Training cannot start or go on (diverged, nothing to train on, a run directory that does not fit)."""


class UsageError(AdvpipeError):
    """A command-line option is invalid (argparse checks the syntax; this the meaning)."""


#: the most characters of a user-supplied value (a key, a string, a list) an error message echoes
SHOWN_CHARS = 80
#: the most problems one validation error lists; the rest are counted
SHOWN_PROBLEMS = 10


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` on one line, cut to `limit` characters with the number left out, so a message never grows with
    the input."""
    text = " ".join(text.splitlines())
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def _bounded_repr() -> reprlib.Repr:
    bounded = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments
    bounded.maxlevel, bounded.maxstring, bounded.maxlong, bounded.maxother = 3, SHOWN_CHARS, 40, SHOWN_CHARS
    bounded.maxtuple = bounded.maxlist = bounded.maxdict = bounded.maxset = bounded.maxfrozenset = 6
    return bounded


_REPR = _bounded_repr()


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """A repr of `value` cut to `limit` characters, built without rendering a huge or deep value whole."""
    if isinstance(value, int) and value.bit_length() > 128:  # repr of a huge int is slow, or refused
        return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    try:
        text = _REPR.repr(value)
    except (RecursionError, ValueError):  # defensive: a repr that refuses (e.g. a broken __repr__)
        text = f"<{type(value).__name__}>"
    return shorten(text, limit)


def describe_validation_error(exc: ValidationError, prefix: str = "", noun: str = "key") -> list[str]:
    """One line per pydantic problem, naming the dotted key: "unknown key 'x'", "key 'a.b': must be ...".

    The one formatter of validation errors (configs, generator and method parameters, manifests);
    `noun` is what the keys are called where the error is shown ("key", "parameter").
    Keys, messages and values are cut to SHOWN_CHARS, and at most SHOWN_PROBLEMS problems are listed,
    so a hostile input (a 1 MB key, a list of a million bad entries) cannot flood the terminal.
    """
    errors = exc.errors()
    lines = []
    for error in errors[:SHOWN_PROBLEMS]:
        key = shorten(".".join(str(part) for part in error["loc"]))
        if error["type"] == "extra_forbidden":
            lines.append(f"{prefix}unknown {noun} '{key}' (check its spelling against the docs)")
        elif error["type"] == "missing":
            lines.append(f"{prefix}missing {noun} '{key}'")
        else:
            message = shorten(error["msg"].removeprefix("Value error, "), 4 * SHOWN_CHARS)
            got = f" (got {shown(error['input'])})" if not isinstance(error["input"], dict) else ""
            where = f"{noun} '{key}': " if key else ""  # a check of the whole section names no key
            lines.append(f"{prefix}{where}{message}{got}")
    if len(errors) > SHOWN_PROBLEMS:
        lines.append(f"{prefix}... and {len(errors) - SHOWN_PROBLEMS} more problem(s)")
    return lines
