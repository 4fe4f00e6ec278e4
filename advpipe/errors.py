"""One exception family, so the CLI can turn any expected failure into a clear message and exit code.

Every message names the thing that is wrong (a file, a key, a shard) and, where
there is one, what to do about it.
"""


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
