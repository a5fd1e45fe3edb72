"""User-facing errors. Every error a user can cause is an EvalkitError: the CLI prints its message
as one line and exits non-zero. Messages say what is wrong and what to do about it."""

from __future__ import annotations


class EvalkitError(ValueError):
    """Bad input or a state the user can fix. Its message is one self-contained line."""


class DataError(EvalkitError):
    """Input data is missing, malformed or inconsistent (missing column, null text, corrupt file)."""


class StoreError(EvalkitError):
    """The embedding store or a precompute output directory is inconsistent or unusable."""


class FingerprintMismatchError(EvalkitError):
    """An output (embeddings directory, index) was made with another model fingerprint."""


class MissingExtraError(EvalkitError, ImportError):
    """An optional dependency is not installed; the message names the pip extra."""
