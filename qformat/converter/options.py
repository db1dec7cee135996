"""Conversion options: what `qformat convert` and `qformat.convert()` accept, validated once, recorded verbatim.

The quantization recipe (scheme, ignore, overrides, observer, sparsity, dtype) is `qformat.plan.QuantRecipe`, shared
with the in-memory paths; `ConvertOptions` adds what only a folder-to-folder conversion has.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any

from qformat.errors import OptionError
from qformat.plan.recipe import FULL_PRECISION, QuantRecipe, parse_override

__all__ = ["FULL_PRECISION", "ConvertOptions", "parse_override", "parse_size"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
#: The default largest output shard, as huggingface_hub's default.
DEFAULT_SHARD_SIZE = 5 * 10**9


def parse_size(text: str | int) -> int:
    """"5GB" -> 5_000_000_000 (decimal units, as huggingface_hub uses; "GiB" for binary)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise OptionError(f"cannot read size {text!r}; write it like 5GB or 500MB")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").upper()])


@dataclass(frozen=True, kw_only=True)
class ConvertOptions(QuantRecipe):
    """A `QuantRecipe` plus the options of a folder-to-folder conversion: the Hub revision of SOURCE, the base model
    to record for a local SOURCE, and the largest output shard."""

    base_model: str | None = None
    revision: str | None = None
    max_shard_size: int = DEFAULT_SHARD_SIZE

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_shard_size <= 0:
            raise OptionError("--max-shard-size must be positive")

    def to_record(self) -> dict[str, Any]:
        """The options as recorded in the checkpoint's provenance (no local paths)."""
        return {**super().to_record(), "base_model": self.base_model, "revision": self.revision,
                "max_shard_size": self.max_shard_size}

    def command(self, source_label: str) -> str:
        """An equivalent `qformat convert` command line, with SOURCE shown as `source_label` and OUTPUT as "OUTPUT"."""
        parts = ["qformat", "convert", source_label, "OUTPUT", *self.command_args()]
        if self.revision:
            parts += ["--revision", self.revision]
        if self.base_model:
            parts += ["--base-model", self.base_model]
        if self.max_shard_size != DEFAULT_SHARD_SIZE:
            parts += ["--max-shard-size", str(self.max_shard_size)]
        return " ".join(shlex.quote(p) for p in parts)
