"""Conversion options: what `qformat convert` and `qformat.convert()` accept, validated once, recorded verbatim."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from qformat.errors import OptionError
from qformat.quantize.observers import OBSERVERS
from qformat.spec.patterns import PatternSet, RuleSet
from qformat.spec.schemes import SPARSITY_2_4, Scheme, resolve_scheme_name

__all__ = ["FULL_PRECISION", "ConvertOptions", "parse_override", "parse_size"]

#: The override target that keeps matching modules in full precision (fallback reason "user").
FULL_PRECISION = "none"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str | int) -> int:
    """"5GB" -> 5_000_000_000 (decimal units, as huggingface_hub uses; "GiB" for binary)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise OptionError(f"cannot read size {text!r}; write it like 5GB or 500MB")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").upper()])


def parse_override(text: str) -> tuple[str, str]:
    """"PATTERN=SCHEME" -> (pattern, scheme). The last "=" splits, so regexes may contain "="."""
    pattern, sep, scheme = text.rpartition("=")
    if not sep or not pattern or not scheme:
        raise OptionError(f"override {text!r} must look like PATTERN=SCHEME, e.g. 're:.*down_proj=fp8-dynamic'")
    return pattern, scheme


@dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    """Options of one conversion. `observer=None` means the scheme's default: "mse" for fp8 schemes, "absmax" else.

    `overrides` are (pattern, scheme-or-"none") pairs; `ignore` patterns keep modules in full precision. Patterns are
    exact module names or "re:<regex>" (compressed-tensors/vLLM semantics). `sparsity="2:4"` adds 2:4 to every scheme.
    """

    scheme: str = "w8a8-int8"
    ignore: tuple[str, ...] = ()
    overrides: tuple[tuple[str, str], ...] = ()
    observer: str | None = None
    sparsity: str | None = None
    base_model: str | None = None
    revision: str | None = None
    max_shard_size: int = 5 * 10**9
    schemes: dict[str, Scheme] = field(init=False, repr=False, compare=False)
    default_scheme: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.sparsity not in (None, SPARSITY_2_4):
            raise OptionError(f"--sparsity must be '2:4', not {self.sparsity!r}")
        if self.observer is not None and self.observer not in OBSERVERS:
            raise OptionError(f"unknown observer {self.observer!r}; choose one of: {', '.join(OBSERVERS)}")
        if self.max_shard_size <= 0:
            raise OptionError("--max-shard-size must be positive")
        PatternSet(self.ignore, what="--ignore")  # each pattern valid, within the length and count limits
        RuleSet(self.overrides, what="--override")
        schemes: dict[str, Scheme] = {}
        default, scheme = resolve_scheme_name(self.scheme, sparsity=self.sparsity)
        schemes[default] = scheme
        for _, target in self.overrides:
            if target.strip().lower() != FULL_PRECISION:
                name, sch = resolve_scheme_name(target, sparsity=self.sparsity)
                schemes[name] = sch
        object.__setattr__(self, "schemes", schemes)
        object.__setattr__(self, "default_scheme", default)

    def canonical_override(self, target: str) -> str:
        """The scheme name an override's target resolves to, or "none"."""
        if target.strip().lower() == FULL_PRECISION:
            return FULL_PRECISION
        return resolve_scheme_name(target, sparsity=self.sparsity)[0]

    def observer_for(self, scheme: Scheme) -> str:
        if self.observer is not None:
            return self.observer
        return "mse" if scheme.weights.type == "float" else "absmax"

    def to_record(self) -> dict[str, Any]:
        """The options as recorded in the checkpoint's provenance (no local paths)."""
        return {
            "scheme": self.scheme,
            "ignore": list(self.ignore),
            "overrides": [f"{p}={s}" for p, s in self.overrides],
            "observer": self.observer,
            "sparsity": self.sparsity,
            "base_model": self.base_model,
            "revision": self.revision,
            "max_shard_size": self.max_shard_size,
        }

    def command(self, source_label: str) -> str:
        """An equivalent `qformat convert` command line, with SOURCE shown as `source_label` and OUTPUT as "OUTPUT"."""
        import shlex

        parts = ["qformat", "convert", source_label, "OUTPUT", "--scheme", self.scheme]
        for pattern in self.ignore:
            parts += ["--ignore", pattern]
        for pattern, target in self.overrides:
            parts += ["--override", f"{pattern}={target}"]
        if self.observer:
            parts += ["--observer", self.observer]
        if self.sparsity:
            parts += ["--sparsity", self.sparsity]
        if self.revision:
            parts += ["--revision", self.revision]
        if self.base_model:
            parts += ["--base-model", self.base_model]
        if self.max_shard_size != 5 * 10**9:
            parts += ["--max-shard-size", str(self.max_shard_size)]
        return " ".join(shlex.quote(p) for p in parts)
