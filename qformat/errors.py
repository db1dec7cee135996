"""The qformat exception hierarchy.

Every error qformat raises on bad input is a `QFormatError`. Each leaf also inherits the builtin it is closest to
(`ValueError`, `OSError`, ...) so that callers who catch builtins keep working. Messages are one line and end with
what the user can do about it; the CLI prints them as they are, without a traceback.
"""

from __future__ import annotations

__all__ = [
    "CorruptCheckpointError",
    "FormatError",
    "NonFiniteWeightError",
    "OptionError",
    "OutputError",
    "QFormatError",
    "SourceError",
    "UnsupportedFormatVersionError",
    "UnsupportedModelError",
    "WriteError",
]


class QFormatError(Exception):
    """Root of every error qformat raises on purpose."""


class SourceError(QFormatError, ValueError):
    """The conversion source is missing, is not a Hugging Face model, or cannot be fetched.

    Example: ``/data/x is not a Hugging Face model folder: it has no config.json. Point SOURCE at the folder that
    holds config.json and the weights.``
    """


class UnsupportedModelError(QFormatError, ValueError):
    """The source is a model qformat v1 cannot convert (unknown architecture, fused MoE experts, already quantized)."""


class CorruptCheckpointError(QFormatError, ValueError):
    """A weight file or index is truncated, malformed, or points outside its folder."""


class NonFiniteWeightError(QFormatError, ValueError):
    """A tensor that is to be quantized holds NaN or Inf, so no finite scale exists for it."""


class OptionError(QFormatError, ValueError):
    """A conversion option is invalid (unknown scheme, bad pattern, conflicting fused-group schemes, ...)."""


class OutputError(QFormatError, FileExistsError):
    """OUTPUT cannot be used: it exists (without --overwrite), or it lies inside SOURCE, or SOURCE inside it."""


class WriteError(QFormatError, OSError):
    """Writing the output failed (disk full, file size limit, permissions). Nothing was left behind."""


class FormatError(QFormatError, ValueError):
    """A checkpoint does not follow docs/FORMAT.md. The message names the first problem found."""


class UnsupportedFormatVersionError(FormatError):
    """A checkpoint declares a format major version this qformat does not know; upgrade qformat to read it."""
