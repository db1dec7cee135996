"""The `quantization_config` block of a qformat checkpoint's config.json, as a frozen dataclass.

`QFormatConfig.from_dict` is the one place that decides whether a reader understands a checkpoint: it refuses an
unknown major `format_version`, checks every key it needs, and ignores keys it does not know (so later minor additions
stay readable). docs/FORMAT.md is the normative description; this module implements it without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qformat.errors import FormatError, OptionError, UnsupportedFormatVersionError
from qformat.spec.fused import FusedGroups
from qformat.spec.patterns import first_match, validate_pattern
from qformat.spec.schemes import Scheme

__all__ = [
    "FALLBACK_REASONS",
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "FallbackEntry",
    "QFormatConfig",
]

QUANT_METHOD = "qformat"
#: The format major version this code writes and reads. Additions that old readers may ignore keep the number;
#: anything an old reader would misread bumps it.
FORMAT_VERSION = 1

#: Why a Linear module is kept in full precision. `user`: --ignore or an override to "none"; `default`: kept by
#: qformat's defaults (the output embedding); `sensitivity`: a fallback search measured it; `shape`: no kernel of the
#: scheme takes its dimensions; `fused`: kept because a member of its fused group is.
FALLBACK_REASONS = ("user", "default", "sensitivity", "shape", "fused")


@dataclass(frozen=True, kw_only=True)
class FallbackEntry:
    """One module kept in full precision, with the reason and, for `sensitivity`, the measured figure."""

    module: str
    reason: str
    detail: str = ""
    measured: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.reason not in FALLBACK_REASONS:
            raise FormatError(
                f"fallback reason for {self.module!r} is {self.reason!r}; it must be one of {', '.join(FALLBACK_REASONS)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "reason": self.reason, "detail": self.detail, "measured": self.measured}

    @classmethod
    def from_dict(cls, data: Any) -> FallbackEntry:
        if not isinstance(data, dict) or not isinstance(data.get("module"), str) or "reason" not in data:
            raise FormatError(f"each fallback entry needs 'module' and 'reason', got {data!r}")
        return cls(
            module=data["module"],
            reason=data["reason"],
            detail=str(data.get("detail") or ""),
            measured=data.get("measured"),
        )


@dataclass(frozen=True, kw_only=True)
class QFormatConfig:
    """Everything config.json's `quantization_config` says about a qformat checkpoint.

    Readers need `schemes`, `default_scheme`, `overrides` and `fallback` to know how every Linear module is stored;
    `provenance` and `statistics` describe how the checkpoint was made; `evaluation` and `fallback_search` are
    reserved for results that later tools add (null until then).
    """

    format_version: int = FORMAT_VERSION
    schemes: dict[str, Scheme]
    default_scheme: str
    overrides: tuple[tuple[str, str], ...] = ()
    fallback: tuple[FallbackEntry, ...] = ()
    fused_groups: FusedGroups = ()
    provenance: dict[str, Any] = field(default_factory=dict)
    statistics: dict[str, Any] = field(default_factory=dict)
    evaluation: list[dict[str, Any]] | None = None
    fallback_search: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.default_scheme not in self.schemes:
            raise FormatError(f"default_scheme {self.default_scheme!r} is not defined in 'schemes'")
        for pattern, name in self.overrides:
            try:
                validate_pattern(pattern)
            except OptionError as exc:
                raise FormatError(f"overrides: {exc}") from None
            if name not in self.schemes:
                raise FormatError(f"override {pattern!r} names scheme {name!r}, which is not defined in 'schemes'")
        seen: set[str] = set()
        for entry in self.fallback:
            if entry.module in seen:
                raise FormatError(f"module {entry.module!r} is listed twice in 'fallback'")
            seen.add(entry.module)

    # -- reading ------------------------------------------------------------------------------------------------
    @property
    def fallback_modules(self) -> dict[str, FallbackEntry]:
        return {entry.module: entry for entry in self.fallback}

    def scheme_for(self, module: str) -> tuple[str, Scheme] | None:
        """The (name, scheme) a Linear module is stored with, or None if it is kept in full precision.

        Precedence: the fallback list, then an exact-name override, then the first matching `re:` override, then the
        default scheme.
        """
        if module in self.fallback_modules:
            return None
        rule = first_match(self.overrides, module)
        name = rule[1] if rule is not None else self.default_scheme
        return name, self.schemes[name]

    # -- (de)serialization --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "schemes": {name: scheme.to_dict() for name, scheme in self.schemes.items()},
            "default_scheme": self.default_scheme,
            "overrides": [{"pattern": p, "scheme": s} for p, s in self.overrides],
            "fallback": [entry.to_dict() for entry in self.fallback],
            "fused_groups": [list(group) for group in self.fused_groups],
            "provenance": self.provenance,
            "statistics": self.statistics,
            "evaluation": self.evaluation,
            "fallback_search": self.fallback_search,
        }

    @classmethod
    def from_dict(cls, data: Any) -> QFormatConfig:
        """Parse a `quantization_config` dict; raise `FormatError` naming the first problem."""
        if not isinstance(data, dict):
            raise FormatError("quantization_config must be a JSON object")
        if data.get("quant_method") != QUANT_METHOD:
            raise FormatError(
                f"quantization_config.quant_method is {data.get('quant_method')!r}, not {QUANT_METHOD!r}: "
                "this is not a qformat checkpoint"
            )
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise FormatError(f"quantization_config.format_version must be an integer, got {version!r}")
        if version != FORMAT_VERSION:
            from qformat._version import __version__

            raise UnsupportedFormatVersionError(
                f"this checkpoint uses qformat format version {version}, but qformat {__version__} reads version "
                f"{FORMAT_VERSION} only; upgrade qformat (pip install -U qformat)"
            )
        schemes = data.get("schemes")
        if not isinstance(schemes, dict) or not schemes:
            raise FormatError("quantization_config.schemes must be a non-empty object of scheme definitions")
        overrides = data.get("overrides") or []
        if not isinstance(overrides, list) or not all(
            isinstance(o, dict) and isinstance(o.get("pattern"), str) and isinstance(o.get("scheme"), str)
            for o in overrides
        ):
            raise FormatError("quantization_config.overrides must be a list of {'pattern': ..., 'scheme': ...}")
        fallback = data.get("fallback") or []
        if not isinstance(fallback, list):
            raise FormatError("quantization_config.fallback must be a list")
        default = data.get("default_scheme")
        if not isinstance(default, str):
            raise FormatError("quantization_config.default_scheme must name one of 'schemes'")
        return cls(
            format_version=version,
            schemes={str(name): Scheme.from_dict(s) for name, s in schemes.items()},
            default_scheme=default,
            overrides=tuple((o["pattern"], o["scheme"]) for o in overrides),
            fallback=tuple(FallbackEntry.from_dict(f) for f in fallback),
            fused_groups=tuple(tuple(g) for g in data.get("fused_groups") or ()),
            provenance=dict(data.get("provenance") or {}),
            statistics=dict(data.get("statistics") or {}),
            evaluation=data.get("evaluation"),
            fallback_search=data.get("fallback_search"),
        )
